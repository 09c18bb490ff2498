"""The engine wrapper: vLLM's async engine (V1) with the SAE runtime in its worker.

One :class:`SAEEngine` per server replica. It loads the dictionary registry in the API
process (for validation and the feature endpoints), starts vLLM with the worker extension,
installs the SAE runtime in the worker with one ``collective_rpc``, and opens the feature
side channel. :meth:`SAEEngine.generate` validates a request's spec *before* the request
reaches vLLM, carries it in ``SamplingParams.extra_args``, and streams
:class:`~sae_runtime.engine.outputs.GenerationChunk` objects that hold new text and the
features of the tokens the model has read so far. :meth:`SAEEngine.harvest_streams` runs
prompts as prefills only and returns the raw residual streams at hook points (sae-train's
harvest); :meth:`SAEEngine.harvest_features` does the same for one dictionary's top-k
features (sae-index).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from sae_runtime import vllm_surface
from sae_runtime.engine.feature_channel import FeatureReceiver, RequestFeatures
from sae_runtime.engine.outputs import DictionaryFeatures, GenerationChunk, TokenFeatures
from sae_runtime.engine.spec import (
    DictionaryInfo,
    FeatureRequest,
    ModelShape,
    SAERequestSpec,
    SpecError,
    SpecLimits,
    SteeringSpec,
    resolve_concepts,
    steering_salt,
    to_worker_spec,
    validate_spec,
)
from sae_runtime.hook_points import parse_hook_point
from sae_runtime.model_info import read_model_info
from sae_runtime.protocol import (
    HOOKS_ENV,
    INSTALL_RPC,
    MODEL_OPTIONS_KEY,
    OP_NAMES,
    SPEC_KEY,
    STATS_RPC,
    STOP_AFTER_LAYER,
    WORKER_EXTENSION,
    DictionaryToLoad,
    InstallConfig,
    WorkerSpec,
)
from sae_runtime.registry import DictionaryRegistry


class EngineConfig(BaseModel):
    """How to start one engine. Defaults serve the embedded model on this CPU."""

    model: str | None = Field(default=None, description="checkpoint directory, or a hub id ORG/NAME already in the "
                              "local Hugging Face cache (nothing is downloaded); unset = the embedded default model")
    dictionaries: list[str] = Field(default_factory=list, description="dictionary directories (or hf:/sae_lens: "
                                    "names) to serve")
    dictionary_ids: list[str] | None = Field(default=None, description="client-facing ids, one per dictionary, "
                                             "same order")
    dtype: str = Field(default="float32", description="model dtype (float32 on CPU: bfloat16 gives garbage there)")
    enforce_eager: bool = Field(default=False, description="run vLLM in eager mode (starts faster, decodes slower)")
    compile_backend: str = Field(
        default="", description="torch.compile backend in compiled mode: '' = vLLM's default (Inductor); 'eager' "
        "traces the model with Dynamo and splits it as vLLM does but generates no code (starts in seconds)")
    max_model_len: int = Field(default=2048, description="context length in tokens")
    max_num_seqs: int = Field(default=64, description="sequences per engine step")
    kv_cache_gib: float = Field(default=1.0, description="KV-cache memory per engine, GiB")
    enable_prefix_caching: bool = Field(default=True, description="vLLM prefix caching")
    seed: int = Field(default=0, description="vLLM's random seed")
    feature_timeout_s: float = Field(default=60.0, description="a request's features must arrive within this "
                                     "(else 503)")
    limits: dict[str, int] = Field(default_factory=dict, description="overrides of SpecLimits fields (max_edits=N...); "
                                   "sae-serve's --max-* settings win over these")
    stream_interval: int = Field(
        default=1, ge=1, description="tokens per streamed chunk after the first, which comes at once (vLLM's "
        "stream_interval, set on each request): fewer, larger chunks cost the server less per token; the "
        "text, tokens and features are the same")
    cpu_threads_bind: str | None = Field(
        default=None, description="VLLM_CPU_OMP_THREADS_BIND of the engine's worker on CPU while it starts: "
        "'all' = one thread on each CPU this process may use, CPU ids such as '0-1', 'auto' = vLLM's choice (one "
        "thread per physical core, some left to other processes), None = leave the variable as the environment "
        "has it; the variable set in the environment wins")


DEEPEST_DICTIONARY: Literal["dictionaries"] = "dictionaries"
"""``HarvestEngineConfig.stop_after_layer`` value: the layer of the deepest dictionary served."""


class HarvestEngineConfig(EngineConfig):
    """An engine that only reads streams and features (sae-train's and sae-index's harvests).
    Not a serving setting: ``sae-serve``'s engine is a :class:`server.config.ServeEngineConfig`."""

    stop_after_layer: int | Literal["dictionaries"] | None = Field(
        default=None, description="run the model only through this decoder layer, or through the deepest "
        "dictionary's ('dictionaries'); the deeper layers are dropped when it loads, so a harvest at layers.12 "
        "of a 30-layer model computes 13 layers. The logits, hence any generated text, are meaningless")
    cpu_threads_bind: str | None = Field(
        default="all", description="as EngineConfig's, 'all' by default: a harvest has the machine to itself "
        "(twice vLLM's own choice's prefill on 2 cores, benchmarks/README.md)")


def last_layer(config: EngineConfig, registry: DictionaryRegistry, num_layers: int) -> int | None:
    """The last decoder layer the engine runs (``None``: all of them); ``ValueError`` for a
    ``stop_after_layer`` outside the model or before a dictionary's layer."""
    last = config.stop_after_layer if isinstance(config, HarvestEngineConfig) else None
    if last is None:
        return None
    if last == DEEPEST_DICTIONARY:
        if not len(registry):
            raise ValueError("stop_after_layer 'dictionaries': the engine serves no dictionary")
        return max(r.layer for r in registry)
    assert isinstance(last, int)
    if not 0 <= last < num_layers:
        raise ValueError(f"stop_after_layer {last}: the model has layers.0 .. layers.{num_layers - 1}")
    deeper = [r.id for r in registry if r.layer > last]
    if deeper:
        raise ValueError(f"stop_after_layer {last} drops the layers of dictionaries {deeper}: they hook after "
                         f"layers.{last}")
    return last


def _compilation_config(eager: bool, backend: str = "") -> dict[str, Any] | None:
    """On CUDA, make the SAE step a graph split point so it runs outside CUDA graphs.

    The step builds its plan on the host each step, which a captured graph could not
    replay. vLLM splits at its attention ops by default; we add ours to that list. On CPU
    there are no CUDA graphs, the op just stays opaque inside the compiled graph.
    """
    import torch

    if eager:
        return None
    config: dict[str, Any] = {"backend": backend} if backend else {}
    if torch.cuda.is_available():
        config["splitting_ops"] = vllm_surface.attention_splitting_ops() + list(OP_NAMES)
    return config or None


def _already_shut_down(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``AsyncLLM.shutdown`` once the engine has been shut down."""


class EngineError(RuntimeError):
    """The engine could not serve a request for a reason other than its input."""


class FeatureTimeoutError(EngineError):
    """A request's features did not arrive over the side channel in time (or the channel
    failed); the server answers 503, the request may be retried."""


def _decoder_norm_max(entry: Any) -> float | None:
    """Largest decoder-row norm of a registered dictionary (bounds steering edits), or None."""
    try:
        return float(entry.dictionary.W_dec.detach().float().norm(dim=1).max())
    except Exception:  # a stand-in without weights: the bound is simply not applied
        return None


def _max_activations(entry: Any) -> Any:
    """Per-feature max activations from a registered dictionary's feature index, or None."""
    index = getattr(entry, "index", None)
    return None if index is None else index.max_activations


class SAEEngine:
    def __init__(self, config: EngineConfig, llm: Any, registry: DictionaryRegistry, model_dir: Path,
                 model_name: str, shape: ModelShape, receiver: FeatureReceiver, tokenizer: Any,
                 last: int | None):
        self.config = config
        self.llm = llm
        self.registry = registry
        self.model_dir = model_dir
        self.model_name = model_name
        self.shape = shape
        self.receiver = receiver
        self.tokenizer = tokenizer
        self.limits = SpecLimits(**config.limits)
        self.last_layer = last
        """The last decoder layer this engine runs (``None``: every layer; see :class:`HarvestEngineConfig`)."""
        self.dictionary_info = {
            r.id: DictionaryInfo(id=r.id, hook_point=r.hook_point, d_sae=r.d_sae, k=r.k,
                                 decoder_norm_max=_decoder_norm_max(r),
                                 max_activations=_max_activations(r)) for r in registry
        }

    # -- start / stop -------------------------------------------------------------------

    @classmethod
    async def start(cls, config: EngineConfig | None = None) -> SAEEngine:
        config = config or EngineConfig()
        # Worker processes inherit the environment: the vLLM settings the SAE runtime needs
        # (KV cache size, V1 model runner, compile cache; see vllm_surface), and have our
        # vLLM plugin put the SAE step op into the decoder layers before the model is compiled.
        vllm_surface.configure_environment(config.kv_cache_gib)
        os.environ[HOOKS_ENV] = "1"

        from transformers import AutoTokenizer

        from sae_runtime.default_model import MODEL_NAME, prepare_default_model

        if config.model is None:
            info = read_model_info(prepare_default_model(), name=MODEL_NAME)
        else:
            info = read_model_info(config.model)
        model_dir, model_name = info.path, info.name
        shape = ModelShape(num_layers=info.num_layers, hidden_size=info.hidden_size)
        registry = DictionaryRegistry.load(
            config.dictionaries,
            model_name=model_name,
            num_layers=shape.num_layers,
            hidden_size=shape.hidden_size,
            ids=config.dictionary_ids,
        )
        last = last_layer(config, registry, shape.num_layers)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        with vllm_surface.cpu_threads_bind(config.cpu_threads_bind):
            llm = vllm_surface.start_async_llm(
                compilation_config=_compilation_config(config.enforce_eager, config.compile_backend),
                model=str(model_dir),
                served_model_name=model_name,
                dtype=config.dtype,
                enforce_eager=config.enforce_eager,
                max_model_len=config.max_model_len,
                max_num_seqs=config.max_num_seqs,
                seed=config.seed,
                enable_prefix_caching=config.enable_prefix_caching,
                worker_extension_cls=WORKER_EXTENSION,
                additional_config={} if last is None else {MODEL_OPTIONS_KEY: {STOP_AFTER_LAYER: last}},
            )
        receiver = FeatureReceiver()
        try:
            receiver.start()
            install = InstallConfig(
                dictionaries=[DictionaryToLoad(id=r.id, path=r.source or str(r.path)) for r in registry],
                feature_address=receiver.address,
                dtype=None,
            )
            await llm.collective_rpc(INSTALL_RPC, args=(install.encode(),))
        except BaseException:
            receiver.close()
            llm.shutdown()
            raise
        return cls(config, llm, registry, model_dir, model_name, shape, receiver, tokenizer, last)

    def shutdown(self) -> None:
        """Stop vLLM (engine core and worker processes) and close the side channel."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
            # AsyncLLM.__del__ calls shutdown() again. Its own reference cycles keep it
            # alive until interpreter exit, when the module globals that shutdown() uses
            # are gone ("TypeError: 'NoneType' object is not callable"). Everything is
            # already shut down: make that second call a no-op on this instance.
            llm.shutdown = _already_shut_down
        self.receiver.close()

    async def worker_stats(self) -> list[dict[str, Any]]:
        """Per-worker SAE state counters (tests assert finished requests are freed)."""
        return await self.llm.collective_rpc(STATS_RPC)

    # -- requests -----------------------------------------------------------------------

    def validate(self, spec: SAERequestSpec | None) -> None:
        """Raise :class:`SpecError` (naming the field) if ``spec`` cannot be served."""
        if spec is not None:
            validate_spec(spec, self.dictionary_info, self.shape, self.limits)

    def resolve_concepts(self, steering: SteeringSpec | None) -> SteeringSpec | None:
        """``steering`` with its concept edits looked up in the dictionaries' feature indexes
        (:func:`~sae_runtime.engine.spec.resolve_concepts`; :class:`SpecError` naming the concept)."""
        return resolve_concepts(steering, {r.id: getattr(r, "index", None) for r in self.registry})

    @property
    def has_chat_template(self) -> bool:
        """Whether the model's tokenizer has a chat template (GPT-2 and Pythia have none)."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat, with the model's chat template and the assistant prompt.

        Raises ``ValueError`` naming the model when it has no chat template.
        """
        if not self.has_chat_template:
            raise ValueError(f"model {self.model_name!r} has no chat template, so chat messages cannot be "
                             "turned into a prompt; send plain text instead")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling_params: Any,
        spec: SAERequestSpec | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[GenerationChunk, None]:
        """Stream one request. ``sampling_params`` is a vLLM ``SamplingParams`` (copied).

        Invalid specs raise :class:`SpecError` before anything is sent to vLLM. Closing the
        iterator early aborts the request in vLLM (and so frees its worker state).
        """
        from vllm import SamplingParams

        if not isinstance(sampling_params, SamplingParams):
            raise TypeError("sampling_params must be a vllm.SamplingParams")
        if self.last_layer is not None and sampling_params.max_tokens != 1:
            raise EngineError(f"this engine stops after layers.{self.last_layer} (HarvestEngineConfig."
                              f"stop_after_layer): it reads prompts (max_tokens=1), its text would be meaningless")
        if not prompt_token_ids:
            raise SpecError("prompt", "is empty")
        if len(prompt_token_ids) >= self.config.max_model_len:
            raise SpecError(
                "prompt",
                f"has {len(prompt_token_ids)} tokens; the model's context is {self.config.max_model_len}",
            )
        self.validate(spec)
        request_id = request_id or uuid.uuid4().hex
        params = sampling_params.clone()
        vllm_surface.stream_deltas(params, self.config.stream_interval)
        salt = steering_salt(spec) if spec is not None else None

        features: RequestFeatures | None = None  # what the side channel brings (features, watched values)
        asked = None if spec is None else spec.features
        scope: str | None = None  # of the features asked, when asked
        stops: list[tuple[str, int, float]] = []  # stop_when: (dictionary, column in its watch values, above)
        rid = request_id
        prompt_len = len(prompt_token_ids)
        if spec is not None and (spec.wants_features or spec.has_steering):
            stop_when = spec.steering.stop_when if spec.steering is not None else []
            if asked is not None and params.n != 1:
                raise SpecError("n", "features can be returned only with n=1")
            if stop_when and params.n != 1:
                raise SpecError("n", "steering.stop_when needs n=1")
            worker_spec = to_worker_spec(spec, rid, self.dictionary_info)
            params.extra_args = {**(params.extra_args or {}), SPEC_KEY: worker_spec.encode()}
            columns = {w.dictionary: w.features for w in worker_spec.watch}
            stops = [(c.dictionary, columns[c.dictionary].index(c.feature), c.above) for c in stop_when]
            kinds: tuple[str, ...] = ()
            if asked is not None:
                scope = asked.scope
                if scope != "generated":
                    # Cached prefix tokens skip the forward pass and with it the hook:
                    # recompute them so every prompt token gets its features.
                    params.skip_reading_prefix_cache = True
                kinds = tuple(k for k, on in (("top", asked.top_k is not None),
                                              ("ids", asked.feature_ids is not None)) if on)
            if asked is not None or stops:
                features = self.receiver.register(rid, asked.dictionaries if asked is not None else [], kinds,
                                                  watches=tuple(columns), watch_from=prompt_len)

        prompt = vllm_surface.token_prompt(prompt_token_ids, cache_salt=salt)
        generated: list[int] = []
        emitted_upto = 0  # positions below this have been handed out (or are out of scope)
        if scope == "generated":
            emitted_upto = prompt_len
        checked_upto = prompt_len  # stop_when: generated positions below this have been checked
        first = True
        outputs = self.llm.generate(prompt, params, request_id)
        try:
            async for out in outputs:
                comp = out.outputs[0]
                before = len(generated)
                generated.extend(comp.token_ids)
                chunk = GenerationChunk(
                    request_id=request_id,
                    token_ids=list(comp.token_ids),
                    text=comp.text,
                    finished=out.finished,
                    finish_reason=comp.finish_reason,
                    prompt_token_ids=list(prompt_token_ids) if first else None,
                    num_generated_tokens=len(generated),
                    num_cached_tokens=out.num_cached_tokens,
                    logprobs=None if comp.logprobs is None else [
                        {int(t): float(lp.logprob) for t, lp in step.items()} for step in comp.logprobs
                    ],
                )
                first = False
                # Positions the model has read so far: the prompt and every generated token
                # but the newest.
                read_upto = prompt_len + max(len(generated) - 1, 0)
                fired_at = None
                if stops and features is not None and read_upto > checked_upto:
                    checking = range(checked_upto, read_upto)
                    await self._wait_for(features, checking, features.watched)
                    fired_at = self._first_firing(features, checking, stops)
                    checked_upto = read_upto
                if fired_at is not None:
                    # The token the feature fired on is the last one returned; later ones
                    # (sampled before its features were known) are dropped, vLLM stops.
                    keep = fired_at - prompt_len + 1
                    self._cut(chunk, generated, before, keep, params)
                    del generated[keep:]
                    read_upto = fired_at + 1  # the model has read the kept tokens, the last one too
                if asked is not None and features is not None:
                    if scope == "prompt":
                        read_upto = min(read_upto, prompt_len)
                    if read_upto > emitted_upto:
                        wanted = range(emitted_upto, read_upto)
                        await self._wait_for(features, wanted)
                        chunk.features = self._take(features, wanted, prompt_token_ids, generated, prompt_len)
                        emitted_upto = read_upto
                if fired_at is not None:
                    await outputs.aclose()  # aborts the request in vLLM
                    yield chunk
                    return
                yield chunk
        finally:
            if features is not None:
                self.receiver.unregister(rid)

    @staticmethod
    def _first_firing(features: RequestFeatures, positions: range, stops: list[tuple[str, int, float]]) -> int | None:
        """The first generated position in ``positions`` on which a stop condition fires."""
        fired = None
        for pos in positions:
            if pos < features.watch_from:
                continue
            values = {d: features.pop_watch(d, pos) for d in features.watches}
            if fired is None and any(float(values[d][col]) > above for d, col, above in stops):
                fired = pos
        return fired

    def _cut(self, chunk: GenerationChunk, generated: list[int], before: int, keep: int, params: Any) -> None:
        """End ``chunk`` (finish_reason ``feature``) after the first ``keep`` generated tokens
        of the request; ``before`` of them were handed out in earlier chunks."""
        n = keep - before
        if n < len(chunk.token_ids):
            chunk.token_ids = chunk.token_ids[:n]
            if chunk.logprobs is not None:
                chunk.logprobs = chunk.logprobs[:n]
            if n == 0:
                chunk.text = ""
            else:  # the text of the kept tokens: decoded, less what earlier chunks had
                skip = bool(getattr(params, "skip_special_tokens", True))
                done = self.tokenizer.decode(generated[:before], skip_special_tokens=skip)
                chunk.text = self.tokenizer.decode(generated[:keep], skip_special_tokens=skip)[len(done):]
        chunk.finished, chunk.finish_reason = True, "feature"
        chunk.num_generated_tokens = keep

    async def _wait_for(self, features: RequestFeatures, wanted: range,
                        arrived: Callable[[range], bool] | None = None) -> None:
        # The worker sends a step's features before it returns that step's tokens, but the
        # two travel on different sockets: wait for the side channel to catch up.
        loop = asyncio.get_running_loop()
        timeout = self.config.feature_timeout_s
        deadline = loop.time() + timeout
        covers = features.covers if arrived is None else arrived
        while not covers(wanted):
            features.changed.clear()
            if covers(wanted):
                break
            if not self.receiver.healthy:
                raise FeatureTimeoutError(
                    f"the feature side channel of this replica stopped ({self.receiver.failure or 'closed'}); "
                    "the replica is being replaced, retry the request")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise FeatureTimeoutError(
                    f"the features of tokens {wanted.start}..{wanted.stop - 1} did not arrive from the engine "
                    f"worker within {timeout:g} s (feature_timeout_s); the replica is overloaded or its feature "
                    "channel is recovering, retry the request")
            try:
                # Wake at least every second to notice a failed channel.
                await asyncio.wait_for(features.changed.wait(), min(remaining, 1.0))
            except TimeoutError:
                continue

    @staticmethod
    def _take(features: RequestFeatures, wanted: range, prompt_ids: list[int], generated: list[int],
              prompt_len: int) -> list[TokenFeatures]:
        out = []
        for pos in wanted:
            per_dict = []
            for name in features.dictionaries:
                top = features.pop("top", name, pos)
                ids = features.pop("ids", name, pos)
                if top is not None and top[0] is not None:
                    item = DictionaryFeatures(dictionary=name, indices=top[0].tolist(), values=top[1].tolist(),
                                              feature_values=None if ids is None else ids[1].tolist())
                elif ids is not None:
                    item = DictionaryFeatures(dictionary=name, values=ids[1].tolist())
                else:  # register() asked for at least one kind, and both arrive together
                    raise EngineError(f"no features of {name!r} arrived for position {pos}")
                per_dict.append(item)
            is_prompt = pos < prompt_len
            token = prompt_ids[pos] if is_prompt else generated[pos - prompt_len]
            out.append(TokenFeatures(position=pos, token_id=token, is_prompt=is_prompt, features=per_dict))
        return out

    async def complete(self, prompt_token_ids: list[int], sampling_params: Any,
                       spec: SAERequestSpec | None = None, request_id: str | None = None) -> GenerationChunk:
        """Run a request to the end and return one chunk holding all of it."""
        total: GenerationChunk | None = None
        async for chunk in self.generate(prompt_token_ids, sampling_params, spec, request_id):
            if total is None:
                total = chunk.model_copy(deep=True)
            else:
                total.token_ids += chunk.token_ids
                total.text += chunk.text
                total.features += chunk.features
                if chunk.logprobs is not None:
                    total.logprobs = (total.logprobs or []) + chunk.logprobs
                if chunk.num_cached_tokens is not None:
                    total.num_cached_tokens = chunk.num_cached_tokens
                total.finished, total.finish_reason = chunk.finished, chunk.finish_reason
                total.num_generated_tokens = chunk.num_generated_tokens
        assert total is not None
        return total

    async def extract(self, prompt_token_ids: list[int], features: Any) -> list[TokenFeatures]:
        """Features of every prompt token (one forward pass over the prompt)."""
        from vllm import SamplingParams

        spec = SAERequestSpec(features=features.model_copy(update={"scope": "prompt"}))
        result = await self.complete(prompt_token_ids, SamplingParams(max_tokens=1, temperature=0.0), spec)
        return result.features

    # -- harvesting ---------------------------------------------------------------------

    def stream_layers(self, hook_points: Any) -> list[int]:
        """Hook points (names such as ``layers.12``/``embeddings``, or layer numbers with
        ``-1`` the embeddings) as sorted layer numbers; :class:`SpecError` on ``hook_points``
        names the bad one."""
        if isinstance(hook_points, (str, int)) or not hook_points:
            raise SpecError("hook_points", f"expected a non-empty list of hook points, got {hook_points!r}")
        layers = []
        n = self.shape.num_layers if self.last_layer is None else self.last_layer + 1
        for i, h in enumerate(hook_points):
            where = f"hook_points[{i}]"
            if isinstance(h, bool) or not isinstance(h, (str, int)):
                raise SpecError(where, f"expected a hook point name or layer number, got {h!r}")
            if isinstance(h, str):
                try:
                    layer = parse_hook_point(h)
                except ValueError as exc:
                    raise SpecError(where, str(exc)) from None
            else:
                layer = h
            if not -1 <= layer < n:
                stopped = "" if n == self.shape.num_layers else f"; this engine stops after layers.{n - 1}"
                raise SpecError(where, f"{h!r} is not a hook point of this model (valid: embeddings = -1, "
                                f"layers.0 .. layers.{n - 1}{stopped})")
            layers.append(layer)
        return sorted(set(layers))

    def _prefill_params(self, token_id_lists: list[list[int]]) -> Any:
        """Sampling parameters of a harvest: prefill only (one token), prefix-cache reading
        skipped so every position is computed; :class:`SpecError` for an empty prompt or one
        that fills the context."""
        from vllm import SamplingParams

        for i, ids in enumerate(token_id_lists):
            if not ids:
                raise SpecError(f"token_id_lists[{i}]", "is empty")
            if len(ids) >= self.config.max_model_len:
                raise SpecError(f"token_id_lists[{i}]", f"has {len(ids)} tokens; the model's context is "
                                f"{self.config.max_model_len}")
        params = SamplingParams(max_tokens=1, temperature=0.0)
        vllm_surface.stream_deltas(params)
        params.skip_reading_prefix_cache = True
        return params

    async def harvest_streams(self, token_id_lists: list[list[int]], hook_points: Any) -> list[dict[int, Any]]:
        """The raw residual stream of every prompt token at each hook point.

        Returns, per prompt (same order), ``{layer: float32 tensor [T, d]}`` keyed by layer
        number (``-1`` = embeddings). Each prompt runs as a prefill (``max_tokens=1``) with
        prefix-cache reading skipped so every position is computed; all prompts are in
        flight at once so vLLM batches them (the caller bounds a call's size: the rows of
        every prompt are held until it returns).
        """
        import torch

        layers = self.stream_layers(hook_points)
        params = self._prefill_params(token_id_lists)

        async def one(ids: list[int]) -> dict[int, Any]:
            rid = uuid.uuid4().hex
            p = params.clone()
            p.extra_args = {SPEC_KEY: WorkerSpec(rid=rid, streams=layers).encode()}
            rows = self.receiver.register(rid, [], kinds=(), streams=tuple(layers))
            try:
                async for _ in self.llm.generate(vllm_surface.token_prompt(list(ids)), p, rid):
                    pass
                wanted = range(len(ids))
                await self._wait_for(rows, wanted)
                return {L: torch.from_numpy(rows.stream(L, wanted)) for L in layers}
            finally:
                self.receiver.unregister(rid)

        return list(await asyncio.gather(*(one(ids) for ids in token_id_lists)))

    async def harvest_features(self, token_id_lists: list[list[int]], dictionary: str, top_k: int, *,
                               stream_norms: bool = False) -> list[tuple[Any, ...]]:
        """The ``top_k`` strongest features of ``dictionary`` at every prompt token.

        Returns, per prompt (same order), ``(indices int64 [T, top_k], values float32
        [T, top_k])`` as numpy arrays: exactly what :meth:`extract` returns for the same
        prompt and ``top_k``, without building per-token objects. With ``stream_norms`` a
        third array, float32 ``[T]``: the L2 norm of each token's residual stream at the
        dictionary's hook point (the rows the features were computed from, sent back by the
        same requests as :meth:`harvest_streams` does; sae-index's attention-sink rule).
        Like :meth:`harvest_streams`: prefill only, prefix-cache reading skipped, every
        prompt in flight at once (the caller bounds a call's size).
        """
        import numpy as np

        spec = SAERequestSpec(features=FeatureRequest(dictionaries=[dictionary], top_k=top_k, scope="prompt"))
        self.validate(spec)
        params = self._prefill_params(token_id_lists)
        layers = self.stream_layers([self.dictionary_info[dictionary].hook_point]) if stream_norms else []

        async def one(ids: list[int]) -> tuple[Any, ...]:
            rid = uuid.uuid4().hex
            p = params.clone()
            worker_spec = to_worker_spec(spec, rid, self.dictionary_info)
            if layers:
                worker_spec = dataclasses.replace(worker_spec, streams=layers)
            p.extra_args = {SPEC_KEY: worker_spec.encode()}
            rows = self.receiver.register(rid, [dictionary], kinds=("top",), streams=tuple(layers))
            try:
                async for _ in self.llm.generate(vllm_surface.token_prompt(list(ids)), p, rid):
                    pass
                wanted = range(len(ids))
                await self._wait_for(rows, wanted)
                table = rows.rows["top"][dictionary]
                got = [table[pos] for pos in wanted]
                out: tuple[Any, ...] = (np.stack([np.asarray(g[0]) for g in got]).astype(np.int64, copy=False),
                                        np.stack([g[1] for g in got]).astype(np.float32, copy=False))
                if layers:
                    out += (np.linalg.norm(rows.stream(layers[0], wanted), axis=1).astype(np.float32),)
                return out
            finally:
                self.receiver.unregister(rid)

        return list(await asyncio.gather(*(one(ids) for ids in token_id_lists)))
