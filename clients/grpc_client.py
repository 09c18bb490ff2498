"""Typed Python clients for the sae-serve gRPC API (sync :class:`SAEClient`, async :class:`AsyncSAEClient`).

Both take and return the wire contract's pydantic models (:mod:`sae_wire.models`, the
ones the server validates with), converted by the one converter both sides use
(:mod:`sae_wire.convert`), so a request is built and validated the same way on both
sides. Neither needs torch or vLLM: ``pip install sae-serve``. Only *safe* calls are
retried (ExtractFeatures, ListDictionaries, GetFeature:
read-only, idempotent) and only on UNAVAILABLE (replica starting or restarting) with
exponential backoff; Generate is never retried, since a retry could duplicate a
(sampled) generation the caller already partly consumed.

A server started with API keys needs ``api_key=`` (sent as ``authorization: Bearer KEY``
metadata on every call); one started with ``--tls-cert`` needs ``tls=True`` and, for a
certificate not signed by a public CA (self-signed), ``tls_ca="ca.pem"`` (a path or PEM
bytes; implies ``tls``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from sae_wire import convert as conv
from sae_wire import sae_serve_pb2 as pb
from sae_wire import sae_serve_pb2_grpc as pb_grpc
from sae_wire.models import (
    ChatMessage,
    DictionaryInfoOut,
    ExtractResponse,
    FeatureInfoOut,
    FeatureRequest,
    FeatureSearchResponse,
    GenerateChunkOut,
    SamplingOptions,
    SearchByExampleRequest,
    SearchByExampleResponse,
    SteeringSpec,
    SteeringVectorCreate,
    SteeringVectorInfo,
)

DEFAULT_TARGET = "127.0.0.1:50051"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
T = TypeVar("T")


# -- request builders shared by both clients ---------------------------------------------------

def feature_request_msg(dictionary: str, feature: int, top_n: int | None, examples: int | None
                        ) -> pb.GetFeatureRequest:
    req = pb.GetFeatureRequest(dictionary=dictionary, feature=feature)
    if top_n is not None:
        req.top_n = top_n
    if examples is not None:
        req.examples = examples
    return req


def search_request_msg(dictionary: str, q: str, limit: int | None) -> pb.SearchFeaturesRequest:
    req = pb.SearchFeaturesRequest(dictionary=dictionary, q=q)
    if limit is not None:
        req.limit = limit
    return req



def _prompt(text: str | None, messages: Sequence[ChatMessage | dict[str, Any]] | None) -> dict[str, Any]:
    if (text is None) == (messages is None):
        raise ValueError("give exactly one of text= or messages=")
    return {"text": text} if text is not None else {"messages": list(messages or [])}


def extract_request(features: FeatureRequest | dict, text: str | None, messages: Any) -> pb.ExtractFeaturesRequest:
    return conv.extract_request_pb({**_prompt(text, messages), "features": features})


def generate_request(
    text: str | None,
    messages: Any,
    sampling: SamplingOptions | dict | None,
    features: FeatureRequest | dict | None,
    steering: SteeringSpec | dict | None,
) -> pb.GenerateRequest:
    request: dict[str, Any] = {**_prompt(text, messages), "sampling": sampling or {}}
    if features is not None:
        request["features"] = features
    if steering is not None:
        request["steering"] = steering
    return conv.generate_request_pb(request)


class _RetryPolicy:
    def __init__(self, attempts: int = 4, first_delay_s: float = 0.5, max_delay_s: float = 5.0):
        self.attempts = max(1, attempts)
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s

    def delays(self) -> Iterator[float]:
        d = self.first_delay_s
        for _ in range(self.attempts - 1):
            yield d
            d = min(d * 2, self.max_delay_s)


def call_metadata(application: str | None, api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """Metadata sent with every call: Ray Serve's ``application`` routing and the API key."""
    md: list[tuple[str, str]] = []
    if application:  # Ray Serve routes by the 'application' metadata when several apps are served
        md.append(("application", application))
    if api_key:
        if any(c.isspace() for c in api_key) or not api_key.isprintable():
            raise ValueError("api_key must be printable without spaces")
        md.append(("authorization", f"Bearer {api_key}"))
    return tuple(md) or None


def channel_credentials(tls: bool, tls_ca: str | bytes | None) -> grpc.ChannelCredentials | None:
    """TLS credentials (``tls_ca``: a PEM file path or PEM bytes; None = the system's roots), or None."""
    if not tls and tls_ca is None:
        return None
    root = None
    if tls_ca is not None:
        if isinstance(tls_ca, bytes):
            root = tls_ca
        else:
            with open(tls_ca, "rb") as f:
                root = f.read()
    return grpc.ssl_channel_credentials(root_certificates=root)


class SAEClient:
    """Blocking client. ``with SAEClient(api_key=...) as c: c.extract("Hello", features={...})``."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float = 120.0,
        retry_attempts: int = 4,
        application: str | None = None,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: str | bytes | None = None,
    ):
        creds = channel_credentials(tls, tls_ca)
        self.channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
        self.stub = pb_grpc.SAEServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.retry = _RetryPolicy(retry_attempts)
        self.metadata = call_metadata(application, api_key)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SAEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _safe(self, call: Callable[..., T], request: Any) -> T:
        delays = self.retry.delays()
        while True:
            try:
                return call(request, timeout=self.timeout_s, metadata=self.metadata)
            except grpc.RpcError as exc:
                delay = next(delays, None)
                if exc.code() not in RETRYABLE or delay is None:
                    raise
                time.sleep(delay)

    def extract(
        self, text: str | None = None, *, messages: Any = None, features: FeatureRequest | dict
    ) -> ExtractResponse:
        resp = self._safe(self.stub.ExtractFeatures, extract_request(features, text, messages))
        return conv.extract_response_from_pb(resp)

    def generate(
        self,
        text: str | None = None,
        *,
        messages: Any = None,
        sampling: SamplingOptions | dict | None = None,
        features: FeatureRequest | dict | None = None,
        steering: SteeringSpec | dict | None = None,
    ) -> Iterator[GenerateChunkOut]:
        """Stream chunks; never retried. Stop iterating (or close) to cancel the request."""
        call = self.stub.Generate(
            generate_request(text, messages, sampling, features, steering),
            timeout=self.timeout_s,
            metadata=self.metadata,
        )
        try:
            for m in call:
                yield conv.generate_chunk_from_pb(m)
        finally:
            call.cancel()

    def list_dictionaries(self) -> list[DictionaryInfoOut]:
        resp = self._safe(self.stub.ListDictionaries, pb.ListDictionariesRequest())
        return [conv.dictionary_from_pb(d) for d in resp.dictionaries]

    def get_feature(self, dictionary: str, feature: int, top_n: int | None = None,
                    examples: int | None = None) -> FeatureInfoOut:
        return conv.feature_info_from_pb(self._safe(self.stub.GetFeature,
                                                    feature_request_msg(dictionary, feature, top_n, examples)))

    def search_features(self, dictionary: str, q: str, limit: int | None = None) -> FeatureSearchResponse:
        req = search_request_msg(dictionary, q, limit)
        return conv.search_features_response_from_pb(self._safe(self.stub.SearchFeatures, req))

    def search_by_example(self, request: SearchByExampleRequest | dict) -> SearchByExampleResponse:
        req = conv.search_by_example_request_pb(request)
        return conv.search_by_example_response_from_pb(self._safe(self.stub.SearchByExample, req))

    def create_steering_vector(self, request: SteeringVectorCreate | dict) -> SteeringVectorInfo:
        """A contrastive steering vector, stored by the server; not retried (not idempotent)."""
        msg = conv.steering_vector_create_pb(request)
        return conv.steering_vector_info_from_pb(
            self.stub.CreateSteeringVector(msg, timeout=self.timeout_s, metadata=self.metadata))

    def list_steering_vectors(self) -> list[SteeringVectorInfo]:
        resp = self._safe(self.stub.ListSteeringVectors, pb.ListSteeringVectorsRequest())
        return [conv.steering_vector_info_from_pb(v) for v in resp.vectors]

    def get_steering_vector(self, vector_id: str, include_vector: bool = False) -> SteeringVectorInfo:
        ref = pb.SteeringVectorRef(id=vector_id, include_vector=include_vector)
        return conv.steering_vector_info_from_pb(self._safe(self.stub.GetSteeringVector, ref), include_vector)

    def delete_steering_vector(self, vector_id: str) -> bool:
        return self._safe(self.stub.DeleteSteeringVector, pb.SteeringVectorRef(id=vector_id)).deleted


class AsyncSAEClient:
    """asyncio client with the same methods as :class:`SAEClient` (``await`` / ``async for``)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float = 120.0,
        retry_attempts: int = 4,
        application: str | None = None,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: str | bytes | None = None,
    ):
        creds = channel_credentials(tls, tls_ca)
        self.channel = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.SAEServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.retry = _RetryPolicy(retry_attempts)
        self.metadata = call_metadata(application, api_key)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncSAEClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _safe(self, call: Callable[..., Any], request: Any) -> Any:
        delays = self.retry.delays()
        while True:
            try:
                return await call(request, timeout=self.timeout_s, metadata=self.metadata)
            except grpc.aio.AioRpcError as exc:
                delay = next(delays, None)
                if exc.code() not in RETRYABLE or delay is None:
                    raise
                await asyncio.sleep(delay)

    async def extract(
        self, text: str | None = None, *, messages: Any = None, features: FeatureRequest | dict
    ) -> ExtractResponse:
        resp = await self._safe(self.stub.ExtractFeatures, extract_request(features, text, messages))
        return conv.extract_response_from_pb(resp)

    async def generate(
        self,
        text: str | None = None,
        *,
        messages: Any = None,
        sampling: SamplingOptions | dict | None = None,
        features: FeatureRequest | dict | None = None,
        steering: SteeringSpec | dict | None = None,
    ) -> AsyncIterator[GenerateChunkOut]:
        call = self.stub.Generate(
            generate_request(text, messages, sampling, features, steering),
            timeout=self.timeout_s,
            metadata=self.metadata,
        )
        try:
            async for m in call:
                yield conv.generate_chunk_from_pb(m)
        finally:
            call.cancel()

    async def list_dictionaries(self) -> list[DictionaryInfoOut]:
        resp = await self._safe(self.stub.ListDictionaries, pb.ListDictionariesRequest())
        return [conv.dictionary_from_pb(d) for d in resp.dictionaries]

    async def get_feature(self, dictionary: str, feature: int, top_n: int | None = None,
                          examples: int | None = None) -> FeatureInfoOut:
        req = feature_request_msg(dictionary, feature, top_n, examples)
        return conv.feature_info_from_pb(await self._safe(self.stub.GetFeature, req))

    async def search_features(self, dictionary: str, q: str, limit: int | None = None) -> FeatureSearchResponse:
        req = search_request_msg(dictionary, q, limit)
        return conv.search_features_response_from_pb(await self._safe(self.stub.SearchFeatures, req))

    async def search_by_example(self, request: SearchByExampleRequest | dict) -> SearchByExampleResponse:
        req = conv.search_by_example_request_pb(request)
        return conv.search_by_example_response_from_pb(await self._safe(self.stub.SearchByExample, req))
