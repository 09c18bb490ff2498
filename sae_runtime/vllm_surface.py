"""Every vLLM internal sae-serve relies on, in one place. Written for vLLM 0.32.0.

vLLM's public API (names exported by the top-level ``vllm`` package, e.g.
``vllm.SamplingParams``) may be used anywhere. Everything else (submodules such as
``vllm.v1.engine.async_llm``, private attributes such as ``AsyncLLM.output_processor``,
the model runner's batch layout, the model loader we wrap) is reached only through the
small functions below; ``tests/test_import_rules.py`` enforces that no other module
imports a vLLM submodule.

When vLLM moves: run ``tests/test_vllm_surface.py``. It checks every entry of
:data:`ASSUMPTIONS` against the installed vLLM and names the one that broke, and what in
sae-serve uses it. Then fix the function here that relies on it. Behaviour that no
attribute check can see (how decoder layers hand on the residual stream) is owned by
``sae_runtime/worker/decoder_layers.py`` and checked by ``tests/test_architectures.py``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

VLLM_VERSION = "0.32.0"
"""The vLLM release this module was written and checked for (scripts/setup_venv.sh)."""

# --------------------------------------------------------------------------- environment


def configure_environment(kv_cache_gib: float) -> None:
    """Set the vLLM environment variables the SAE runtime needs; call before vLLM starts
    (its worker processes inherit the environment).

    - ``VLLM_CPU_KVCACHE_SPACE``: the CPU KV cache size (vLLM's default is a share of all
      RAM), unless the operator set it.
    - ``VLLM_USE_V2_MODEL_RUNNER=0``: the V1 model runner, whose persistent input batch the
      SAE step reads (:func:`batch_layout`).
    - ``VLLM_CPU_OMP_THREADS_BIND=all`` (sae-serve's own value, not vLLM's) becomes this
      machine's CPU ids (:func:`all_cpus_binding`): a replica resolves it on its own node.
    - ``VLLM_USE_AOT_COMPILE=0`` unless set: vLLM 0.32 (CPU) with torch 2.13 writes
      AOT-compiled artifacts it cannot load back ("'function' object has no attribute
      'finalize_loading'"), so every compiled start compiled again (~150 s here). The
      non-AOT compile cache loads: a warm compiled start takes ~70 s (measured on this
      project's 2-core CPU machines).
    """
    if os.environ.get(CPU_BIND_ENV) == "all":
        os.environ[CPU_BIND_ENV] = all_cpus_binding()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
"""vLLM's CPU thread binding of its worker: ``auto`` (its default: one thread per physical core
of the NUMA node, some cores left to other processes), ``nobind``, or CPU ids such as ``0-1``;
sae-serve adds ``all`` (every CPU this process may use), resolved by
:func:`configure_environment` before vLLM reads it."""


def all_cpus_binding() -> str:
    """A :data:`CPU_BIND_ENV` value binding one worker thread to each CPU this process may use."""
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


@contextlib.contextmanager
def cpu_threads_bind(value: str | None) -> Iterator[None]:
    """Set :data:`CPU_BIND_ENV` (``"all"``: :func:`all_cpus_binding`) while an engine starts
    (its processes copy the environment when they start), then restore it; ``None``, or the
    variable already set by the operator, leaves it as it is."""
    if value is None or CPU_BIND_ENV in os.environ:
        yield
        return
    os.environ[CPU_BIND_ENV] = all_cpus_binding() if value == "all" else value
    try:
        yield
    finally:
        os.environ.pop(CPU_BIND_ENV, None)


# --------------------------------------------------------------------------- the engine (API process)


def start_async_llm(compilation_config: dict[str, Any] | None = None, **engine_args: Any) -> Any:
    """Start vLLM's V1 ``AsyncLLM`` from ``AsyncEngineArgs(**engine_args)``."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    if compilation_config is not None:
        # AsyncEngineArgs turns a dict into its CompilationConfig when it is constructed
        # ("support `EngineArgs(compilation_config={...})`" in its __post_init__).
        engine_args = {**engine_args, "compilation_config": compilation_config}
    args = AsyncEngineArgs(**engine_args)
    return AsyncLLM.from_engine_args(args)


def attention_splitting_ops() -> list[str]:
    """The ops vLLM splits the compiled graph at by default (its attention ops), to which
    the engine adds the SAE step ops (``CompilationConfig._attention_ops``)."""
    from vllm.config.compilation import CompilationConfig

    return list(CompilationConfig._attention_ops)


def engine_errored(llm: Any) -> bool:
    """True once the engine core died or stopped (``AsyncLLM.errored``)."""
    return bool(llm.errored)


def unfinished_requests(llm: Any) -> int:
    """Requests the API process's output processor still tracks (``AsyncLLM.output_processor``)."""
    return int(llm.output_processor.get_num_unfinished_requests())


def token_prompt(prompt_token_ids: list[int], cache_salt: str | None = None) -> Any:
    """A token-id prompt for ``AsyncLLM.generate`` (``vllm.inputs.engine.tokens_input``)."""
    from vllm.inputs.engine import tokens_input

    return tokens_input(list(prompt_token_ids), cache_salt=cache_salt)


def output_kind(name: str) -> Any:
    """``vllm.sampling_params.RequestOutputKind[name]`` (``CUMULATIVE``, ``DELTA``, ``FINAL_ONLY``)."""
    from vllm.sampling_params import RequestOutputKind

    return RequestOutputKind[name]


def stream_deltas(params: Any, interval: int = 1) -> None:
    """Make ``params`` (a ``SamplingParams``) stream only the new tokens: every step's, or,
    with ``interval`` > 1, the first token at once and then ``interval`` tokens at a time
    (``SamplingParams.stream_interval``, unless the params already set one)."""
    params.output_kind = output_kind("DELTA")
    if interval > 1 and params.stream_interval is None:
        params.stream_interval = interval


def is_engine_dead_error(exc: BaseException) -> bool:
    """True for vLLM's 'engine process died' errors (``EngineDeadError``, or an
    ``EngineGenerateError`` caused by one); False when vLLM is not installed."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
    except ImportError:  # unit use without vLLM
        return False
    if isinstance(exc, EngineGenerateError) and isinstance(exc.__cause__, EngineDeadError):
        return True
    return isinstance(exc, EngineDeadError)


def client_error_classes() -> tuple[type[Exception], type[Exception], type[Exception]] | None:
    """vLLM's request-error exceptions ``(VLLMClientError, VLLMNotFoundError,
    VLLMValidationError)``: raised by its OpenAI request models' validators,
    ``SamplingParams`` and the engine's input checks. None when vLLM is not installed."""
    try:
        from vllm.exceptions import VLLMClientError, VLLMNotFoundError, VLLMValidationError
    except ImportError:  # unit use without vLLM
        return None
    return VLLMClientError, VLLMNotFoundError, VLLMValidationError


# --------------------------------------------------------------------------- model loading (worker)

LoadedModelCallback = Callable[[Any, int, str, dict[str, Any]], object]  # what it returns is ignored
"""``fn(model, num_hidden_layers, architecture, additional_config)``, called on the served
model once loaded; ``additional_config`` is the engine's ``additional_config`` argument (the
dict vLLM carries to every process for plugins; ``{}`` when unset)."""


_PATCHED_ATTR = "_sae_patched"
"""Set on ``BaseModelLoader`` once :func:`wrap_model_loader` wrapped its ``load_model``."""


def wrap_model_loader(on_loaded: LoadedModelCallback) -> None:
    """Have ``on_loaded`` called on the served model right after vLLM loads it and before
    its first forward (when vLLM compiles it). Wraps ``BaseModelLoader.load_model`` once
    per process; a speculative decoder's draft model is left alone."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    if BaseModelLoader.__dict__.get(_PATCHED_ATTR, False):
        return
    orig_load = BaseModelLoader.load_model

    @functools.wraps(orig_load)
    def load_model(self, vllm_config, model_config, *args, **kwargs):
        model = orig_load(self, vllm_config, model_config, *args, **kwargs)
        if model_config is vllm_config.model_config:
            architectures = getattr(model_config, "architectures", None) or [type(model).__name__]
            extra = getattr(vllm_config, "additional_config", None)
            on_loaded(model, model_config.get_total_num_hidden_layers(), architectures[0],
                      dict(extra) if isinstance(extra, dict) else {})
        return model

    # Replacing a method of vLLM's class (and marking the class with an attribute of our own
    # that it does not declare) is the point of this function. setattr says so; a plain
    # assignment is a method-assign error to mypy.
    setattr(BaseModelLoader, "load_model", load_model)  # noqa: B010
    setattr(BaseModelLoader, _PATCHED_ATTR, True)


# --------------------------------------------------------------------------- the model runner (worker)


def worker_model_runner(worker: Any) -> Any:
    """The model runner of a vLLM worker (``Worker.model_runner``), as seen from a method
    of the worker extension."""
    return worker.model_runner


def check_model_runner(runner: Any) -> None:
    """Refuse a runner without the V1 persistent batch the SAE step reads."""
    if not hasattr(runner, "input_batch") or not hasattr(runner, "query_start_loc"):
        raise RuntimeError(
            "SAE hooks need vLLM's V1 model runner (input_batch / query_start_loc); "
            "set VLLM_USE_V2_MODEL_RUNNER=0"
        )


def runner_model(runner: Any) -> Any:
    """The ``nn.Module`` the runner executes."""
    return runner.get_model()


def runner_hidden_size(runner: Any) -> int:
    """The served model's hidden size."""
    return int(runner.model_config.get_hidden_size())


def wrap_execute_model(runner: Any, wrapper: Callable[..., Any]) -> Callable[[], None]:
    """Route ``runner.execute_model(scheduler_output, ...)`` through
    ``wrapper(orig_execute, scheduler_output, ...)``; returns the function that undoes it."""
    orig = runner.execute_model

    def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        return wrapper(orig, scheduler_output, *args, **kwargs)

    runner.execute_model = execute_model

    def restore() -> None:
        runner.execute_model = orig

    return restore


def wrap_sample_tokens(runner: Any, wrapper: Callable[..., Any]) -> Callable[[], None]:
    """Route ``runner.sample_tokens(grammar_output)`` (the second half of a step, after
    ``execute_model``) through ``wrapper(orig_sample, grammar_output)``; returns the
    function that undoes it."""
    orig = runner.sample_tokens

    def sample_tokens(*args: Any, **kwargs: Any) -> Any:
        return wrapper(orig, *args, **kwargs)

    runner.sample_tokens = sample_tokens

    def restore() -> None:
        runner.sample_tokens = orig

    return restore


def runner_device_type(runner: Any) -> str:
    """``"cpu"``, ``"cuda"``, ... of the device the runner runs on (``runner.device``)."""
    import torch

    return torch.device(runner.device).type


@contextlib.contextmanager
def seeded_draws_held_back(runner: Any) -> Iterator[int]:
    """While inside (around ``sample_tokens``), take the per-request generators (requests
    with a ``seed``) of this step's rows whose sampled token vLLM discards (a prompt whose
    prefill goes on next step, ``discard_request_mask``) out of
    ``input_batch.generators``; yields how many. Put back on the way out.

    Why: vLLM samples every row and afterwards "rewinds" a discarded row's generator with
    ``gen.set_offset(gen.get_offset() - 4)`` (``GPUModelRunner._bookkeeping_sync``), which
    a CPU ``torch.Generator`` refuses ("CPU Generator does not use offset"), killing the
    engine core. Without its generator the row is sampled from the shared default
    generator like any unseeded row, and the discarded token is dropped as before; the
    seeded generator draws nothing this step, so the rewind is exact and nothing calls
    ``set_offset`` on it. A seeded request gives the same tokens whether or not its
    prefill was split.
    """
    batch = runner.input_batch
    generators = batch.generators
    if not generators:
        yield 0
        return
    num_reqs = batch.num_reqs
    discarded = runner.discard_request_mask.np[:num_reqs].nonzero()[0]
    held = {int(i): generators.pop(int(i)) for i in discarded if int(i) in generators}
    try:
        yield len(held)
    finally:
        generators.update(held)


def cpu_packed_matmul(weight: Any) -> Callable[[Any], Any] | None:
    """``x -> x @ weight`` (``weight [K, N]``, ``x [M, K]`` of its dtype) through the oneDNN
    matmul with prepacked weights that vLLM's CPU linear layers use, or None where there is
    none (a tensor not on the CPU, a vLLM build without oneDNN, a weight it refuses).

    Why: torch's ``x @ weight`` on this project's CPUs runs a decode batch's encode (32 rows ×
    576 × 4608, float32) at about half the speed of this one (benchmarks/README.md, engine
    overhead, "the encoders' matmul prepacked"); the packed copy of the weight (as large
    as ``weight``) is taken once, so later changes to ``weight`` are not seen."""
    if weight.device.type != "cpu":
        return None
    from vllm import _custom_ops as ops

    if not getattr(ops, "_supports_onednn", False):
        return None
    try:
        handler = ops.create_onednn_mm(weight, 32)  # 32: oneDNN primitives cached (one per row count)
    except RuntimeError:
        return None

    def matmul(x: Any) -> Any:
        return ops.onednn_mm(handler, x, None)

    return matmul


def finished_request_ids(scheduler_output: Any) -> Any:
    """Ids of the requests that finished since the last step (``SchedulerOutput``)."""
    return scheduler_output.finished_req_ids


def step_has_tokens(scheduler_output: Any) -> bool:
    """Whether this step runs the model on any token."""
    return bool(scheduler_output.total_num_scheduled_tokens)


def request_extra_arg(runner: Any, req_id: str, key: str) -> tuple[Any, int] | None:
    """``(SamplingParams.extra_args[key], number of prompt tokens)`` of a request the runner
    holds, or None when it has no such extra argument."""
    cached = runner.requests.get(req_id)
    params = getattr(cached, "sampling_params", None)
    value = (params.extra_args or {}).get(key) if params is not None else None
    if value is None:
        return None
    return value, int(cached.num_prompt_tokens)


def batch_layout(runner: Any) -> tuple[list[str], Any]:
    """This step's batch as the runner laid it out inside ``execute_model``: the request
    ids in batch order and the ``[num_reqs + 1]`` numpy array of their first token rows
    (``query_start_loc``); request ``i`` owns rows ``qsl[i]:qsl[i+1]``."""
    ib = runner.input_batch
    num_reqs = ib.num_reqs
    return ib.req_ids[:num_reqs], runner.query_start_loc.cpu[: num_reqs + 1].numpy()


def batch_positions(runner: Any, num_tokens: int) -> Any:
    """Numpy array of the token positions (in their requests) of this step's first
    ``num_tokens`` rows."""
    return runner.positions[:num_tokens].cpu().numpy()


# --------------------------------------------------------------------------- assumptions


@dataclass(frozen=True)
class Assumption:
    """One fact about vLLM's internals that a function above relies on."""

    name: str
    """What is assumed, in vLLM's terms."""
    used_by: str
    """The function(s) here that rely on it."""
    check: Callable[[], None]
    """Raises ``AssertionError`` (or ImportError / AttributeError) when the fact no longer holds."""


def _assigns(where: Any, *attrs: str) -> None:
    """``where``'s source assigns ``self.<attr> = ...`` (or ``self.<attr>: T = ...``) for each attr."""
    import re

    src = inspect.getsource(where)
    missing = [a for a in attrs if not re.search(rf"\bself\.{a}\b\s*(?::[^=\n]+)?=(?!=)", src)]
    assert not missing, f"{getattr(where, '__qualname__', where)} no longer sets self.{', self.'.join(missing)}"


def _params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _fields(cls: type) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)}


def _check_errored() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    assert isinstance(inspect.getattr_static(AsyncLLM, "errored", None), property), "AsyncLLM.errored is not a property"


def _check_output_processor() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import OutputProcessor

    _assigns(AsyncLLM.__init__, "output_processor")
    assert callable(getattr(OutputProcessor, "get_num_unfinished_requests", None)), \
        "OutputProcessor.get_num_unfinished_requests is gone"


def _check_async_llm() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    for name in ("from_engine_args", "generate", "collective_rpc", "shutdown"):
        assert callable(getattr(AsyncLLM, name, None)), f"AsyncLLM.{name} is gone"


def _check_engine_args() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    wanted = {"model", "served_model_name", "dtype", "enforce_eager", "max_model_len", "max_num_seqs", "seed",
              "enable_prefix_caching", "worker_extension_cls", "compilation_config", "additional_config"}
    missing = wanted - _fields(AsyncEngineArgs)
    assert not missing, f"AsyncEngineArgs has no field(s) {sorted(missing)}"


def _check_attention_ops() -> None:
    from vllm.config.compilation import CompilationConfig

    ops = getattr(CompilationConfig, "_attention_ops", None)
    assert isinstance(ops, (list, tuple)) and ops and all(isinstance(o, str) for o in ops), \
        f"CompilationConfig._attention_ops is not a non-empty list of op names: {ops!r}"


def _check_tokens_input() -> None:
    from vllm.inputs.engine import tokens_input

    params = _params(tokens_input)
    assert params[:1] == ["prompt_token_ids"] and "cache_salt" in params, \
        f"tokens_input takes {params}, not (prompt_token_ids, *, cache_salt)"


def _check_sampling_params() -> None:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    missing_kinds = {"CUMULATIVE", "DELTA", "FINAL_ONLY"} - set(RequestOutputKind.__members__)
    assert not missing_kinds, f"RequestOutputKind has no {sorted(missing_kinds)}"
    missing = {"extra_args", "output_kind", "skip_reading_prefix_cache", "n", "stream_interval"} - set(
        _params(SamplingParams))
    assert not missing, f"SamplingParams has no field(s) {sorted(missing)}"


def _check_engine_dead() -> None:
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    assert issubclass(EngineDeadError, BaseException) and issubclass(EngineGenerateError, BaseException)


def _check_environment() -> None:
    import vllm.envs

    names = set(vllm.envs.environment_variables)
    missing = {"VLLM_CPU_KVCACHE_SPACE", "VLLM_USE_V2_MODEL_RUNNER", "VLLM_USE_AOT_COMPILE", CPU_BIND_ENV} - names
    assert not missing, f"vLLM no longer reads {sorted(missing)}"


def _check_model_loader() -> None:
    from vllm.config import ModelConfig
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    params = _params(BaseModelLoader.load_model)
    assert params[:3] == ["self", "vllm_config", "model_config"], \
        f"BaseModelLoader.load_model takes {params}, not (self, vllm_config, model_config, ...)"
    for name in ("get_total_num_hidden_layers", "get_hidden_size", "architectures"):
        assert hasattr(ModelConfig, name), f"ModelConfig.{name} is gone"
    from vllm.config import VllmConfig

    assert "additional_config" in _fields(VllmConfig), "VllmConfig.additional_config is gone"


def _check_worker_runner() -> None:
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    for cls in (Worker, CPUWorker):
        _assigns(cls, "model_runner")


def _check_model_runner() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert issubclass(CPUModelRunner, GPUModelRunner), "CPUModelRunner no longer extends GPUModelRunner"
    _assigns(GPUModelRunner.__init__, "input_batch", "query_start_loc", "positions", "requests", "model_config")
    assert _params(GPUModelRunner.execute_model)[:2] == ["self", "scheduler_output"], \
        "GPUModelRunner.execute_model no longer takes scheduler_output first"
    assert callable(getattr(GPUModelRunner, "get_model", None)), "GPUModelRunner.get_model is gone"


def _check_batch() -> None:
    from vllm.v1.utils import CpuGpuBuffer
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

    assert isinstance(inspect.getattr_static(InputBatch, "req_ids", None), property), "InputBatch.req_ids is gone"
    assert isinstance(inspect.getattr_static(InputBatch, "num_reqs", None), property), "InputBatch.num_reqs is gone"
    _assigns(CpuGpuBuffer.__init__, "cpu")
    assert "sampling_params" in _fields(CachedRequestState), "CachedRequestState.sampling_params is gone"
    _assigns(CachedRequestState, "num_prompt_tokens")


def _check_discarded_samples() -> None:
    import torch
    from vllm.v1.sample.ops import topk_topp_sampler
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert _params(GPUModelRunner.sample_tokens)[:2] == ["self", "grammar_output"], \
        "GPUModelRunner.sample_tokens no longer takes grammar_output"
    _assigns(GPUModelRunner.__init__, "discard_request_mask", "device")
    assert "discard_request_mask.np" in inspect.getsource(GPUModelRunner._bookkeeping_sync), \
        "GPUModelRunner._bookkeeping_sync no longer reads discard_request_mask.np"
    _assigns(InputBatch.__init__, "generators")
    # A row draws from its own generator only when it is in the dict; the others share the
    # default generator (the CPU sampler and the native one alike).
    for fn in (topk_topp_sampler.TopKTopPSampler.forward_cpu, topk_topp_sampler.random_sample):
        assert "generators.items()" in inspect.getsource(fn), \
            f"{fn.__qualname__} no longer draws per request from generators.items()"
    try:
        torch.Generator(device="cpu").get_offset()
    except RuntimeError:
        pass  # still true: the rewind seeded_draws_held_back avoids would fail on CPU
    else:
        raise AssertionError("a CPU torch.Generator has an offset now: seeded_draws_held_back may be unneeded")


def _check_scheduler_output() -> None:
    from vllm.v1.core.sched.output import SchedulerOutput

    missing = {"finished_req_ids", "total_num_scheduled_tokens"} - _fields(SchedulerOutput)
    assert not missing, f"SchedulerOutput has no field(s) {sorted(missing)}"


def _check_client_errors() -> None:
    classes = client_error_classes()
    assert classes is not None, "vllm.exceptions cannot be imported"
    client, not_found, validation = classes
    assert issubclass(not_found, client) and issubclass(validation, client)
    assert "parameter" in inspect.signature(validation).parameters, "VLLMValidationError(parameter=...)"


def _check_openai_protocol() -> None:
    # server/openai_models.py subclasses these (the one module importing vLLM's OpenAI protocol).
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    for request in (ChatCompletionRequest, CompletionRequest):
        params = inspect.signature(request.to_sampling_params).parameters
        assert "max_tokens" in params, f"{request.__name__}.to_sampling_params(max_tokens, ...)"
        for field in ("top_k", "min_p", "ignore_eos", "logit_bias", "response_format", "stop_token_ids"):
            assert field in request.model_fields, f"{request.__name__}.{field}"


def _check_onednn_mm() -> None:
    from vllm import _custom_ops as ops

    assert isinstance(getattr(ops, "_supports_onednn", None), bool), "vllm._custom_ops._supports_onednn"
    assert _params(ops.create_onednn_mm)[:2] == ["weight", "primitive_cache_size"], "create_onednn_mm(weight, size)"
    assert _params(ops.onednn_mm) == ["dnnl_handler", "x", "bias"], "onednn_mm(dnnl_handler, x, bias)"


ASSUMPTIONS: tuple[Assumption, ...] = (
    Assumption("AsyncLLM.errored is a property", "engine_errored", _check_errored),
    Assumption("AsyncLLM.output_processor.get_num_unfinished_requests()", "unfinished_requests",
               _check_output_processor),
    Assumption("vllm.v1.engine.async_llm.AsyncLLM: from_engine_args, generate, collective_rpc, shutdown",
               "start_async_llm (and SAEEngine's calls on it)", _check_async_llm),
    Assumption("vllm.engine.arg_utils.AsyncEngineArgs fields (worker_extension_cls, compilation_config, ...)",
               "start_async_llm", _check_engine_args),
    Assumption("CompilationConfig._attention_ops lists the default graph split ops", "attention_splitting_ops",
               _check_attention_ops),
    Assumption("vllm.inputs.engine.tokens_input(prompt_token_ids, *, cache_salt)", "token_prompt",
               _check_tokens_input),
    Assumption("SamplingParams.extra_args / output_kind / skip_reading_prefix_cache / stream_interval, "
               "RequestOutputKind members",
               "output_kind, stream_deltas, request_extra_arg (and SAEEngine.generate)", _check_sampling_params),
    Assumption("vllm.v1.engine.exceptions.EngineDeadError / EngineGenerateError", "is_engine_dead_error",
               _check_engine_dead),
    Assumption("vllm.exceptions.VLLMClientError / VLLMNotFoundError / VLLMValidationError(parameter=)",
               "client_error_classes (server/errors.py, server/http_api.py)", _check_client_errors),
    Assumption("vLLM's OpenAI protocol: ChatCompletionRequest / CompletionRequest with to_sampling_params "
               "and the sampling fields", "server/openai_models.py (subclasses them)", _check_openai_protocol),
    Assumption("vLLM reads VLLM_CPU_KVCACHE_SPACE, VLLM_USE_V2_MODEL_RUNNER, VLLM_USE_AOT_COMPILE",
               "configure_environment", _check_environment),
    Assumption("BaseModelLoader.load_model(self, vllm_config, model_config, ...); ModelConfig layer count, "
               "hidden size, architectures", "wrap_model_loader, runner_hidden_size", _check_model_loader),
    Assumption("the CPU and GPU workers have a model_runner", "worker_model_runner", _check_worker_runner),
    Assumption("V1 model runner: input_batch, query_start_loc, positions, requests, model_config, "
               "execute_model(scheduler_output), get_model()",
               "check_model_runner, batch_layout, batch_positions, request_extra_arg, wrap_execute_model",
               _check_model_runner),
    Assumption("InputBatch.req_ids / num_reqs, CpuGpuBuffer.cpu, CachedRequestState.sampling_params / "
               "num_prompt_tokens", "batch_layout, request_extra_arg", _check_batch),
    Assumption("GPUModelRunner.sample_tokens(grammar_output), discard_request_mask, device; "
               "InputBatch.generators keyed by row; the samplers draw per request from generators.items(); "
               "a CPU torch.Generator has no offset", "wrap_sample_tokens, runner_device_type, seeded_draws_held_back",
               _check_discarded_samples),
    Assumption("vllm._custom_ops: _supports_onednn, create_onednn_mm(weight [K, N], cache size), "
               "onednn_mm(handler, x, bias)", "cpu_packed_matmul", _check_onednn_mm),
    Assumption("SchedulerOutput.finished_req_ids / total_num_scheduled_tokens",
               "finished_request_ids, step_has_tokens", _check_scheduler_output),
)
"""Everything this module assumes about vLLM's internals; ``tests/test_vllm_surface.py``
checks each against the installed vLLM."""
