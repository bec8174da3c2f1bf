"""The OpenAI completions protocol: request checks (one clear 4xx message each) and response bodies.

A request becomes one `SequenceSpec` per (prompt, choice); every limit that the engine relies on is checked here,
before anything is queued, so a bad request never reaches the model: the body's size (before it is read whole), JSON
without NaN/Infinity or out-of-range numbers, every integer within what the engine holds, prompts and stop strings
that can be encoded, and a prompt's length in characters before it is tokenized (a token is at most
`max_token_chars` characters, so a longer prompt cannot fit the sequence length).

Decided meanings (README "Serving"): a temperature below TEMPERATURE_FLOOR, or top_p 0, means greedy (the limit of
sampling as they go to 0; dividing logits by a smaller temperature would overflow them); a seed is any 64-bit
integer, signed or not (choice k of n uses seed + k modulo 2^64, torch's own reading of a negative seed).
"""
import json
import math
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
MAX_TOP_K = 2 ** 31 - 1  # above the vocabulary size it keeps every id
MAX_LENGTH_PENALTY = 10.0  # |length_penalty|: ((5 + length) / 6) ** 10 stays far from overflow at any length
SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)  # what torch.Generator.manual_seed takes
TEMPERATURE_FLOOR = 1e-5  # below it (0 included) a request is greedy
DEFAULT_MAX_REQUEST_BYTES = 4 << 20
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
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_token_chars: int = 0  # the tokenizer's longest vocabulary piece, in characters (0: prompts not pre-checked)


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


def body_too_large(limit: int, declared: Optional[int] = None) -> ApiError:
    """413: a body whose Content-Length is `declared` bytes, or (None) one that grew past `limit` while read."""
    size = f"{declared} bytes" if declared is not None else f"larger than {limit} bytes"
    return ApiError(413, f"the request body is {size}; this server takes at most {limit} (--max-request-bytes)")


def _no_constant(name: str):
    raise _bad(f"the request body holds {name}, which is not a JSON number; send a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _bad(f"the number {text} is out of range; send a finite number")
    return value


def parse_json(raw: bytes) -> Dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise _bad(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise _bad("the request body is nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise _bad(f"the request body holds a value that cannot be read ({str(e).split(':')[0]})") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


def check_text(text: str, name: str) -> None:
    """A prompt or stop string the tokenizer can encode: valid Unicode (no lone surrogates), no NUL characters."""
    if "\x00" in text:
        raise _bad(f"{name} holds a NUL character (\\u0000) at character {text.index(chr(0))}", name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(f"{name} holds a lone surrogate ({text[e.start]!r}) at character {e.start}: it is not valid "
                   f"Unicode", name) from None


def _integer(body, name, default, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer, got {json.dumps(value)}", name)
    if low is not None and value < low or high is not None and value > high:
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:20]}... ({len(str(value))} digits)"
        raise _bad(f"{name} must be {bounds}, got {shown}", name)
    return value


def _number(body, name, default, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{name} must be a number, got {json.dumps(value)}", name)
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise _bad(f"{name} must be a finite number", name)
    if low is not None and number < low or high is not None and number > high:
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise _bad(f"{name} must be {bounds}, got {number:g}", name)
    return number


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
    for p in prompts:
        if isinstance(p, str):
            check_text(p, "prompt")
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
    for s in stops:
        check_text(s, "stop")
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
        if echo and kinds:
            raise _bad("echo scores a plain text: it cannot be combined with a prompt holding a mask", "echo")
        _check_prompt_chars(prompt, limits)
    if echo:
        ids = prompt if not isinstance(prompt, str) else tokenized(tokenizer.tokenize_spelled, prompt)
        return _check_echo(ids, tokenizer, max_tokens, limits)
    if isinstance(prompt, str):
        encoded = tokenized(lambda text: encode_prompt(text, tokenizer), prompt)
    else:
        _check_ids(prompt, tokenizer, echo=False)
        encoded = encode_prompt_ids(prompt, tokenizer)
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


def tokenized(encode, text: str):
    """encode(text); whatever the tokenizer cannot encode is a 400 naming the prompt."""
    try:
        return encode(text)
    except Exception as e:  # noqa: BLE001 - whatever the tokenizer cannot encode is the prompt's fault
        raise _bad(f"the prompt cannot be tokenized ({type(e).__name__})", "prompt") from None


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


def _check_prompt_chars(text: str, limits: Limits) -> None:
    """Before tokenizing: a prompt of more characters than the sequence length times the longest vocabulary piece
    has more tokens than the sequence length (whitespace runs count too: only collapsing them could make it fit)."""
    most = limits.max_sequence_length * limits.max_token_chars
    if limits.max_token_chars and len(text) > most:
        raise _bad(f"the prompt is {len(text)} characters; at most {most} can fit the model's sequence length "
                   f"({limits.max_sequence_length} tokens)", "prompt")


def _sampling(body) -> tuple:
    """(temperature, top_k, top_p) as the engine takes them: temperature 0 = greedy, top_p 0.0 = no nucleus."""
    temperature = _number(body, "temperature", 1.0, 0.0, 100.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _integer(body, "top_k", 0, 0, MAX_TOP_K)
    if temperature < TEMPERATURE_FLOOR or top_p == 0.0:
        return 0.0, top_k, 0.0
    return temperature, top_k, 0.0 if top_p >= 1.0 else top_p


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
    temperature, top_k, top_p = _sampling(body)
    n = _integer(body, "n", 1, 1, limits.max_n)
    seed = _integer(body, "seed", None, *SEED_RANGE)
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    num_beams = _integer(body, "num_beams", 1, 1, MAX_BEAMS)
    length_penalty = _number(body, "length_penalty", 1.0, -MAX_LENGTH_PENALTY, MAX_LENGTH_PENALTY)
    no_repeat = _integer(body, "no_repeat_ngram_size", 0, 0, limits.max_sequence_length)
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
    specs = [SequenceSpec(next_id(), text, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=None if seed is None else (seed + choice) % 2 ** 64,
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
