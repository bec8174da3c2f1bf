"""The HTTP side (FastAPI): /v1/completions (JSON or Server-Sent Events), /v1/models, /health, /metrics, and the
tokenizer endpoints lm-evaluation-harness probes (server/tokenizer_api.py).

Requests are checked (server/protocol.py), queued on the scheduler, and answered from the events the engine
thread sends back; a streaming client that goes away has its sequences cancelled, which frees their slots.
The body is read up to --max-request-bytes and checked off the event loop (a worker thread), so a large request
never stalls /health or the streams. Every error answer is an OpenAI-shaped JSON body and one console line
(status, route, field, message); a sequence the engine failed ends its request with 500 (a stream: an error event,
then [DONE]); once the engine itself has failed, everything is answered 503 until the process exits.
"""
import asyncio
import itertools
import json
import threading
import traceback
from typing import Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from generation.engine import Event
from server.http_io import error_response, log_error, read_body, route_of
from server.protocol import (ApiError, CompletionRequest, Limits, chunk, completion_id, logprobs_body, now,
                             parse_completion, usage_body)
from server.scheduler import QueueFull
from server.tokenizer_api import add_tokenizer_routes

DISCONNECT_POLL_S = 1.0
COMPLETIONS = "POST /v1/completions"


def generation_error(flight: "_Request", scheduler) -> ApiError:
    """The answer of a request one of whose sequences failed (500), or whose engine failed (503)."""
    if not scheduler.alive():
        return ApiError(503, f"the engine failed: {flight.error()}", None, "server_error")
    return ApiError(500, f"generation failed: {flight.error()}", None, "server_error")


class _Choice:
    """What one (prompt, choice) sequence has produced so far."""

    def __init__(self, index: int, prompt: str, echo: bool):
        self.index, self.prompt = index, prompt
        self.text = prompt if echo else ""
        self.offset = 0 if echo else len(prompt)  # text_offset counts from the prompt's start (OpenAI's meaning)
        self.streamed = False  # whether a stream chunk of this choice was sent
        self.logprobs = []
        self.finish_reason = None
        self.result = None
        self.error: Optional[str] = None

    def add(self, event: Event) -> None:
        self.text += event.text
        self.logprobs += event.logprobs
        if event.finish_reason is not None:
            self.finish_reason, self.result, self.error = event.finish_reason, event.result, event.error

    def body(self, want_logprobs: bool) -> dict:
        out = {"index": self.index, "text": self.text, "finish_reason": self.finish_reason,
               "logprobs": logprobs_body(self.logprobs, self.offset) if want_logprobs else None}
        out["blanks"] = self.result["blanks"] if self.result else []
        return out


class _Request:
    """One completion request in flight: its sequences' events arrive on an asyncio queue."""

    def __init__(self, req: CompletionRequest, loop: asyncio.AbstractEventLoop):
        self.req, self.loop = req, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.choice_of = {spec.seq_id: i for i, spec in enumerate(req.specs)}
        self.choices = [_Choice(i, spec.text, req.echo) for i, spec in enumerate(req.specs)]
        self.open = set(self.choice_of)
        self.id, self.created = completion_id(), now()

    def sink(self, event: Event) -> None:  # called on the engine thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def take(self, event: Event) -> _Choice:
        choice = self.choices[self.choice_of[event.seq_id]]
        choice.add(event)
        if event.finish_reason is not None:
            self.open.discard(event.seq_id)
        return choice

    def failed(self) -> bool:
        return any(c.finish_reason in ("error", "cancelled") for c in self.choices)

    def error(self) -> Optional[str]:
        """The first failed sequence's error message (None: no sequence failed)."""
        return next((c.error or "unknown error" for c in self.choices if c.finish_reason == "error"), None)

    def usage(self) -> Dict[str, int]:
        n = self.req.n
        prompt = sum(c.result["prompt_tokens"] for c in self.choices[::n] if c.result)
        completion = sum(c.result["completion_tokens"] for c in self.choices if c.result)
        return usage_body(prompt, completion)


def build_app(scheduler, tokenizer, limits: Limits, metrics) -> FastAPI:
    app = FastAPI(title="GLM-130B", docs_url=None, redoc_url=None, openapi_url=None)
    counter, lock = itertools.count(1), threading.Lock()

    def next_id() -> int:
        with lock:
            return next(counter)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, str(exc.detail), None, kind), route_of(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error_response(ApiError(400, "invalid request"), route_of(request))

    add_tokenizer_routes(app, tokenizer, limits, metrics)

    @app.get("/health")
    async def health(request: Request):
        if not scheduler.alive():
            return error_response(ApiError(503, "the engine has failed; the server is exiting", None,
                                            "server_error"), route_of(request))
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": limits.model_name, "object": "model", "created": 0,
                                            "owned_by": "glm"}]}

    @app.get("/metrics")
    async def prometheus():
        running = scheduler.engine.live()
        text = metrics.render(scheduler.queue_depth(), running, len(scheduler.engine.slots))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        metrics.request("bad_request")
        return error_response(ApiError(400, "chat completions are not supported: GLM-130B is not a chat model; use "
                                            "/v1/completions (with [MASK] or [gMASK] for blank filling)"),
                              route_of(request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            raw = await read_body(request, limits.max_request_bytes)
            req = await run_in_threadpool(parse_completion, raw, tokenizer, limits, next_id)
        except ApiError as e:
            metrics.request("bad_request")
            return error_response(e, COMPLETIONS)
        except Exception as e:  # noqa: BLE001 - a bug in the checks: answered as JSON, logged with its traceback
            traceback.print_exc()
            metrics.request("failed")
            return error_response(ApiError(500, f"internal error while reading the request: {type(e).__name__}",
                                           None, "server_error"), COMPLETIONS)
        flight = _Request(req, asyncio.get_running_loop())
        try:
            scheduler.submit(req.specs, flight.sink)
        except QueueFull as e:
            metrics.request("rejected")
            kind = "rate_limit_error" if e.status == 429 else "server_error"
            return error_response(ApiError(e.status, str(e), None, kind), COMPLETIONS)
        if req.stream:
            return StreamingResponse(_stream(flight, scheduler, limits, metrics), media_type="text/event-stream")
        return await _collect(flight, request, scheduler, limits, metrics)

    return app


def _finish(flight: _Request, metrics) -> None:
    if flight.failed():
        metrics.request("failed")
        return
    usage = flight.usage()
    metrics.usage(usage["prompt_tokens"], usage["completion_tokens"])
    metrics.request("ok")


async def _collect(flight: _Request, request: Request, scheduler, limits: Limits, metrics):
    while flight.open:
        try:
            choice = flight.take(await asyncio.wait_for(flight.events.get(), DISCONNECT_POLL_S))
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                scheduler.cancel(list(flight.open))
                metrics.request("cancelled")
                return error_response(ApiError(499, "the client went away"), COMPLETIONS)
            continue
        if choice.finish_reason == "error":  # the request cannot succeed: free the other choices' slots now
            scheduler.cancel(list(flight.open))
            flight.open.clear()
    _finish(flight, metrics)
    if flight.error() is not None:
        return error_response(generation_error(flight, scheduler), COMPLETIONS)
    if flight.failed():
        return error_response(ApiError(503, "the server stopped before the request finished", None, "server_error"),
                              COMPLETIONS)
    choices = [c.body(flight.req.logprobs is not None) for c in flight.choices]
    return {"id": flight.id, "object": "text_completion", "created": flight.created, "model": limits.model_name,
            "choices": choices, "usage": flight.usage()}


def _delta(flight: _Request, choice: _Choice, event: Event, offsets: List[int]) -> dict:
    """The stream chunk of one event: its text, its tokens' log-probs (offsets continue the choice's text)."""
    text = choice.prompt + event.text if flight.req.echo and not choice.streamed else event.text
    choice.streamed = True
    body = {"index": choice.index, "text": text, "finish_reason": event.finish_reason, "logprobs": None}
    if flight.req.logprobs is not None:
        body["logprobs"] = logprobs_body(event.logprobs, offsets[choice.index])
    offsets[choice.index] += sum(len(e.token) for e in event.logprobs)
    if event.finish_reason is not None:
        body["blanks"] = event.result["blanks"] if event.result else []
    return body


async def _stream(flight: _Request, scheduler, limits: Limits, metrics):
    finished = False
    offsets = [c.offset for c in flight.choices]
    try:
        while flight.open:
            event = await flight.events.get()
            choice = flight.take(event)
            if event.finish_reason == "error":  # an error event, then [DONE]; the other choices' slots freed
                scheduler.cancel(list(flight.open))
                flight.open.clear()
                _finish(flight, metrics)
                error = generation_error(flight, scheduler)
                log_error(COMPLETIONS, error)
                yield f"data: {json.dumps(error.body())}\n\n"
                yield "data: [DONE]\n\n"
                finished = True
                return
            yield chunk(flight.id, flight.created, limits.model_name, [_delta(flight, choice, event, offsets)])
        _finish(flight, metrics)
        if flight.req.include_usage:
            yield chunk(flight.id, flight.created, limits.model_name, [], flight.usage())
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:  # the client went away (or the server is stopping): free the slots
            scheduler.cancel(list(flight.open))
            metrics.request("cancelled")
