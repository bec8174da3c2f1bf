"""The tokenizer endpoints lm-evaluation-harness probes (its remote tokenizer), at the root and under /v1.

- `GET /tokenizer_info`: `eos_token`, `bos_token` (GLM's `sop`, the start token of a scored text), the sequence length;
- `POST /tokenize` `{"prompt": text, "add_special_tokens": bool}` -> `{"tokens": [ids], "count", "max_model_len"}`;
- `POST /detokenize` `{"tokens": [ids]}` -> `{"prompt": text}`.

Both directions are the model's own tokenizer: special tokens are written as SPELLED says ("[sop]", "[</s>]",
"[MASK]", ...), so `/tokenize` of "[sop]" + text gives sop + the text's ids. GLM's tokenizer adds no special token
to a text (the server adds [gMASK] and sop where it scores or generates), so `add_special_tokens` changes nothing.
"""
from typing import Callable

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from model.tokenizer import SPECIAL_IDS, TOKENIZER_TYPE
from server.http_io import error_response, read_body, route_of
from server.protocol import ApiError, Limits, check_text, parse_json, tokenized


def _fields(body: dict, allowed: set) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}", unknown[0])


def _text(body: dict) -> str:
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string", "prompt")
    if not isinstance(body.get("add_special_tokens", False), bool):
        raise ApiError(400, "add_special_tokens must be true or false", "add_special_tokens")
    check_text(prompt, "prompt")
    return prompt


def _ids(body: dict, tokenizer) -> list:
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in tokens):
        raise ApiError(400, "tokens must be a list of token ids", "tokens")
    for k, i in enumerate(tokens):
        if not tokenizer.knows(i):
            raise ApiError(400, f"tokens[{k}] = {i} is not a token of this tokenizer (text ids, special ids "
                                f"{min(SPECIAL_IDS.values())}..{max(SPECIAL_IDS.values())}, eos, pad 0)", "tokens")
    return tokens


def add_tokenizer_routes(app: FastAPI, tokenizer, limits: Limits, metrics) -> None:
    def info():
        return {"eos_token": tokenizer.id_text(SPECIAL_IDS["eos"]), "bos_token": tokenizer.id_text(SPECIAL_IDS["sop"]),
                "pad_token": None, "tokenizer_class": TOKENIZER_TYPE, "model_max_length": limits.max_sequence_length}

    def tokenize(body: dict) -> dict:
        _fields(body, {"model", "prompt", "add_special_tokens"})
        ids = tokenized(tokenizer.tokenize_spelled, _text(body))
        return {"tokens": ids, "count": len(ids), "max_model_len": limits.max_sequence_length}

    def detokenize(body: dict) -> dict:
        _fields(body, {"model", "tokens"})
        return {"prompt": tokenizer.detokenize(_ids(body, tokenizer))}

    def answer(handle: Callable[[dict], dict]):
        """The route: the body read up to --max-request-bytes, parsed and handled off the event loop."""
        async def route(request: Request):
            try:
                raw = await read_body(request, limits.max_request_bytes)
                return await run_in_threadpool(lambda: handle(parse_json(raw)))
            except ApiError as e:
                metrics.request("bad_request")
                return error_response(e, route_of(request))
        return route

    for root in ("", "/v1"):
        app.add_api_route(root + "/tokenizer_info", info, methods=["GET"])
        app.add_api_route(root + "/tokenize", answer(tokenize), methods=["POST"])
        app.add_api_route(root + "/detokenize", answer(detokenize), methods=["POST"])
