"""The HTTP API (FastAPI): OpenAI-compatible completions, feature endpoints, health, metrics.

Built per replica by the deployment (``__serve_build_asgi_app__``) around that replica's
:class:`SAEService`, so routes are plain functions closing over the service. Errors are
answered in OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}`` with
``param`` naming the offending field; request-body validation errors are 422, refused
values 400, unknown dictionaries/features/models 404, oversized bodies 413.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sae_runtime import vllm_surface
from server.auth import ApiKeyMiddleware, ApiKeys
from server.errors import ApiError, ErrorKind, translate
from server.faults import FEATURE_CHANNEL_ROUTE, FeatureChannelFault, kill_feature_receiver
from server.models import (
    DictionaryList,
    DictionarySummary,
    ErrorBody,
    ErrorResponse,
    ExtractRequest,
    ExtractResponse,
    FeatureInfoOut,
    FeatureSearchResponse,
    ModelList,
    SearchByExampleRequest,
    SearchByExampleResponse,
    SteeringVectorCreate,
    SteeringVectorDeleted,
    SteeringVectorInfo,
    SteeringVectorList,
)
from server.openai_handler import OpenAIHandler
from server.openai_models import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest
from server.playground import mount_playground
from server.service import SAEService

logger = logging.getLogger("sae_serve.http")


def error_response(exc: ApiError) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=str(exc), type=exc.kind.value, param=exc.field,
                                         code=exc.http_status))
    return JSONResponse(body.model_dump(), status_code=exc.http_status)


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413.

    Checks Content-Length up front. A body without one (chunked transfer encoding) is read
    here, at most ``limit`` bytes of it, before the route sees it: one byte more and the
    answer is 413 (raising inside the route's body read would turn into FastAPI's 400
    "error parsing the body"). Either way an oversized body is never buffered whole.
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = ApiError(ErrorKind.TOO_LARGE, f"request body is larger than the limit of {self.limit} bytes")
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await error_response(too_big)(scope, receive, send)
            return
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            buffered = await self._prefetch(receive)
            if buffered is None:
                await error_response(too_big)(scope, _disconnected, send)
                return
            receive = buffered
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

    async def _prefetch(self, receive: Receive) -> Receive | None:
        """Read a body of unknown length; None when it exceeds the limit, else a ``receive``
        that replays it (and then hands on to the client's, for disconnects)."""
        parts, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client left: let the app see it
                replay = [message]
                break
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                return None
            parts.append(body)
            if not message.get("more_body", False):
                replay = [{"type": "http.request", "body": b"".join(parts), "more_body": False}]
                break

        async def replayed() -> Message:
            return replay.pop(0) if replay else await receive()

        return replayed


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}


class JsonOnly:
    """ASGI middleware: a POST body must be JSON (415 naming ``content-type`` otherwise).

    A missing Content-Type or another type (form data, text/plain...) is refused here
    instead of failing later with a vague "valid dictionary" message.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            ctype = next((v for k, v in scope.get("headers", []) if k == b"content-type"), b"")
            media = ctype.split(b";", 1)[0].strip().lower()
            if media != b"application/json" and not (media.startswith(b"application/") and media.endswith(b"+json")):
                got = repr(media.decode("latin-1")[:80]) if media else "none"
                err = ApiError(ErrorKind.INVALID, f"must be application/json (got {got})", "content-type")
                body = ErrorResponse(error=ErrorBody(message=str(err), type=err.kind.value, param=err.field, code=415))
                await JSONResponse(body.model_dump(), status_code=415)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BadBody(HTTPException):
    """A body FastAPI would otherwise answer with a bare 'error parsing the body'."""

    def __init__(self, field: str, message: str):
        super().__init__(status_code=400, detail=message)
        self.field = field


def _first_bad_string(value: Any, path: str) -> str | None:
    """Path of the first string (key or value) that is not valid Unicode (a lone surrogate from a
    ``\\ud800`` escape), which the tokenizer and vLLM's IPC could not encode."""
    stack = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return p or "body"
        elif isinstance(v, dict):
            for k, item in v.items():
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    return p or "body"
                stack.append((item, f"{p}.{k}" if p else k))
        elif isinstance(v, list):
            stack.extend((item, f"{p}[{i}]") for i, item in enumerate(v))
    return None


class StrictJSONRequest(Request):
    """JSON bodies must be UTF-8 and valid Unicode; errors name the place (400, not a bare 500)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadBody("body", f"is not valid UTF-8 (invalid byte at offset {exc.start})") from None
            parsed = json.loads(text)  # JSONDecodeError: FastAPI answers 422 json_invalid
            bad = _first_bad_string(parsed, "")
            if bad is not None:
                raise BadBody(bad, "contains an unpaired UTF-16 surrogate: not valid Unicode text")
            self._json = parsed
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Any:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


class OwnedStreamingResponse(StreamingResponse):
    """A streaming response that owns a resource: ``cleanup(exc_info)`` runs exactly once when
    the response ends, however it ends: finished, failed, or cancelled because the client
    left (Ray Serve then cancels the replica's request), even before the first byte.

    Cleaning up in the body generator's ``finally`` is not enough: a generator that never
    started (the request cancelled while the headers were being sent) never runs it, and
    the stream slot and the engine requests would stay taken. ``exc_info`` is that of the
    exception that ended the body (a ``CancelledError`` when the client left), so the
    request is counted with the right outcome.
    """

    def __init__(self, lines: AsyncIterator[str], cleanup: Callable[[tuple], Any], **kwargs: Any):
        self._lines = lines
        self._cleanup: Callable[[tuple], Any] | None = cleanup
        self._exc_info: tuple = (None, None, None)
        self._finished = False
        super().__init__(self._body(), **kwargs)

    async def _body(self) -> AsyncIterator[str]:
        try:
            async for line in self._lines:
                yield line
        except BaseException as exc:
            self._exc_info = (type(exc), exc, exc.__traceback__)
            raise
        self._finished = True

    async def run_cleanup(self, exc_info: tuple = (None, None, None)) -> None:
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            await cleanup(exc_info)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except BaseException as exc:
            await asyncio.shield(self.run_cleanup(
                self._exc_info if self._exc_info[0] is not None else (type(exc), exc, exc.__traceback__)))
            raise
        exc_info = self._exc_info
        if exc_info[0] is None and not self._finished:  # Starlette saw the disconnect and stopped the body
            cancelled = asyncio.CancelledError("the client disconnected")
            exc_info = (asyncio.CancelledError, cancelled, None)
        await self.run_cleanup(exc_info)


def build_http_app(service: SAEService, max_request_bytes: int, api_keys: ApiKeys | None = None,
                   fault_injection: bool = False) -> FastAPI:
    app = FastAPI(title="sae-serve", version="1", docs_url="/docs", redoc_url=None)
    app.router.route_class = StrictJSONRoute
    handler = OpenAIHandler(service)
    # Starlette runs the last added middleware first: keys, then content type, then size.
    app.add_middleware(BodySizeLimit, limit=max_request_bytes)
    app.add_middleware(JsonOnly)
    app.add_middleware(ApiKeyMiddleware, keys=api_keys or ApiKeys())

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    vllm_errors = vllm_surface.client_error_classes()
    if vllm_errors is not None:
        vllm_client_error_class = vllm_errors[0]
        # vLLM's request models check fields in their validators with VLLMValidationError,
        # which pydantic does not wrap: answer it as a 400 naming the parameter.
        @app.exception_handler(vllm_client_error_class)
        async def _vllm_client_error(_: Request, exc: Exception) -> JSONResponse:
            return error_response(translate(exc) or ApiError(ErrorKind.INVALID, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        field = getattr(exc, "field", None) or {404: "path", 405: "method"}.get(exc.status_code, "body")
        kind = ErrorKind.NOT_FOUND if exc.status_code == 404 else ErrorKind.INVALID
        body = ErrorResponse(error=ErrorBody(message=f"{field}: {exc.detail}", type=kind.value, param=field,
                                             code=exc.status_code))
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        api = translate(exc)  # e.g. the engine died mid-request: 503, not a bare 500
        if api is None:
            logger.error("unexpected error: %s: %s", type(exc).__name__, exc)
            api = ApiError(ErrorKind.INTERNAL, f"internal error ({type(exc).__name__})")
        return error_response(api)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # Union members add their type name to the location (e.g. 'str'); keep the field path.
        # An error about the body as a whole (not JSON, not an object, empty) names 'body'.
        field = ".".join(loc) if loc and first.get("type") != "json_invalid" else "body"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        err = ApiError(ErrorKind.INVALID, f"{first.get('msg')}{more}", field)
        body = ErrorResponse(error=ErrorBody(message=str(err), type=err.kind.value, param=field, code=422))
        return JSONResponse(body.model_dump(), status_code=422)

    # -- OpenAI-compatible ----------------------------------------------------------------

    async def _stream_response(endpoint: str, lines: AsyncIterator[str], ctx: Any) -> StreamingResponse:
        async def cleanup(exc_info: tuple) -> None:
            service.release_stream()
            try:
                await lines.aclose()  # type: ignore[attr-defined]  # closes the engine streams: aborts them in vLLM
            finally:
                await ctx.__aexit__(*exc_info)

        return OwnedStreamingResponse(lines, cleanup, media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _openai(endpoint: str, req: Any, plan_fn: Any, run_fn: Any) -> Any:
        ctx = service.observed(endpoint, "http")
        await ctx.__aenter__()
        try:
            req.steering = await service.resolve_steering(req.steering)  # stored vectors by vector_id
            plan = plan_fn(req)
            if req.stream:
                service.acquire_stream()
                try:
                    lines = await handler.stream(req, plan)
                except BaseException:
                    service.release_stream()
                    raise
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

    @app.get("/v1/dictionaries/{dictionary:path}/summary", response_model=DictionarySummary)
    async def dictionary_summary(dictionary: str) -> DictionarySummary:
        async with service.observed("dictionaries.summary", "http"):
            return service.dictionary_summary(dictionary)

    @app.get("/v1/dictionaries/{dictionary:path}/features/{feature}", response_model=FeatureInfoOut)
    async def feature(dictionary: str, feature: int, top_n: int | None = None,
                      examples: int | None = None) -> FeatureInfoOut:
        # ':path' because derived ids contain a slash ("layers.6/topk-512").
        async with service.observed("dictionaries.feature", "http"):
            return service.feature_info(dictionary, feature, top_n, examples)

    @app.get("/v1/dictionaries/{dictionary:path}/features", response_model=FeatureSearchResponse)
    async def search_features(dictionary: str, q: str, limit: int | None = None) -> FeatureSearchResponse:
        async with service.observed("dictionaries.search", "http"):
            return service.search_features(dictionary, q, limit)

    @app.post("/v1/features/search", response_model=SearchByExampleResponse)
    async def search_by_example(req: SearchByExampleRequest) -> SearchByExampleResponse:
        async with service.observed("features.search", "http"):
            return await service.search_by_example(req)

    # -- stored contrastive steering vectors -----------------------------------------------

    @app.post("/v1/steering/vectors", response_model=SteeringVectorInfo, response_model_exclude_none=True)
    async def create_vector(req: SteeringVectorCreate) -> SteeringVectorInfo:
        async with service.observed("steering.vectors.create", "http"):
            return await service.create_vector(req)

    @app.get("/v1/steering/vectors", response_model=SteeringVectorList, response_model_exclude_none=True)
    async def list_vectors() -> SteeringVectorList:
        async with service.observed("steering.vectors.list", "http"):
            return await service.list_vectors()

    @app.get("/v1/steering/vectors/{vector_id}", response_model=SteeringVectorInfo,
             response_model_exclude_none=True)
    async def get_vector(vector_id: str, include_vector: bool = False) -> SteeringVectorInfo:
        async with service.observed("steering.vectors.get", "http"):
            return await service.get_vector(vector_id, include_vector)

    @app.delete("/v1/steering/vectors/{vector_id}", response_model=SteeringVectorDeleted)
    async def delete_vector(vector_id: str) -> SteeringVectorDeleted:
        async with service.observed("steering.vectors.delete", "http"):
            return await service.delete_vector(vector_id)

    # -- operations -----------------------------------------------------------------------

    @app.get("/health")
    async def health(detail: bool = False) -> JSONResponse:
        """200 ``ok`` with a live engine, 503 ``unhealthy`` otherwise; ``?detail=1`` (needs the
        API key when keys are set) adds the engine's and the workers' request counts."""
        body = await service.health(detail)
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    mount_playground(app)
    if fault_injection:
        _add_fault_routes(app, service)
    return app


def _add_fault_routes(app: FastAPI, service: SAEService) -> None:
    """``POST /debug/faults/feature-channel`` (only with ``SAE_SERVE_FAULT_INJECTION=1``, see
    :mod:`server.faults`): kill this replica's feature side-channel receiver."""
    logger.warning("fault injection is on (SAE_SERVE_FAULT_INJECTION=1): %s can kill this replica's "
                   "feature side channel; never use this in production", FEATURE_CHANNEL_ROUTE)

    @app.post(FEATURE_CHANNEL_ROUTE, include_in_schema=False)
    async def kill_feature_channel(req: FeatureChannelFault) -> dict[str, Any]:
        receiver = getattr(service.engine, "receiver", None)
        if receiver is None:
            raise ApiError(ErrorKind.NOT_FOUND, "this replica has no feature side channel")
        before = kill_feature_receiver(receiver, req.kill)
        return {"killed": req.kill, "replica": service.metrics.replica, "feature_channel_before": before}

