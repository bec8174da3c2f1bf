"""What every route shares: the body read up to --max-request-bytes, and error answers (an OpenAI-shaped JSON body
and one console line each)."""
from fastapi import Request
from fastapi.responses import JSONResponse

from server.protocol import ApiError, body_too_large


def route_of(request: Request) -> str:
    return f"{request.method} {request.url.path}"


def log_error(route: str, error: ApiError) -> None:
    """One console line per request answered with an error: status, route, the field at fault, the message."""
    print(f"> {error.status} {route} ({error.param or '-'}): {error.message}", flush=True)


def error_response(error: ApiError, route: str) -> JSONResponse:
    log_error(route, error)
    return JSONResponse(error.body(), status_code=error.status)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes: from Content-Length before reading, else while reading."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise body_too_large(limit, int(declared))
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise body_too_large(limit)
    return bytes(body)
