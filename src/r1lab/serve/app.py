"""The HTTP routes of `r1lab serve`: an OpenAI/DeepSeek-compatible API and the chat page.

    POST /v1/chat/completions   chat, JSON or SSE stream; <think> reasoning -> `reasoning_content`
    POST /v1/completions        raw text completion, JSON or SSE stream
    GET  /v1/models             the one model served
    GET  /v1/metrics, /metrics  tokens/s and $ per million tokens (JSON; Prometheus text)
    GET  /health                200 while the engine worker is alive, else 503
    GET  /                      the chat page (static/index.html, no external resources)

Safety by default: every /v1 route and /metrics require `Authorization: Bearer KEY` when a key is
set (401 otherwise); bodies are capped (413 beyond `max_body_bytes`, checked before parsing);
invalid requests get an OpenAI-style 400; unexpected failures get a 500 JSON error with no
traceback. Prompts and completions are written nowhere unless `log_requests` names a JSONL file.
The request handling itself is in `handlers.py`.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from r1lab.serve import protocol as P
from r1lab.serve.engine import BatchingEngine
from r1lab.serve.handlers import Server, ServeSettings
from r1lab.serve.metrics import prometheus
from r1lab.serve.prompts import ChatRenderer

__all__ = ["ServeSettings", "create_app"]

log = logging.getLogger("r1lab.serve")
STATIC = Path(__file__).parent / "static"


def _error_response(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine: BatchingEngine, renderer: ChatRenderer, settings: ServeSettings) -> FastAPI:
    """The FastAPI app; starting it starts the engine worker, stopping it stops the worker."""
    server = Server(engine, renderer, settings)
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.close()

    engine.metrics.price_per_hour = settings.price_per_hour  # one price for per-request and global cost
    app = FastAPI(title="r1lab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(P.APIError)
    async def _api_error(_req: Request, e: P.APIError) -> JSONResponse:
        if 400 <= e.status < 500 and e.status != 429:
            server.metrics.count("client_errors")
        return _error_response(e.status, e.body(), e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, e: RequestValidationError) -> JSONResponse:
        server.metrics.count("client_errors")
        return _error_response(
            400, P.error_body(f"invalid request: {e.errors()[0].get('msg', '')}", "invalid_request_error")
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error_response(
            e.status_code, P.error_body(str(e.detail), "invalid_request_error", None, code), e.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error_response(
            500, P.error_body("internal server error", "server_error", None, "internal_error")
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.completions(request)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        server.authorize(request)
        return JSONResponse(P.model_list(settings.model_name, settings.created))

    @app.get("/v1/metrics")
    async def metrics_json(request: Request) -> JSONResponse:
        server.authorize(request)
        return JSONResponse(server.metrics_snapshot())

    @app.get("/metrics")
    async def metrics_text(request: Request) -> PlainTextResponse:
        server.authorize(request)
        return PlainTextResponse(
            prometheus(server.metrics_snapshot()), media_type="text/plain; version=0.0.4"
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        return server.health()

    @app.get("/")
    async def chat_page() -> HTMLResponse:
        headers = {
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'self'; "
            "script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
        }
        return HTMLResponse(page, headers=headers)

    return app
