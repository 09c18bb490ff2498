"""Every vLLM internal sae-serve relies on still exists in the installed vLLM.

Each entry of ``sae_runtime.vllm_surface.ASSUMPTIONS`` is checked on its own; a failure
names the assumption, the function of ``vllm_surface`` that relies on it and what broke.
No engine is started (importing vLLM takes a few seconds).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sae_runtime import vllm_surface

pytest.importorskip("vllm")


@pytest.mark.parametrize("assumption", vllm_surface.ASSUMPTIONS, ids=lambda a: a.used_by.split(",")[0])
def test_assumption_holds(assumption):
    try:
        assumption.check()
    except Exception as exc:
        pytest.fail(f"vLLM moved: {assumption.name!r} no longer holds ({type(exc).__name__}: {exc}); "
                    f"fix sae_runtime/vllm_surface.py ({assumption.used_by}) for the installed vLLM "
                    f"(written for {vllm_surface.VLLM_VERSION})", pytrace=False)


def test_written_for_the_installed_release():
    import vllm

    assert vllm.__version__.split("+")[0] == vllm_surface.VLLM_VERSION, (
        f"vllm_surface was written for vLLM {vllm_surface.VLLM_VERSION}, installed is {vllm.__version__}: "
        "check every assumption (this file) and update VLLM_VERSION")


def test_a_broken_assumption_is_caught(monkeypatch):
    """The checks can fail: take away attributes they look for."""
    from vllm.config.compilation import CompilationConfig
    from vllm.v1.engine.output_processor import OutputProcessor

    by_user = {a.used_by: a for a in vllm_surface.ASSUMPTIONS}
    monkeypatch.delattr(CompilationConfig, "_attention_ops")
    with pytest.raises(AssertionError, match="_attention_ops"):
        by_user["attention_splitting_ops"].check()
    monkeypatch.delattr(OutputProcessor, "get_num_unfinished_requests")
    with pytest.raises(AssertionError, match="get_num_unfinished_requests"):
        by_user["unfinished_requests"].check()


def test_the_functions_read_what_the_assumptions_name():
    """The functions over stand-ins shaped like vLLM's objects (the real ones need an engine:
    tests/test_engine.py)."""
    import numpy as np
    import torch

    llm = SimpleNamespace(errored=True, output_processor=SimpleNamespace(get_num_unfinished_requests=lambda: 3))
    assert vllm_surface.engine_errored(llm) is True
    assert vllm_surface.unfinished_requests(llm) == 3
    ops = vllm_surface.attention_splitting_ops()
    assert ops and all(isinstance(o, str) for o in ops)

    params = SimpleNamespace(extra_args={"sae": {"rid": "r"}})
    runner = SimpleNamespace(
        requests={"a": SimpleNamespace(sampling_params=params, num_prompt_tokens=5),
                  "b": SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None), num_prompt_tokens=2)},
        input_batch=SimpleNamespace(num_reqs=2, req_ids=["a", "b", "stale"]),
        query_start_loc=SimpleNamespace(cpu=torch.tensor([0, 5, 6, 9], dtype=torch.int32)),
        positions=torch.arange(10),
        execute_model=lambda scheduler_output: ("ran", scheduler_output),
    )
    assert vllm_surface.request_extra_arg(runner, "a", "sae") == ({"rid": "r"}, 5)
    assert vllm_surface.request_extra_arg(runner, "b", "sae") is None
    assert vllm_surface.request_extra_arg(runner, "missing", "sae") is None
    req_ids, qsl = vllm_surface.batch_layout(runner)
    assert list(req_ids) == ["a", "b"] and qsl.tolist() == [0, 5, 6]
    assert np.array_equal(vllm_surface.batch_positions(runner, 6), np.arange(6))

    seen = []
    restore = vllm_surface.wrap_execute_model(runner, lambda orig, so: seen.append(so) or orig(so))
    assert runner.execute_model("step") == ("ran", "step") and seen == ["step"]
    restore()
    assert runner.execute_model("step2") == ("ran", "step2") and seen == ["step"]

    so = SimpleNamespace(finished_req_ids={"x"}, total_num_scheduled_tokens=0)
    assert vllm_surface.finished_request_ids(so) == {"x"}
    assert vllm_surface.step_has_tokens(so) is False


def test_engine_dead_errors_are_recognised():
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    assert vllm_surface.is_engine_dead_error(EngineDeadError())
    wrapped = EngineGenerateError()
    wrapped.__cause__ = EngineDeadError()
    assert vllm_surface.is_engine_dead_error(wrapped)
    assert not vllm_surface.is_engine_dead_error(EngineGenerateError())
    assert not vllm_surface.is_engine_dead_error(RuntimeError("x"))


def test_token_prompt_and_output_kind():
    from vllm import SamplingParams

    prompt = vllm_surface.token_prompt([1, 2, 3], cache_salt="s")
    assert prompt["prompt_token_ids"] == [1, 2, 3] and prompt["cache_salt"] == "s"
    params = SamplingParams()
    vllm_surface.stream_deltas(params)
    assert params.output_kind == vllm_surface.output_kind("DELTA")


def test_configure_environment(monkeypatch):
    import os

    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_USE_V2_MODEL_RUNNER", "VLLM_USE_AOT_COMPILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    vllm_surface.configure_environment(2.4)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0"
