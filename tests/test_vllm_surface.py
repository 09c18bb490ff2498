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
    from vllm.v1.sample.ops import topk_topp_sampler

    monkeypatch.setattr(topk_topp_sampler, "random_sample", lambda probs, generators: probs.argmax(-1))
    with pytest.raises(AssertionError, match=r"generators\.items"):
        by_user["wrap_sample_tokens, runner_device_type, seeded_draws_held_back"].check()


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


def test_cpu_binding_all_is_this_machines_cpus(monkeypatch):
    """``all`` (sae-serve's value, the server's and the harvest engines' default) becomes the
    CPU ids this process may use before vLLM reads the variable; an operator's value stays."""
    import os

    from sae_runtime.engine.engine import EngineConfig, HarvestEngineConfig
    from server import deployment
    from server.cli import build_parser, config_from_args
    from server.config import ServeConfig

    env = vllm_surface.CPU_BIND_ENV
    cpus = sorted(os.sched_getaffinity(0))
    assert vllm_surface.all_cpus_binding() == ",".join(map(str, cpus))
    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_USE_V2_MODEL_RUNNER", "VLLM_USE_AOT_COMPILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(env, "all")  # an operator's "all"
    vllm_surface.configure_environment(1.0)
    assert os.environ[env] == ",".join(map(str, cpus))
    monkeypatch.delenv(env)
    with vllm_surface.cpu_threads_bind("all"):  # a replica's or a harvest engine's start
        assert os.environ[env] == ",".join(map(str, cpus))
    assert env not in os.environ  # restored once the engine's processes have it
    with vllm_surface.cpu_threads_bind(None):
        assert env not in os.environ
    monkeypatch.setenv(env, "0")
    with vllm_surface.cpu_threads_bind("all"):
        assert os.environ[env] == "0"  # the operator's binding wins
    # one setting, the engine's: sae-serve's engines and the harvest engines bind every CPU
    # by default, a plain in-process engine leaves the variable as it is
    assert ServeConfig().engine.cpu_threads_bind == "all" == HarvestEngineConfig().cpu_threads_bind
    assert EngineConfig().cpu_threads_bind is None
    assert env not in deployment.replica_env(ServeConfig())  # set by the engine as it starts, not by Ray
    cli = config_from_args(build_parser().parse_args(["--cpu-threads-bind", "auto"]), environ={})
    assert cli.engine.cpu_threads_bind == "auto" and cli.resolved_engine().cpu_threads_bind == "auto"


def test_cpu_packed_matmul_is_x_at_weight():
    """vLLM's prepacked oneDNN matmul (what the worker encodes with on CPU) computes
    ``x @ W`` to float32 rounding for every row count and a strided ``x``; no packing off
    the CPU."""
    import torch

    g = torch.Generator().manual_seed(0)
    W = torch.randn(576, 4608, generator=g) / 24
    matmul = vllm_surface.cpu_packed_matmul(W)
    assert matmul is not None  # this project's vLLM CPU build has oneDNN (scripts/setup_venv.sh)
    for x in (torch.randn(1, 576, generator=g), torch.randn(32, 576, generator=g),
              torch.randn(300, 576, generator=g), torch.randn(64, 576, generator=g)[::2]):
        torch.testing.assert_close(matmul(x), x @ W, rtol=1e-5, atol=1e-5)
    assert vllm_surface.cpu_packed_matmul(torch.empty(4, 4, device="meta")) is None


def test_encode_features_through_the_packed_matmul():
    """``kernels.encode_features(matmul=...)`` encodes through it (the worker's extraction on
    CPU) and gives torch's top-k: values to rounding, indices wherever the order is not
    decided by rounding (consecutive activations more than 1e-4 apart)."""
    import torch

    from sae_runtime import kernels

    g = torch.Generator().manual_seed(1)
    x, W = torch.randn(64, 576, generator=g), torch.randn(576, 4608, generator=g) / 24
    b_enc, b_dec = torch.randn(4608, generator=g) / 10, torch.randn(576, generator=g) / 10
    packed = vllm_surface.cpu_packed_matmul(W)
    calls = []

    def matmul(xin):
        calls.append(tuple(xin.shape))
        return packed(xin)

    k = 8
    idx, vals = kernels.encode_features(x, W, b_enc, b_dec, k, activation="relu", matmul=matmul)
    assert calls == [(64, 576)]
    ref_idx, ref_vals = kernels.encode_features(x, W, b_enc, b_dec, k, activation="relu")
    torch.testing.assert_close(vals, ref_vals, rtol=1e-5, atol=1e-5)
    top = ((x - b_dec) @ W + b_enc).relu().topk(k + 1, dim=1).values
    robust = ((top[:, :-1] - top[:, 1:]) > 1e-4).all(1)
    assert robust.sum() > 32
    assert torch.equal(idx[robust], ref_idx[robust])
    with pytest.raises(ValueError, match="matmul must be callable"):
        kernels.encode_features(x, W, b_enc, b_dec, k, activation="relu", matmul="onednn")


def test_seeded_draws_held_back():
    """The discarded rows' seeded generators are out of the batch's dict while sampling, and
    back afterwards; the others stay (stand-ins shaped like the runner: tests/test_seeded_sampling.py
    runs the real engine)."""
    import numpy as np
    import torch

    gens = {0: torch.Generator().manual_seed(1), 2: torch.Generator().manual_seed(2),
            3: torch.Generator().manual_seed(3)}
    before = dict(gens)
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(generators=gens, num_reqs=3),
        discard_request_mask=SimpleNamespace(np=np.array([False, True, True, True])),  # row 3: stale
        device=torch.device("cpu"),
        sample_tokens=lambda grammar_output: ("sampled", dict(gens)),
    )
    assert vllm_surface.runner_device_type(runner) == "cpu"
    restore = vllm_surface.wrap_sample_tokens(
        runner, lambda orig, g: _sample_holding_back(runner, orig, g))
    held, (_, seen) = runner.sample_tokens("grammar")
    assert held == 1 and set(seen) == {0, 3}  # row 1 has no generator, row 2 is discarded, row 3 beyond num_reqs
    assert gens == before  # put back, the same objects
    restore()
    assert runner.sample_tokens("g") == ("sampled", before)

    with pytest.raises(ValueError):  # put back on errors too
        with vllm_surface.seeded_draws_held_back(runner):
            assert 2 not in gens
            raise ValueError
    assert gens == before


def _sample_holding_back(runner, orig, grammar_output):
    with vllm_surface.seeded_draws_held_back(runner) as held:
        return held, orig(grammar_output)


def test_a_row_without_its_generator_leaves_it_untouched():
    """What seeded_draws_held_back relies on, with vLLM's own native sampler: a seeded row left
    out of ``generators`` draws nothing from its generator."""
    import torch
    from vllm.v1.sample.ops.topk_topp_sampler import random_sample

    probs = torch.softmax(torch.randn(2, 50), dim=-1)
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    random_sample(probs.clone(), {})
    assert torch.equal(gen.get_state(), state)
    random_sample(probs.clone(), {1: gen})
    assert not torch.equal(gen.get_state(), state)
