"""The OpenAI completions protocol: request checks (one clear 4xx message each) and response bodies.

A request becomes one `SequenceSpec` per (prompt, choice); every limit that the engine relies on is checked here,
before anything is queued, so a bad request never reaches the model.
"""
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from generation.blank_filling import MASK_PATTERN, MASK_PRECEDENCE, check_prompt, encode_prompt, encode_prompt_ids
from generation.engine import SequenceSpec, TokenLogprob
from generation.scoring import scored_part
from model.errors import UserError
from model.tokenizer import SPECIAL_IDS, text_id_range

MAX_STOP = 4
MAX_LOGPROBS = 20
MAX_BEAMS = 8
SPECIAL_TOKEN_IDS = set(SPECIAL_IDS.values())
OPENAI_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "n", "seed", "stream",
                 "stream_options", "logprobs", "echo", "user", "best_of", "presence_penalty", "frequency_penalty",
                 "logit_bias", "suffix"}
EXTENSION_FIELDS = {"top_k", "num_beams", "length_penalty", "no_repeat_ngram_size"}


class ApiError(Exception):
    """A request the server answers with an OpenAI-shaped error: status, one-line message, the field at fault."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Limits:
    model_name: str
    max_sequence_length: int
    max_n: int
    max_queue: int


@dataclass
class CompletionRequest:
    prompts: List[str]  # the texts (a token-id prompt detokenized)
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: Optional[int]
    specs: List[SequenceSpec]  # prompt-major: choice index = prompt index * n + choice


def _bad(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param)


def parse_json(raw: bytes) -> Dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


def _integer(body, name, default, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer, got {json.dumps(value)}", name)
    if low is not None and value < low or high is not None and value > high:
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise _bad(f"{name} must be {bounds}, got {value}", name)
    return value


def _number(body, name, default, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{name} must be a number, got {json.dumps(value)}", name)
    if low is not None and value < low or high is not None and value > high:
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise _bad(f"{name} must be {bounds}, got {value}", name)
    return float(value)


def _boolean(body, name, default=False):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"{name} must be true or false, got {json.dumps(value)}", name)
    return value


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(i, int) and not isinstance(i, bool)
                                                            for i in value)


def _prompts(body) -> list:
    """The prompts: each a string or a list of token ids (the OpenAI forms: a string, a list of strings, a list of
    ids, a list of lists of ids)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("prompt is required", "prompt")
    prompts = [prompt] if isinstance(prompt, str) or _is_ids(prompt) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) or _is_ids(p) for p in prompts):
        raise _bad("prompt must be a string, a list of token ids, or a non-empty list of either", "prompt")
    if any(isinstance(p, str) and not p.strip() for p in prompts):
        raise _bad("prompt is empty", "prompt")
    return prompts


def _check_ids(ids: List[int], tokenizer, echo: bool) -> None:
    """Token ids a prompt may hold: text ids, the masks (generation) or a leading sop (echo)."""
    lo, hi = text_id_range(tokenizer)
    masks = {tokenizer.get_command(m) for m in MASK_PRECEDENCE}
    sop = tokenizer.get_command("sop")
    for k, i in enumerate(ids):
        if lo <= i < hi or (i in masks and not echo) or (i == sop and k == 0 and echo):
            continue
        what = f"the special token {tokenizer.id_text(i)}" if i in SPECIAL_TOKEN_IDS else "not a text token"
        allowed = "text ids and a leading [sop] (echo)" if echo else "text ids and [MASK]/[sMASK]/[gMASK]"
        raise _bad(f"prompt token {k} (id {i}) is {what}: a prompt takes {allowed}; text ids are {lo}..{hi - 1}",
                   "prompt")


def _stop(body) -> tuple:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop must be a non-empty string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOP:
        raise _bad(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    return tuple(stops)


def _unsupported(body) -> None:
    unknown = sorted(set(body) - OPENAI_FIELDS - EXTENSION_FIELDS)
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r}", unknown[0])
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0) != 0.0:
            raise _bad(f"{name} is not supported (it must be 0)", name)
    if _integer(body, "best_of", 1, 1) != 1:
        raise _bad("best_of is not supported (use num_beams for beam search)", "best_of")
    if body.get("logit_bias"):
        raise _bad("logit_bias is not supported", "logit_bias")
    if body.get("suffix") is not None:
        raise _bad("suffix is not supported: put a [MASK] where the text should go", "suffix")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user must be a string", "user")


def _check_model(body, limits: Limits) -> None:
    name = body.get("model", limits.model_name)
    if not isinstance(name, str):
        raise _bad("model must be a string", "model")
    if name != limits.model_name:
        raise ApiError(404, f"model {name!r} does not exist; this server serves {limits.model_name!r}", "model",
                       "not_found_error")


def _check_prompt(prompt, tokenizer, max_tokens: int, echo: bool, limits: Limits) -> Optional[List[int]]:
    """The checked prompt (a text or ids); returns its ids where the engine takes ids (echo, or ids given)."""
    if isinstance(prompt, str):
        kinds = sorted(set(MASK_PATTERN.findall(prompt)))
        if len(kinds) > 1:
            raise _bad(f"the prompt mixes {' and '.join(kinds)}: GLM fills one mask kind per prompt (the original "
                       f"leaves the others as literal tokens); use one kind", "prompt")
    if echo:
        if isinstance(prompt, str) and MASK_PATTERN.search(prompt):
            raise _bad("echo scores a plain text: it cannot be combined with a prompt holding a mask", "echo")
        return _check_echo(prompt if not isinstance(prompt, str) else tokenizer.tokenize_spelled(prompt), tokenizer,
                           max_tokens, limits)
    if not isinstance(prompt, str):
        _check_ids(prompt, tokenizer, echo=False)
    encoded = encode_prompt(prompt, tokenizer) if isinstance(prompt, str) else encode_prompt_ids(prompt, tokenizer)
    try:
        check_prompt(encoded, 1 << 30, max(1, max_tokens), limits.max_sequence_length)
    except UserError as e:
        raise _bad(str(e).replace("--max-sequence-length", "the model's sequence length"), "prompt") from None
    needed = len(encoded.ids) + 1 + max_tokens
    if needed > limits.max_sequence_length:
        raise _bad(f"the prompt is {len(encoded.ids) + 1} tokens (with the added mask, eos and sop); with max_tokens "
                   f"{max_tokens} that is {needed}, more than the model's {limits.max_sequence_length}",
                   "max_tokens")
    return None if isinstance(prompt, str) else list(prompt)


def _check_echo(ids: List[int], tokenizer, max_tokens: int, limits: Limits) -> List[int]:
    """An echo prompt's ids: scored as `[gMASK] sop text`, so text + 1 + max_tokens positions must fit."""
    _check_ids(ids, tokenizer, echo=True)
    scored = len(scored_part(ids, tokenizer.get_command("sop")))
    if scored == 0:
        raise _bad("echo has no token to score: the prompt is only [sop]", "prompt")
    needed = scored + 1 + max_tokens
    if needed > limits.max_sequence_length:
        raise _bad(f"the prompt has {scored} tokens to score; with [gMASK] and max_tokens {max_tokens} that is "
                   f"{needed} positions, more than the model's {limits.max_sequence_length} (lm-eval: pass "
                   f"max_length={limits.max_sequence_length - 1} in --model_args)", "prompt")
    return ids


def parse_completion(raw: bytes, tokenizer, limits: Limits, next_id) -> CompletionRequest:
    """The checked request, with one SequenceSpec per (prompt, choice); ApiError when anything is wrong."""
    body = parse_json(raw)
    _unsupported(body)
    _check_model(body, limits)
    prompts = _prompts(body)
    echo = _boolean(body, "echo")
    stream = _boolean(body, "stream")
    low = 0 if echo else 1
    max_tokens = _integer(body, "max_tokens", 16, low, limits.max_sequence_length - 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 100.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _integer(body, "top_k", 0, 0)
    n = _integer(body, "n", 1, 1, limits.max_n)
    seed = _integer(body, "seed", None)
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    num_beams = _integer(body, "num_beams", 1, 1, MAX_BEAMS)
    length_penalty = _number(body, "length_penalty", 1.0)
    no_repeat = _integer(body, "no_repeat_ngram_size", 0, 0)
    stop = _stop(body)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise _bad("stream_options must be an object with only include_usage", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    if num_beams > 1 and (stream or n > 1 or logprobs is not None or echo or stop):
        raise _bad("beam search (num_beams > 1) returns one answer per prompt, without streaming, logprobs, echo or "
                   "stop", "num_beams")
    if num_beams > 1 and not all(isinstance(p, str) for p in prompts):
        raise _bad("beam search (num_beams > 1) takes text prompts, not token ids", "num_beams")
    if len(prompts) * n > limits.max_queue:
        raise ApiError(400, f"the request asks for {len(prompts) * n} sequences, more than the server queues "
                       f"({limits.max_queue})", "n")
    ids = [_check_prompt(p, tokenizer, max_tokens, echo, limits) for p in prompts]
    texts = [p if isinstance(p, str) else tokenizer.detokenize(p) for p in prompts]
    specs = [SequenceSpec(next_id(), text, max_tokens, temperature=temperature, top_k=top_k,
                          top_p=0.0 if top_p >= 1.0 else top_p, seed=None if seed is None else seed + choice,
                          stop=stop, logprobs=logprobs, echo=echo, num_beams=num_beams,
                          length_penalty=length_penalty, no_repeat_ngram_size=no_repeat,
                          ids=None if prompt_ids is None else tuple(prompt_ids))
             for text, prompt_ids in zip(texts, ids) for choice in range(n)]
    return CompletionRequest(texts, n, stream, include_usage, echo, logprobs, specs)


# --- responses ---------------------------------------------------------------------------------------------------

def completion_id() -> str:
    return "cmpl-" + uuid.uuid4().hex[:24]


def logprobs_body(entries: List[TokenLogprob], offset: int = 0) -> Dict[str, Any]:
    offsets, position = [], offset
    for entry in entries:
        offsets.append(position)
        position += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [e.top for e in entries], "text_offset": offsets}


def chunk(cid: str, created: int, model: str, choices: List[dict], usage: Optional[dict] = None) -> str:
    body = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def usage_body(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())
