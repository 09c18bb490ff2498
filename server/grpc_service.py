"""gRPC methods of the deployment, served through Ray Serve's gRPC proxy.

Ray's proxy routes ``/sae_serve.v1.SAEService/Generate`` to the deployment method named
``Generate`` (the last path segment) and ``/grpc.health.v1.Health/Check`` to ``Check``,
so these are methods of a mixin the deployment class inherits. Ray passes a
serialisable ``grpc_context``; a status set on it before raising is what the client
receives (Ray otherwise reports INTERNAL), which is how :class:`ApiError` becomes
INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED.

Server reflection is provided by the proxy itself (``gRPCOptions.enable_reflection``,
off when API keys are set);
the standard health service's ``Check`` is answered by grpcio-health-checking's
servicer running in the replica, so SERVING means "a replica with a loaded engine
answered", not merely "the proxy is up".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from sae_wire import convert as conv
from sae_wire import sae_serve_pb2 as pb
from server.auth import ApiKeys
from server.errors import ApiError, ErrorKind, translate
from server.service import SAEService

logger = logging.getLogger("sae_serve.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SAEService"].full_name  # "sae_serve.v1.SAEService"
SERVICER_FUNCTIONS = [
    "sae_wire.sae_serve_pb2_grpc.add_SAEServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
WATCH_POLL_S = 5.0


class GrpcRequestError(Exception):
    """Raised after the status was set on the context, so Ray reports that status."""


def _fail(context: Any, exc: BaseException) -> GrpcRequestError:
    """Set the status for ``exc`` on the context and return the exception to raise.

    A known error maps to its code; anything else is INTERNAL with a short message, its
    traceback logged here (Ray would otherwise send the client its whole traceback).
    """
    api = translate(exc)
    if api is None:
        logger.error("unexpected error in a gRPC method", exc_info=(type(exc), exc, exc.__traceback__))
        api = ApiError(ErrorKind.INTERNAL, f"internal error ({type(exc).__name__}); the server log has the details")
    if context is not None:
        context.set_code(api.grpc_code)
        context.set_details(str(api))
    return GrpcRequestError(str(api))


class SAEGrpcMethods:
    """Mixin: requires ``self.service`` (:class:`SAEService`), ``self.max_request_bytes`` and
    ``self.api_keys`` (:class:`ApiKeys`; every method but the health service's ``Check`` checks it)."""

    service: SAEService
    max_request_bytes: int | None = None
    api_keys: ApiKeys = ApiKeys()
    _health: health.HealthServicer | None = None

    def _authorize(self, grpc_context: Any) -> None:
        self.api_keys.check_grpc(grpc_context)

    def _check_size(self, request: Any) -> None:
        """The HTTP body limit, applied to gRPC messages too (RESOURCE_EXHAUSTED over it)."""
        size = request.ByteSize()
        if self.max_request_bytes is not None and size > self.max_request_bytes:
            raise ApiError(ErrorKind.TOO_LARGE, f"request is {size} bytes; the limit is {self.max_request_bytes}")

    async def ExtractFeatures(
        self, request: pb.ExtractFeaturesRequest, grpc_context: Any = None
    ) -> pb.ExtractFeaturesResponse:
        try:
            async with self.service.observed("features.extract", "grpc"):
                self._authorize(grpc_context)
                self._check_size(request)
                resp = await self.service.extract(conv.extract_request_from_pb(request))
            return conv.extract_response_pb(resp)
        except Exception as exc:
            raise _fail(grpc_context, exc) from None

    async def Generate(
        self, request: pb.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        acquired = False
        try:
            try:
                async with self.service.observed("generate", "grpc"):
                    self._authorize(grpc_context)
                    self._check_size(request)
                    self.service.acquire_stream()  # RESOURCE_EXHAUSTED over max_concurrent_streams
                    acquired = True
                    chunks = await self.service.generate(conv.generate_request_from_pb(request))
            except Exception as exc:
                raise _fail(grpc_context, exc) from None
            try:
                # A client that cancels (or disconnects) cancels this generator: closing
                # ``chunks`` closes the engine stream, which aborts the request in vLLM.
                async with self.service.observed("generate.stream", "grpc"):
                    async for chunk in chunks:
                        yield conv.generate_chunk_pb(chunk)
            except Exception as exc:  # e.g. the engine died mid-stream: UNAVAILABLE, not INTERNAL
                raise _fail(grpc_context, exc) from None
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]
        finally:
            if acquired:
                self.service.release_stream()

    async def ListDictionaries(
        self, request: pb.ListDictionariesRequest, grpc_context: Any = None
    ) -> pb.ListDictionariesResponse:
        try:
            self._authorize(grpc_context)
            async with self.service.observed("dictionaries.list", "grpc"):
                listing = self.service.list_dictionaries()
            return pb.ListDictionariesResponse(dictionaries=[conv.dictionary_pb(d) for d in listing.data])
        except Exception as exc:
            raise _fail(grpc_context, exc) from None

    async def GetFeature(self, request: pb.GetFeatureRequest, grpc_context: Any = None) -> pb.FeatureInfo:
        try:
            async with self.service.observed("dictionaries.feature", "grpc"):
                self._authorize(grpc_context)
                info = self.service.feature_info(
                    request.dictionary, request.feature, request.top_n if request.HasField("top_n") else None,
                    request.examples if request.HasField("examples") else None,
                )
            return conv.feature_info_pb(info)
        except Exception as exc:
            raise _fail(grpc_context, exc) from None

    async def GetDictionarySummary(
        self, request: pb.GetDictionarySummaryRequest, grpc_context: Any = None
    ) -> pb.DictionarySummary:
        try:
            async with self.service.observed("dictionaries.summary", "grpc"):
                self._authorize(grpc_context)
                summary = self.service.dictionary_summary(request.dictionary)
            return conv.dictionary_summary_pb(summary)
        except Exception as exc:
            raise _fail(grpc_context, exc) from None

    async def SearchFeatures(
        self, request: pb.SearchFeaturesRequest, grpc_context: Any = None
    ) -> pb.SearchFeaturesResponse:
        try:
            async with self.service.observed("dictionaries.search", "grpc"):
                self._authorize(grpc_context)
                found = self.service.search_features(
                    request.dictionary, request.q, request.limit if request.HasField("limit") else None)
            return conv.search_features_response_pb(found)
        except Exception as exc:
            raise _fail(grpc_context, exc) from None

    async def SearchByExample(
        self, request: pb.SearchByExampleRequest, grpc_context: Any = None
    ) -> pb.SearchByExampleResponse:
        try:
            async with self.service.observed("features.search", "grpc"):
                self._authorize(grpc_context)
                self._check_size(request)
                found = await self.service.search_by_example(conv.search_by_example_request_from_pb(request))
            return conv.search_by_example_response_pb(found)
        except Exception as exc:
            raise _fail(grpc_context, exc) from None

    # -- stored contrastive steering vectors ---------------------------------------------------

    async def CreateSteeringVector(self, request: pb.CreateSteeringVectorRequest,
                                   grpc_context: Any = None) -> pb.SteeringVectorInfo:
        try:
            async with self.service.observed("steering.vectors.create", "grpc"):
                self._authorize(grpc_context)
                self._check_size(request)
                info = await self.service.create_vector(conv.steering_vector_create_from_pb(request))
            return conv.steering_vector_info_pb(info)
        except Exception as exc:
            raise _fail(grpc_context, exc) from None

    async def ListSteeringVectors(self, request: pb.ListSteeringVectorsRequest,
                                  grpc_context: Any = None) -> pb.ListSteeringVectorsResponse:
        try:
            async with self.service.observed("steering.vectors.list", "grpc"):
                self._authorize(grpc_context)
                listing = await self.service.list_vectors()
            return pb.ListSteeringVectorsResponse(vectors=[conv.steering_vector_info_pb(v) for v in listing.data])
        except Exception as exc:
            raise _fail(grpc_context, exc) from None

    async def GetSteeringVector(self, request: pb.SteeringVectorRef, grpc_context: Any = None) -> pb.SteeringVectorInfo:
        try:
            async with self.service.observed("steering.vectors.get", "grpc"):
                self._authorize(grpc_context)
                info = await self.service.get_vector(request.id, request.include_vector, field="id")
            return conv.steering_vector_info_pb(info)
        except Exception as exc:
            raise _fail(grpc_context, exc) from None

    async def DeleteSteeringVector(self, request: pb.SteeringVectorRef,
                                   grpc_context: Any = None) -> pb.DeleteSteeringVectorResponse:
        try:
            async with self.service.observed("steering.vectors.delete", "grpc"):
                self._authorize(grpc_context)
                out = await self.service.delete_vector(request.id, field="id")
            return pb.DeleteSteeringVectorResponse(id=out.id, deleted=out.deleted)
        except Exception as exc:
            raise _fail(grpc_context, exc) from None

    # -- grpc.health.v1.Health --------------------------------------------------------------

    def _health_servicer(self) -> health.HealthServicer:
        if self._health is None:
            self._health = health.HealthServicer()
        # SERVING while the engine lives; NOT_SERVING once it died (the replica is replaced).
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.service.engine_alive()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self._health.set(name, status)
        return self._health

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> health_pb2.HealthCheckResponse:
        response = self._health_servicer().Check(request, grpc_context)
        if grpc_context is not None and grpc_context.code() not in (None, grpc.StatusCode.OK):
            raise GrpcRequestError(grpc_context.details() or f"unknown service {request.service!r}")
        return response

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """Send the status now and again whenever it changes (it does not while the replica lives).

        Needs a key when keys are set (it holds a stream open); ``Check`` does not."""
        try:
            self._authorize(grpc_context)
        except ApiError as exc:
            raise _fail(grpc_context, exc) from None
        last = None
        while True:
            current = self._health_servicer().Check(request, grpc_context)
            if grpc_context is not None and grpc_context.code() not in (None, grpc.StatusCode.OK):
                # Unknown service: the standard says SERVICE_UNKNOWN in-band, not an error.
                current = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                grpc_context.set_code(grpc.StatusCode.OK)
                grpc_context.set_details("")
            if current.status != last:
                last = current.status
                yield current
            await asyncio.sleep(WATCH_POLL_S)
