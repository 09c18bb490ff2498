"""The transport-independent service: what HTTP routes and gRPC methods both call.

It owns the replica's :class:`SAEEngine` and turns the shared request models
(:mod:`server.models`) into engine calls. Every check that can fail because of the
client happens here, *before* a request is handed to vLLM, and raises :class:`ApiError`
(field named); the transports only map that to a status code.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np

from sae_runtime import vllm_surface
from sae_runtime.engine.engine import SAEEngine
from sae_runtime.engine.outputs import GenerationChunk, TokenFeatures
from sae_runtime.engine.spec import (
    FeatureRequest,
    SAERequestSpec,
    SpecError,
    SpecLimits,
    SteeringSpec,
    check_response_budget,
    steering_applied,
)
from sae_runtime.hook_points import parse_hook_point
from sae_runtime.registry import UnknownDictionaryError
from sae_runtime.unembedding import Unembedding
from server import dictionary_summary, index_views
from server.errors import ApiError, ErrorKind, translate
from server.metrics import ServiceMetrics
from server.models import (
    MAX_CONTRAST_TEXTS,
    MAX_STORED_VECTORS,
    DictionaryInfoOut,
    DictionaryList,
    DictionarySummary,
    ExampleSearchHit,
    ExtractRequest,
    ExtractResponse,
    FeatureInfoOut,
    FeatureSearchResponse,
    GenerateChunkOut,
    GenerateRequest,
    ModelCard,
    ModelList,
    ProjectedFeature,
    PromptInput,
    SearchByExampleRequest,
    SearchByExampleResponse,
    SteeringApplied,
    SteeringVector,
    SteeringVectorCreate,
    SteeringVectorDeleted,
    SteeringVectorInfo,
    SteeringVectorList,
    TokenFeaturesOut,
    TokenScore,
    Usage,
    VectorProjectionInfo,
)
from server.vector_store import MemoryVectorStore, VectorStore

DEFAULT_GENERATE_MAX_TOKENS = 64
_VECTOR_ID = re.compile(r"vec-[0-9a-f]{16}")


class ClosingStream:
    """An async iterator over ``outer`` whose :meth:`aclose` also closes ``inner`` streams.

    An async generator that never started ignores ``aclose()`` (its ``finally`` never ran),
    so a request cancelled between opening its engine streams and reading them would leave
    them running in vLLM. This wrapper closes ``outer`` and then every ``inner`` stream
    whether or not iteration began; closing twice is harmless.
    """

    def __init__(self, outer: AsyncIterator[Any], *inner: Any):
        self._outer = outer
        self._inner = inner
        self.closed = False

    def __aiter__(self) -> ClosingStream:
        return self

    def __anext__(self) -> Any:
        return self._outer.__anext__()

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self._outer.aclose()  # type: ignore[attr-defined]
        finally:
            for stream in self._inner:
                await stream.aclose()


def project_onto_features(vector: np.ndarray, w_dec: np.ndarray, dictionary: str,
                          top_k: int) -> tuple[np.ndarray, VectorProjectionInfo]:
    """A contrastive vector's ``project_onto``: the ``top_k`` features whose decoder rows
    have the largest ``|cos(v, W_dec[i])|`` (ties: lower index; rows of norm 0 count as
    cosine 0), and ``v`` replaced by its least-squares reconstruction from those rows,
    ``Σ c_i W_dec[i]`` with ``c = argmin ‖v − Σ c_i W_dec[i]‖`` (the orthogonal projection
    of ``v`` onto their span). In float64; returns the new vector and what it is made of."""
    v = np.asarray(vector, np.float64)
    w = np.asarray(w_dec, np.float64)
    row_norms = np.linalg.norm(w, axis=1)
    v_norm = float(np.linalg.norm(v))
    denom = row_norms * v_norm
    dots = w @ v
    cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
    order = np.lexsort((np.arange(len(cos)), -np.abs(cos)))[:top_k]
    coef, *_ = np.linalg.lstsq(w[order].T, v, rcond=None)
    projected = w[order].T @ coef
    info = VectorProjectionInfo(
        dictionary=dictionary, top_k=top_k, unprojected_norm=v_norm,
        explained=float(projected @ projected) / (v_norm * v_norm) if v_norm > 0 else 0.0,
        features=[ProjectedFeature(feature=int(f), coefficient=float(c), cosine=float(cos[f]))
                  for f, c in zip(order, coef, strict=True)])
    return projected, info


class SAEService:
    """One replica's API over its engine."""

    def __init__(self, engine: SAEEngine, metrics: ServiceMetrics | None = None, feature_top_n: int = 10,
                 max_concurrent_streams: int | None = None, vectors: VectorStore | None = None,
                 direct_ingress: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None):
        self.engine = engine
        # the replicas' own addresses (--direct-ingress) for /health?detail=1, None without it
        self.direct_ingress = direct_ingress
        self.vectors = vectors or MemoryVectorStore()
        self.metrics = metrics or ServiceMetrics()
        self.feature_top_n = feature_top_n
        self.max_concurrent_streams = max_concurrent_streams
        self.open_streams = 0
        self._unembedding: Unembedding | None = None
        self._token_text: dict[int, str] = {}
        receiver = getattr(engine, "receiver", None)
        if receiver is not None:
            self.metrics.watch_feature_channel(receiver)

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    @property
    def limits(self) -> SpecLimits:
        limits = getattr(self.engine, "limits", None)
        return limits if isinstance(limits, SpecLimits) else SpecLimits()

    # -- bookkeeping ---------------------------------------------------------------------

    @asynccontextmanager
    async def observed(self, endpoint: str, transport: str) -> AsyncIterator[None]:
        """Count and time a request; the outcome label is ok / client_error / error."""
        start = time.perf_counter()
        outcome = "ok"
        try:
            yield
        except ApiError as exc:
            outcome = "client_error" if exc.http_status < 500 else "error"
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            self.metrics.observe(endpoint, transport, outcome, time.perf_counter() - start)

    # -- limits and health ---------------------------------------------------------------

    def acquire_stream(self) -> None:
        """Take a streaming slot or refuse with 429 / RESOURCE_EXHAUSTED; pair with :meth:`release_stream`."""
        if self.max_concurrent_streams is not None and self.open_streams >= self.max_concurrent_streams:
            raise ApiError(ErrorKind.TOO_MANY, f"this replica already serves {self.open_streams} streams, the limit "
                           f"(max_concurrent_streams={self.max_concurrent_streams}); retry later", "stream")
        self.open_streams += 1

    def release_stream(self) -> None:
        self.open_streams = max(0, self.open_streams - 1)

    def _engine_running(self) -> bool:
        llm = getattr(self.engine, "llm", None)
        return llm is not None and not vllm_surface.engine_errored(llm)

    def channel_failure(self) -> str | None:
        """Why the feature side channel cannot deliver features (None while it works)."""
        receiver = getattr(self.engine, "receiver", None)
        if receiver is None or receiver.healthy:
            return None
        return (f"{receiver.failure or 'the feature side channel is closed'}; the deployment is replacing this "
                "replica, retry in a minute")

    def engine_alive(self) -> bool:
        """True while this replica can serve everything: a running vLLM engine and a working
        feature side channel. ``/health``, gRPC health and Ray Serve's health check
        (``SAEDeployment.check_health``) use it, so a failed side channel makes Ray replace
        the replica like a dead engine does."""
        return self._engine_running() and self.channel_failure() is None

    def check_engine(self, needs_features: bool = False) -> None:
        """503 / UNAVAILABLE at once when the engine died, or when the request needs features
        and the side channel failed (the replica is about to be replaced)."""
        if not self._engine_running():
            from server.errors import ENGINE_DEAD_MESSAGE

            raise ApiError(ErrorKind.UNAVAILABLE, ENGINE_DEAD_MESSAGE)
        failure = self.channel_failure() if needs_features else None
        if failure is not None:
            raise ApiError(ErrorKind.UNAVAILABLE, failure)

    async def health(self, detail: bool = False) -> dict[str, Any]:
        """``ok`` with a live engine, else ``unhealthy``; ``detail`` adds the engine's request state."""
        alive = self.engine_alive()
        out: dict[str, Any] = {"status": "ok" if alive else "unhealthy", "model": self.model_name,
                               "dictionaries": self.engine.registry.ids()}
        if not alive:
            out["reason"] = "the vLLM engine stopped" if not self._engine_running() else self.channel_failure()
        if detail:
            out["open_streams"] = self.open_streams
            out["replica"] = self.metrics.replica
            receiver = getattr(self.engine, "receiver", None)
            if receiver is not None:
                out["feature_channel"] = receiver.stats()
            if alive:
                try:
                    out["engine_unfinished_requests"] = vllm_surface.unfinished_requests(self.engine.llm)
                    stats = await asyncio.wait_for(self.engine.worker_stats(), 10)
                    shown = ("tracked_requests", "requests_with_spec", "steps", "cpu_threads_bind")
                    out["workers"] = [{k: v for k, v in w.items() if k in shown} for w in stats]
                except Exception as exc:  # report, never fail the health answer itself
                    out["detail_error"] = type(exc).__name__
            if self.direct_ingress is not None:
                try:
                    out["direct_ingress"] = await asyncio.wait_for(self.direct_ingress(), 10)
                except Exception as exc:
                    out["direct_ingress_error"] = type(exc).__name__
        return out

    # -- prompts and specs ---------------------------------------------------------------

    @property
    def supports_chat(self) -> bool:
        """Whether the model has a chat template (else chat prompts are refused with 400)."""
        return bool(getattr(self.engine, "has_chat_template", True))

    def require_chat_template(self, field: str = "messages",
                              instead: str = "send plain text ('text') instead of chat messages") -> None:
        """Refuse a chat prompt (400 / INVALID_ARGUMENT naming ``field``) for a model without a
        chat template, before anything reaches the engine."""
        if not self.supports_chat:
            raise ApiError.invalid(field, f"model '{self.model_name}' has no chat template; {instead}")

    def encode(self, prompt: PromptInput, field: str = "messages") -> list[int]:
        """Token ids of a text prompt or of a chat (with the model's chat template)."""
        if prompt.text is not None:
            ids = self.engine.encode_text(prompt.text)
            field = "text"
        else:
            self.require_chat_template(field)
            try:
                messages = [{"role": m.role, "content": m.text()} for m in prompt.messages or []]
                ids = self.engine.encode_chat(messages)
            except ValueError as exc:
                raise ApiError.invalid(field, str(exc)) from None
            except Exception as exc:  # a chat template rejects e.g. a bad role order
                raise ApiError.invalid(field, f"cannot apply the chat template: {exc}") from None
        if not ids:
            raise ApiError.invalid(field, "is empty")
        return ids

    def check_budget(self, prompt_ids: list[int], max_tokens: int | None, field: str = "max_tokens") -> int:
        """Refuse prompts over the context; return max_tokens (default: what fits)."""
        room = self.max_model_len - len(prompt_ids)
        if room <= 0:
            raise ApiError.invalid(
                "prompt", f"has {len(prompt_ids)} tokens; the model's context is {self.max_model_len} tokens")
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise ApiError.invalid(
                field, f"{max_tokens} tokens requested but the prompt has {len(prompt_ids)} tokens and the "
                f"model's context is {self.max_model_len}: at most {room} can be generated")
        return max_tokens

    def check_response_budget(self, features: FeatureRequest | None, prompt_tokens: int, max_tokens: int,
                              choices: int = 1, *, max_tokens_field: str = "max_tokens",
                              max_tokens_defaulted: bool = False,
                              lower: str = "lower max_tokens, n, top_k or feature_ids") -> None:
        """Refuse (400 naming ``features``) a response that would carry more feature values than
        ``max_response_feature_values``; call it after :meth:`build_spec`, before the engine."""
        if features is None:
            return
        parts = []
        if features.scope in ("prompt", "all"):
            parts.append(f"{prompt_tokens} prompt")
        if features.scope in ("generated", "all"):
            parts.append(f"{max_tokens} {max_tokens_field}"
                         + (f" (not given: the rest of the {self.max_model_len}-token context)"
                            if max_tokens_defaulted else ""))
        try:
            check_response_budget(features, prompt_tokens, max_tokens, choices,
                                  self.limits.max_response_feature_values,
                                  tokens_note=f" ({' + '.join(parts)})", lower=lower)
        except SpecError as exc:
            raise ApiError.from_spec_error(exc) from None

    def build_spec(self, features: FeatureRequest | None, steering: SteeringSpec | None) -> SAERequestSpec | None:
        """The engine spec for a request, validated against the served dictionaries."""
        if features is None and (steering is None or steering.empty):
            return None
        spec = SAERequestSpec(features=features, steering=steering)
        try:
            self.engine.validate(spec)
        except SpecError as exc:
            raise ApiError.from_spec_error(exc) from None
        if features is not None:  # normalize / labels / exclude_dense_above read the feature index
            index_views.check_feature_options(features, self.engine.registry)
            spec.features = index_views.worker_features(features, self.engine.registry, self.limits)
        return spec

    def steering_applied(self, spec: SAERequestSpec | None) -> SteeringApplied | None:
        """What a validated spec's edits resolve to, for the response's ``steering_applied``."""
        info = getattr(self.engine, "dictionary_info", None)
        return steering_applied(spec, info) if info is not None else None

    # -- token text and features ---------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.engine.tokenizer.decode([token_id])
            if len(self._token_text) < 200_000:
                self._token_text[token_id] = text
        return text

    def features_out(self, tokens: list[TokenFeatures], features: FeatureRequest | None = None
                     ) -> list[TokenFeaturesOut]:
        """The engine's features for the client, with the token's text; ``features`` (the
        client's request) applies its index options (dense features out, normalised, labelled)."""
        out = [TokenFeaturesOut(**dict(t), token=self.token_text(t.token_id)) for t in tokens]
        return index_views.apply_feature_options(out, features, self.engine.registry)

    # -- generation ----------------------------------------------------------------------

    async def open_stream(self, prompt_ids: list[int], params: Any, spec: SAERequestSpec | None,
                          request_id: str | None = None) -> tuple[GenerationChunk, AsyncIterator[GenerationChunk]]:
        """Start a generation and return its first chunk plus the rest.

        Waiting for the first chunk before answering lets streaming transports report a
        refused request with a proper status instead of failing inside a 200 stream.
        """
        self.check_engine(needs_features=spec is not None and spec.wants_features)
        if spec is not None and spec.has_steering:
            self.metrics.steered_request()
        self.metrics.tokens(prompt=len(prompt_ids))
        stream = self.engine.generate(prompt_ids, params, spec, request_id)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise ApiError(ErrorKind.INTERNAL, "the engine returned no output") from None
        except Exception as exc:
            await stream.aclose()
            api = translate(exc)
            if api is not None:
                raise api from None
            raise
        # ClosingStream: closing it aborts the request in vLLM even if it was never read.
        return first, ClosingStream(self._counted(first, stream), stream)

    async def _counted(
        self, first: GenerationChunk, rest: AsyncIterator[GenerationChunk]
    ) -> AsyncIterator[GenerationChunk]:
        try:
            for chunk in [first]:
                self._count_chunk(chunk)
                yield chunk
            async for chunk in rest:
                self._count_chunk(chunk)
                yield chunk
        finally:
            await rest.aclose()  # type: ignore[attr-defined]  # aborts the request if the client left

    def _count_chunk(self, chunk: GenerationChunk) -> None:
        self.metrics.tokens(generated=len(chunk.token_ids), extracted=len(chunk.features))

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateChunkOut]:
        """gRPC Generate: stream :class:`GenerateChunkOut`, usage on the last one."""
        from vllm import SamplingParams

        prompt_ids = self.encode(req)
        s = req.sampling
        max_tokens = self.check_budget(
            prompt_ids,
            s.max_tokens or min(DEFAULT_GENERATE_MAX_TOKENS, self.max_model_len - len(prompt_ids)),
            "sampling.max_tokens",
        )
        spec = self.build_spec(req.features, await self.resolve_steering(req.steering))
        self.check_response_budget(
            req.features,
            len(prompt_ids),
            max_tokens,
            max_tokens_field="sampling.max_tokens",
            lower="lower sampling.max_tokens, top_k or feature_ids",
        )
        params = SamplingParams(
            max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p, stop=s.stop or None, seed=s.seed
        )
        applied = self.steering_applied(spec)
        _first, stream = await self.open_stream(prompt_ids, params, spec)
        return ClosingStream(self._generate_chunks(len(prompt_ids), stream, req.features, applied), stream)

    async def _generate_chunks(
        self, prompt_len: int, stream: AsyncIterator[GenerationChunk], features: FeatureRequest | None = None,
        applied: SteeringApplied | None = None,
    ) -> AsyncIterator[GenerateChunkOut]:
        generated = 0
        try:
            async for chunk in stream:
                generated = chunk.num_generated_tokens
                yield GenerateChunkOut(
                    token_ids=chunk.token_ids,
                    text=chunk.text,
                    features=self.features_out(chunk.features, features),
                    finished=chunk.finished,
                    finish_reason=chunk.finish_reason,
                    usage=Usage(
                        prompt_tokens=prompt_len, completion_tokens=generated, total_tokens=prompt_len + generated
                    )
                    if chunk.finished
                    else None,
                    steering_applied=applied,
                )
                applied = None
        finally:
            await stream.aclose()  # type: ignore[attr-defined]  # aborts the request if the client left

    # -- features ------------------------------------------------------------------------

    async def extract(self, req: ExtractRequest) -> ExtractResponse:
        """Features of every prompt token: one forward pass, nothing generated."""
        prompt_ids = self.encode(req)
        self.check_budget(prompt_ids, 1, "text" if req.text is not None else "messages")
        spec = self.build_spec(req.features.model_copy(update={"scope": "prompt"}), None)
        assert spec is not None
        self.check_response_budget(
            spec.features, len(prompt_ids), 0, lower="send a shorter prompt, or lower top_k or feature_ids"
        )
        self.check_engine(needs_features=True)
        try:
            tokens = await self.engine.extract(prompt_ids, spec.features)
        except Exception as exc:
            api = translate(exc)  # bad spec: 400/404; dead engine: 503
            if api is None:
                raise
            raise api from None
        self.metrics.tokens(prompt=len(prompt_ids), extracted=len(tokens))
        return ExtractResponse(model=self.model_name, tokens=self.features_out(tokens, req.features))

    def list_models(self) -> ModelList:
        return ModelList(
            data=[ModelCard(id=self.model_name, max_model_len=self.max_model_len, supports_chat=self.supports_chat)]
        )

    def list_dictionaries(self) -> DictionaryList:
        return DictionaryList(
            data=[
                DictionaryInfoOut(**{k: v for k, v in d.items() if k in DictionaryInfoOut.model_fields})
                for d in self.engine.registry.describe()
            ]
        )

    def unembedding(self) -> Unembedding:
        if self._unembedding is None:
            self._unembedding = Unembedding.load(self.engine.model_dir)
        return self._unembedding

    def _dictionary(self, dictionary: str, field: str = "dictionary") -> Any:
        try:
            return self.engine.registry.get(dictionary)
        except UnknownDictionaryError as exc:
            raise ApiError.not_found(field, str(exc)) from None

    def feature_info(self, dictionary: str, feature: int, top_n: int | None = None,
                     examples: int | None = None) -> FeatureInfoOut:
        """Decoder norm, density and the tokens feature ``feature`` promotes/suppresses, and
        what the dictionary's feature index holds about it (``examples``: how many of its
        max-activating contexts)."""
        entry = self._dictionary(dictionary)
        if not 0 <= feature < entry.d_sae:
            raise ApiError.not_found(
                "feature", f"feature {feature} out of range for '{dictionary}' (d_sae={entry.d_sae})"
            )
        top_n = self.feature_top_n if top_n is None else top_n
        if not 1 <= top_n <= 1000:
            raise ApiError.invalid("top_n", f"must be between 1 and 1000 (got {top_n})")
        d_i = entry.dictionary.W_dec[feature].detach().float().cpu()
        promoted, suppressed = self.unembedding().top_tokens(d_i, top_n)
        examples = index_views.DEFAULT_EXAMPLES if examples is None else examples
        if not 0 <= examples <= index_views.MAX_EXAMPLES:
            raise ApiError.invalid("examples", f"must be between 0 and {index_views.MAX_EXAMPLES} (got {examples})")
        sparsity = entry.dictionary.sparsity
        density = None if sparsity is None else float(10.0 ** sparsity[feature])
        card = None
        if entry.index is not None:
            card = index_views.index_card(entry.index, feature, examples, self.token_text)
            density = card.density
        return FeatureInfoOut(
            dictionary=entry.id,
            feature=feature,
            hook_point=entry.hook_point,
            decoder_norm=float(d_i.norm()),
            top_promoted=[TokenScore(token_id=t, token=self.token_text(t), score=s) for t, s in promoted],
            top_suppressed=[TokenScore(token_id=t, token=self.token_text(t), score=s) for t, s in suppressed],
            density=density,
            has_index=card is not None,
            index=card,
        )

    # -- the feature index: search ---------------------------------------------------------

    def dictionary_summary(self, dictionary: str) -> DictionarySummary:
        """Held-out metrics, the log10-density histogram of its features (from the index) and
        the training curves of one dictionary (server/dictionary_summary.py)."""
        entry = self._dictionary(dictionary)
        return dictionary_summary.summary(entry, self.engine.registry.model_name)

    def search_features(self, dictionary: str, q: str, limit: int | None = None) -> FeatureSearchResponse:
        """Features whose index label or top tokens match every word of ``q`` (as prefixes)."""
        entry = self._dictionary(dictionary)
        index = index_views.require_index(entry)
        hits = index_views.search(index, q, 20 if limit is None else limit)
        return FeatureSearchResponse(dictionary=entry.id, query=q, results=hits)

    async def search_by_example(self, req: SearchByExampleRequest) -> SearchByExampleResponse:
        """Features ranked by how strongly the texts make them fire, relative to their indexed
        max, minus the same over the contrast texts (server/README.md, "Search by example")."""
        entry = self._dictionary(req.dictionary)
        index = index_views.require_index(entry)
        prompts = [("texts", i, t) for i, t in enumerate(req.texts)]
        prompts += [("contrast_texts", i, t) for i, t in enumerate(req.contrast_texts)]
        encoded = []
        for field, i, text in prompts:
            ids = self.engine.encode_text(text)
            if not ids:
                raise ApiError.invalid(f"{field}[{i}]", "is empty")
            if len(ids) >= self.max_model_len:
                raise ApiError.invalid(f"{field}[{i}]", f"has {len(ids)} tokens; the model's context is "
                                       f"{self.max_model_len} tokens")
            encoded.append(ids)
        d = entry.dictionary
        k = min(self.limits.max_top_k, entry.d_sae, *([d.k] if d.activation == "topk" and d.k else []))
        features = FeatureRequest(dictionaries=[entry.id], top_k=k, scope="prompt")
        spec = self.build_spec(features, None)
        assert spec is not None and spec.features is not None
        for ids in encoded:
            self.check_response_budget(spec.features, len(ids), 0, lower="send shorter texts")
        self.check_engine(needs_features=True)
        try:
            results = await asyncio.gather(*(self.engine.extract(ids, spec.features) for ids in encoded))
        except Exception as exc:
            api = translate(exc)
            if api is None:
                raise
            raise api from None
        self.metrics.tokens(prompt=sum(map(len, encoded)), extracted=sum(map(len, results)))
        maxes = index.max_activations
        skip = set(getattr(self.engine.tokenizer, "all_special_ids", None) or ())
        per_text = []
        for (field, i, _text), tokens in zip(prompts, results, strict=True):
            scores = index_views.text_scores(self.features_out(tokens), entry.id, maxes, skip)
            if scores is None:
                raise ApiError.invalid(f"{field}[{i}]", "has no token to score: the first token and special "
                                       "tokens are left out (they carry attention-sink activations)")
            per_text.append(scores)
        n = len(req.texts)
        ranked = index_views.example_scores(per_text[:n], per_text[n:])
        dens = index.densities
        if req.exclude_dense_above is not None:
            ranked = {f: v for f, v in ranked.items() if dens[f] <= req.exclude_dense_above}
        top = sorted(ranked.items(), key=lambda fv: (-fv[1], fv[0]))[: req.limit]
        labels = index.labels(f for f, _ in top)
        return SearchByExampleResponse(dictionary=entry.id, results=[
            ExampleSearchHit(feature=f, score=v, label=labels.get(f, ""), max_activation=float(maxes[f]),
                             density=float(dens[f])) for f, v in top])

    # -- stored contrastive steering vectors ---------------------------------------------

    def _contrast_ids(self, side: str, items: list[Any]) -> list[list[int]]:
        if len(items) > MAX_CONTRAST_TEXTS:
            raise ApiError.invalid(side, f"at most {MAX_CONTRAST_TEXTS} texts (got {len(items)})")
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                ids = self.engine.encode_text(item)
                if not ids:
                    raise ApiError.invalid(f"{side}[{i}]", "is empty")
            else:
                ids = self.encode(PromptInput(messages=item), f"{side}[{i}]")
            if len(ids) >= self.max_model_len:
                raise ApiError.invalid(f"{side}[{i}]", f"has {len(ids)} tokens; the model's context is "
                                       f"{self.max_model_len}")
            out.append(ids)
        return out

    def _scored_rows(self, ids: list[int], stream: Any) -> Any:
        """The rows of one text that a contrastive mean averages: every position but 0, and
        no special token (BOS, chat-template control tokens)."""
        special = set(getattr(self.engine.tokenizer, "all_special_ids", []) or [])
        keep = [p for p in range(1, len(ids)) if ids[p] not in special]
        return stream[keep]

    async def create_vector(self, req: SteeringVectorCreate) -> SteeringVectorInfo:
        """Difference of the mean residual streams of ``positive`` and ``negative`` at the hook
        point (pooled over every scored token of each side), stored for the deployment."""
        import torch

        try:
            (layer,) = self.engine.stream_layers([req.hook_point])
        except SpecError as exc:
            raise ApiError(ErrorKind.NOT_FOUND if "not a hook point" in exc.message else ErrorKind.INVALID,
                           exc.message, "hook_point") from None
        hook_point = "embeddings" if layer == -1 else f"layers.{layer}"
        projection = None
        if req.project_onto is not None:
            projection = self._dictionary(req.project_onto.dictionary, "project_onto.dictionary")
            if parse_hook_point(projection.hook_point) != layer:
                raise ApiError.invalid("project_onto.dictionary", f"'{projection.id}' is at {projection.hook_point}, "
                                       f"the vector at {hook_point}: project onto a dictionary at the vector's hook "
                                       "point")
            most = min(projection.d_sae, projection.d_in)
            if req.project_onto.top_k > most:
                raise ApiError.invalid("project_onto.top_k", f"{req.project_onto.top_k} is more than '{projection.id}' "
                                       f"can fit (at most min(d_sae, d_in) = {most})")
        pos = self._contrast_ids("positive", req.positive)
        neg = self._contrast_ids("negative", req.negative)
        if await self.vectors.count() >= MAX_STORED_VECTORS:
            raise ApiError(ErrorKind.TOO_MANY, f"this deployment keeps at most {MAX_STORED_VECTORS} steering vectors; "
                           "delete some (DELETE /v1/steering/vectors/{id})", "vectors")
        self.check_engine()
        try:
            streams = await self.engine.harvest_streams(pos + neg, [layer])
        except Exception as exc:
            api = translate(exc)
            if api is None:
                raise
            raise api from None
        means, counts = [], []
        for side, lists, rows_of in (("positive", pos, streams[:len(pos)]), ("negative", neg, streams[len(pos):])):
            rows = [self._scored_rows(ids, s[layer]) for ids, s in zip(lists, rows_of, strict=True)]
            n = sum(r.shape[0] for r in rows)
            if n == 0:
                raise ApiError.invalid(side, "has no token to average (every text is one token or special tokens)")
            means.append(torch.cat(rows).double().mean(0))
            counts.append(n)
        diff = (means[0] - means[1]).numpy()
        projected = None
        if projection is not None and req.project_onto is not None:
            diff, projected = project_onto_features(diff, projection.dictionary.W_dec.detach().double().cpu().numpy(),
                                                    projection.id, req.project_onto.top_k)
        vector = diff.astype(np.float32)
        info = SteeringVectorInfo(
            id="vec-" + uuid.uuid4().hex[:16], name=req.name,
            hook_point=hook_point, d_in=int(vector.shape[0]),
            norm=float(np.linalg.norm(vector.astype(np.float64))), n_positive=len(pos), n_negative=len(neg),
            positive_tokens=counts[0], negative_tokens=counts[1], created_at=time.time(), projection=projected)
        await self.vectors.put(info, vector)
        return info

    async def list_vectors(self) -> SteeringVectorList:
        return SteeringVectorList(data=await self.vectors.list())

    async def get_vector(self, vector_id: str, include_vector: bool = False,
                         field: str = "vector_id") -> SteeringVectorInfo:
        stored = await self.vectors.get(vector_id) if _VECTOR_ID.fullmatch(vector_id) else None
        if stored is None:
            raise ApiError.not_found(field, f"no steering vector '{vector_id}' (GET /v1/steering/vectors lists them)")
        if include_vector:
            return stored.info.model_copy(update={"vector": stored.vector.tolist()})
        return stored.info

    async def delete_vector(self, vector_id: str, field: str = "vector_id") -> SteeringVectorDeleted:
        if not (_VECTOR_ID.fullmatch(vector_id) and await self.vectors.delete(vector_id)):
            raise ApiError.not_found(field, f"no steering vector '{vector_id}'")
        return SteeringVectorDeleted(id=vector_id)

    async def resolve_steering(self, steering: SteeringSpec | None) -> SteeringSpec | None:
        """``steering`` with its concept edits resolved through the feature index (400 naming
        ``steering.edits[i].concept`` without an index or a match) and every ``vector_id``
        replaced by the stored vector and its hook point (404 naming
        ``steering.vectors[i].vector_id`` when there is none)."""
        if steering is not None and any(e.concept is not None for e in steering.edits):
            try:
                steering = self.engine.resolve_concepts(steering)
            except SpecError as exc:
                raise ApiError.from_spec_error(exc) from None
        if steering is None or not any(v.vector_id is not None for v in steering.vectors):
            return steering
        vectors = []
        for i, v in enumerate(steering.vectors):
            if v.vector_id is None:
                vectors.append(v)
                continue
            where = f"steering.vectors[{i}]"
            info = await self.get_vector(v.vector_id, include_vector=True, field=f"{where}.vector_id")
            if v.hook_point is not None and v.hook_point != info.hook_point:
                raise ApiError.invalid(f"{where}.hook_point", f"'{v.hook_point}' is not the hook point of vector "
                                       f"'{v.vector_id}' ({info.hook_point}); leave it out")
            vectors.append(SteeringVector(hook_point=info.hook_point, vector=info.vector, scale=v.scale,
                                          scope=v.scope))
        return steering.model_copy(update={"vectors": vectors})
