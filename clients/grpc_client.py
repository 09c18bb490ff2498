"""Typed Python clients for the sae-serve gRPC API (sync :class:`SAEClient`, async :class:`AsyncSAEClient`).

Both take and return the same pydantic models as the server (:mod:`server.models`, and
the engine's :class:`FeatureRequest` / :class:`SteeringSpec`), converted with the
server's own conversion code, so a request is built and validated the same way on both
sides. Only *safe* calls are retried (ExtractFeatures, ListDictionaries, GetFeature:
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
from typing import Any, AsyncIterator, Callable, Iterator, Sequence, TypeVar

import grpc

from clients.proto import sae_serve_pb2 as pb
from clients.proto import sae_serve_pb2_grpc as pb_grpc
from sae_runtime.engine.spec import FeatureRequest, SteeringSpec
from server.models import (
    ChatMessage,
    DictionaryInfoOut,
    ExtractResponse,
    FeatureInfoOut,
    GenerateChunkOut,
    SamplingOptions,
    TokenFeaturesOut,
    TokenScore,
    Usage,
)

DEFAULT_TARGET = "127.0.0.1:50051"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
T = TypeVar("T")


# -- pydantic -> proto -------------------------------------------------------------------------

def _scope(value: str | None) -> int:
    from server.grpc_convert import SCOPE_TO_PB

    return SCOPE_TO_PB[value] if value else pb.SCOPE_UNSPECIFIED


def feature_request_pb(f: FeatureRequest) -> pb.FeatureRequest:
    msg = pb.FeatureRequest(dictionaries=f.dictionaries, feature_ids=f.feature_ids or [], scope=_scope(f.scope))
    if f.top_k is not None and not f.feature_ids:
        msg.top_k = f.top_k
    return msg


def steering_pb(s: SteeringSpec) -> pb.Steering:
    from server.grpc_convert import MODE_TO_PB

    msg = pb.Steering()
    for e in s.edits:
        edit = pb.SteeringEdit(dictionary=e.dictionary, feature=e.feature, mode=MODE_TO_PB[e.mode], scope=_scope(e.scope))
        if e.value is not None:
            edit.value = e.value
        msg.edits.append(edit)
    for v in s.vectors:
        msg.vectors.append(pb.SteeringVector(hook_point=v.hook_point, vector=v.vector, scale=v.scale, scope=_scope(v.scope)))
    return msg


def _prompt(msg: Any, text: str | None, messages: Sequence[ChatMessage | dict[str, str]] | None) -> None:
    if (text is None) == (messages is None):
        raise ValueError("give exactly one of text= or messages=")
    if text is not None:
        msg.text = text
    else:
        for m in messages or []:
            m = m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m)
            msg.chat.messages.append(pb.ChatMessage(role=m.role, content=m.text()))


# -- proto -> pydantic -------------------------------------------------------------------------

def tokens_out(tokens: Sequence[pb.TokenFeatures]) -> list[TokenFeaturesOut]:
    return [
        TokenFeaturesOut(
            position=t.position, token_id=t.token_id, token=t.token, is_prompt=t.is_prompt,
            features=[{"dictionary": d.dictionary, "indices": list(d.indices) or None, "values": list(d.values)}
                      for d in t.features],
        )
        for t in tokens
    ]


def chunk_out(m: pb.GenerateResponse) -> GenerateChunkOut:
    return GenerateChunkOut(
        token_ids=list(m.token_ids), text=m.text, features=tokens_out(m.features), finished=m.finished,
        finish_reason=m.finish_reason or None,
        usage=Usage(prompt_tokens=m.usage.prompt_tokens, completion_tokens=m.usage.completion_tokens,
                    total_tokens=m.usage.total_tokens) if m.HasField("usage") else None,
    )


def dictionary_out(d: pb.DictionaryInfo) -> DictionaryInfoOut:
    from google.protobuf.json_format import MessageToDict

    return DictionaryInfoOut(id=d.id, model=d.model, hook_point=d.hook_point, architecture=d.architecture,
                             d_in=d.d_in, d_sae=d.d_sae, k=d.k if d.HasField("k") else None,
                             metrics=MessageToDict(d.metrics) if d.HasField("metrics") else None)


def feature_out(f: pb.FeatureInfo) -> FeatureInfoOut:
    def scores(xs: Sequence[pb.TokenScore]) -> list[TokenScore]:
        return [TokenScore(token_id=x.token_id, token=x.token, score=x.score) for x in xs]

    return FeatureInfoOut(dictionary=f.dictionary, feature=f.feature, hook_point=f.hook_point,
                          decoder_norm=f.decoder_norm, top_promoted=scores(f.top_promoted),
                          top_suppressed=scores(f.top_suppressed),
                          density=f.density if f.HasField("density") else None)


# -- request builders shared by both clients ---------------------------------------------------

def extract_request(features: FeatureRequest | dict, text: str | None, messages: Any) -> pb.ExtractFeaturesRequest:
    features = features if isinstance(features, FeatureRequest) else FeatureRequest.model_validate(features)
    msg = pb.ExtractFeaturesRequest(features=feature_request_pb(features))
    _prompt(msg, text, messages)
    return msg


def generate_request(text: str | None, messages: Any, sampling: SamplingOptions | dict | None,
                     features: FeatureRequest | dict | None, steering: SteeringSpec | dict | None) -> pb.GenerateRequest:
    s = sampling if isinstance(sampling, SamplingOptions) else SamplingOptions.model_validate(sampling or {})
    msg = pb.GenerateRequest(sampling=pb.SamplingOptions(temperature=s.temperature, top_p=s.top_p, stop=s.stop))
    if s.max_tokens is not None:
        msg.sampling.max_tokens = s.max_tokens
    if s.seed is not None:
        msg.sampling.seed = s.seed
    if features is not None:
        features = features if isinstance(features, FeatureRequest) else FeatureRequest.model_validate(features)
        msg.features.CopyFrom(feature_request_pb(features))
    if steering is not None:
        steering = steering if isinstance(steering, SteeringSpec) else SteeringSpec.model_validate(steering)
        msg.steering.CopyFrom(steering_pb(steering))
    _prompt(msg, text, messages)
    return msg


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

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout_s: float = 120.0, retry_attempts: int = 4,
                 application: str | None = None, api_key: str | None = None, tls: bool = False,
                 tls_ca: str | bytes | None = None):
        creds = channel_credentials(tls, tls_ca)
        self.channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
        self.stub = pb_grpc.SAEServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.retry = _RetryPolicy(retry_attempts)
        self.metadata = call_metadata(application, api_key)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SAEClient":
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

    def extract(self, text: str | None = None, *, messages: Any = None,
                features: FeatureRequest | dict) -> ExtractResponse:
        resp = self._safe(self.stub.ExtractFeatures, extract_request(features, text, messages))
        return ExtractResponse(model=resp.model, tokens=tokens_out(resp.tokens))

    def generate(self, text: str | None = None, *, messages: Any = None, sampling: SamplingOptions | dict | None = None,
                 features: FeatureRequest | dict | None = None,
                 steering: SteeringSpec | dict | None = None) -> Iterator[GenerateChunkOut]:
        """Stream chunks; never retried. Stop iterating (or close) to cancel the request."""
        call = self.stub.Generate(generate_request(text, messages, sampling, features, steering),
                                  timeout=self.timeout_s, metadata=self.metadata)
        try:
            for m in call:
                yield chunk_out(m)
        finally:
            call.cancel()

    def list_dictionaries(self) -> list[DictionaryInfoOut]:
        resp = self._safe(self.stub.ListDictionaries, pb.ListDictionariesRequest())
        return [dictionary_out(d) for d in resp.dictionaries]

    def get_feature(self, dictionary: str, feature: int, top_n: int | None = None) -> FeatureInfoOut:
        req = pb.GetFeatureRequest(dictionary=dictionary, feature=feature)
        if top_n is not None:
            req.top_n = top_n
        return feature_out(self._safe(self.stub.GetFeature, req))


class AsyncSAEClient:
    """asyncio client with the same methods as :class:`SAEClient` (``await`` / ``async for``)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout_s: float = 120.0, retry_attempts: int = 4,
                 application: str | None = None, api_key: str | None = None, tls: bool = False,
                 tls_ca: str | bytes | None = None):
        creds = channel_credentials(tls, tls_ca)
        self.channel = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.SAEServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.retry = _RetryPolicy(retry_attempts)
        self.metadata = call_metadata(application, api_key)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncSAEClient":
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

    async def extract(self, text: str | None = None, *, messages: Any = None,
                      features: FeatureRequest | dict) -> ExtractResponse:
        resp = await self._safe(self.stub.ExtractFeatures, extract_request(features, text, messages))
        return ExtractResponse(model=resp.model, tokens=tokens_out(resp.tokens))

    async def generate(self, text: str | None = None, *, messages: Any = None,
                       sampling: SamplingOptions | dict | None = None, features: FeatureRequest | dict | None = None,
                       steering: SteeringSpec | dict | None = None) -> AsyncIterator[GenerateChunkOut]:
        call = self.stub.Generate(generate_request(text, messages, sampling, features, steering),
                                  timeout=self.timeout_s, metadata=self.metadata)
        try:
            async for m in call:
                yield chunk_out(m)
        finally:
            call.cancel()

    async def list_dictionaries(self) -> list[DictionaryInfoOut]:
        resp = await self._safe(self.stub.ListDictionaries, pb.ListDictionariesRequest())
        return [dictionary_out(d) for d in resp.dictionaries]

    async def get_feature(self, dictionary: str, feature: int, top_n: int | None = None) -> FeatureInfoOut:
        req = pb.GetFeatureRequest(dictionary=dictionary, feature=feature)
        if top_n is not None:
            req.top_n = top_n
        return feature_out(await self._safe(self.stub.GetFeature, req))
