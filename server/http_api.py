"""The HTTP API (FastAPI): OpenAI-compatible completions, feature endpoints, health, metrics.

Built per replica by the deployment (``__serve_build_asgi_app__``) around that replica's
:class:`SAEService`, so routes are plain functions closing over the service. Errors are
answered in OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}`` with
``param`` naming the offending field; request-body validation errors are 422, refused
values 400, unknown dictionaries/features/models 404, oversized bodies 413.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ApiError, ErrorKind
from server.models import (
    DictionaryList,
    ErrorBody,
    ErrorResponse,
    ExtractRequest,
    ExtractResponse,
    FeatureInfoOut,
    ModelList,
)
from server.openai_handler import OpenAIHandler
from server.openai_models import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest
from server.service import SAEService

logger = logging.getLogger("sae_serve.http")


def error_response(exc: ApiError) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=str(exc), type=exc.kind.value, param=exc.field,
                                         code=exc.http_status))
    return JSONResponse(body.model_dump(), status_code=exc.http_status)


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413.

    Checks Content-Length up front and counts streamed (chunked) bodies as they arrive,
    so an oversized body is never buffered whole.
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = ApiError(ErrorKind.TOO_LARGE, f"request body is larger than the limit of {self.limit} bytes")
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                await error_response(too_big)(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ApiError(ErrorKind.TOO_LARGE, too_big.message)
            return message

        await self.app(scope, limited, send)


def build_http_app(service: SAEService, max_request_bytes: int) -> FastAPI:
    app = FastAPI(title="sae-serve", version="1", docs_url="/docs", redoc_url=None)
    handler = OpenAIHandler(service)
    app.add_middleware(BodySizeLimit, limit=max_request_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # Union members add their type name to the location (e.g. 'str'); keep the field path.
        field = ".".join(loc) or None
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        err = ApiError(ErrorKind.INVALID, f"{first.get('msg')}{more}", field)
        body = ErrorResponse(error=ErrorBody(message=str(err), type=err.kind.value, param=field, code=422))
        return JSONResponse(body.model_dump(), status_code=422)

    # -- OpenAI-compatible ----------------------------------------------------------------

    async def _stream_response(endpoint: str, lines: AsyncIterator[str], ctx: Any) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for line in lines:
                    yield line
            finally:
                await ctx.__aexit__(None, None, None)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _openai(endpoint: str, req: Any, plan_fn: Any, run_fn: Any) -> Any:
        ctx = service.observed(endpoint, "http")
        await ctx.__aenter__()
        try:
            plan = plan_fn(req)
            if req.stream:
                lines = await handler.stream(req, plan)
                return await _stream_response(endpoint, lines, ctx)
            result = await run_fn(req, plan)
        except BaseException as exc:
            await ctx.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        await ctx.__aexit__(None, None, None)
        return result

    @app.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_none=True)
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        return await _openai("chat.completions", req, handler.plan_chat, handler.chat)

    @app.post("/v1/completions", response_model=Completion, response_model_exclude_none=True)
    async def completions(req: CompletionRequest) -> Any:
        return await _openai("completions", req, handler.plan_completion, handler.completion)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return service.list_models()

    # -- features -------------------------------------------------------------------------

    @app.post("/v1/features/extract", response_model=ExtractResponse)
    async def extract(req: ExtractRequest) -> ExtractResponse:
        async with service.observed("features.extract", "http"):
            return await service.extract(req)

    @app.get("/v1/dictionaries", response_model=DictionaryList)
    async def dictionaries() -> DictionaryList:
        async with service.observed("dictionaries.list", "http"):
            return service.list_dictionaries()

    @app.get("/v1/dictionaries/{dictionary:path}/features/{feature}", response_model=FeatureInfoOut)
    async def feature(dictionary: str, feature: int, top_n: int | None = None) -> FeatureInfoOut:
        # ':path' because derived ids contain a slash ("layers.6/topk-512").
        async with service.observed("dictionaries.feature", "http"):
            return service.feature_info(dictionary, feature, top_n)

    # -- operations -----------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.model_name, "dictionaries": service.engine.registry.ids()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    return app

