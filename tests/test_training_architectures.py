"""sae-train on every decoder family of ``tests/tiny_models.py`` (CPU, tiny random models).

Three things per family, none of them Llama-specific in the code under test:

* the harvested stream (``ModelActivations.residuals``, i.e. ``hf_streams.residual_streams``)
  at ``embeddings`` (-1), ``layers.1`` and the last layer equals transformers' own
  numbers: ``hidden_states[0]``, ``hidden_states[2]``, and for the last layer the raw
  output of the last decoder layer taken with a forward hook written here (transformers'
  ``hidden_states[-1]`` is the final-norm output instead); the forward stops after the
  deepest requested hook point;
* the evaluation's splice (``_CleanPass.logits_with``) gives the clean logits back when
  the stream is put back unchanged, without recomputing the layers before the hook
  point, and the same logits as a full forward with the stream replaced by a hook when
  it is changed;
* ``sae-train --model DIR`` (its ``main``, in-process) on llama, gpt2 and gemma2 writes a
  dictionary that loads with the canonical hook point and the model's served name, that
  the server's registry accepts for that model, and whose metrics are finite.

Tolerance 1e-5 absolute: the same float32 computation on the same inputs (measured: 0).
The whole file takes about 30 s on the shared 2-core machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sae_runtime import hf_streams
from tests.tiny_models import FAMILIES, make_tiny_model

TEXT = [
    "The committee met on Tuesday to consider the budget for the coming year. Members "
    "argued at length about roads, schools and the harbour, and agreed to meet again.",
    "It was a bright cold day in April, and the clocks were striking the hour as the "
    "train pulled slowly out of the station towards the northern hills and the sea.",
    "Congress shall make provision for the common defence and general welfare, and the "
    "President shall from time to time give information on the state of the Union.",
    "She opened the letter, read it twice, and then walked down to the river where the "
    "boats were moored, thinking about what her brother had written from the city.",
]
PROMPT = "The capital of France is Paris, and the capital of Italy is Rome."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: tiny tensors run faster on one thread of the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_tiny_model(family, root / family, default_model_dir)
        return built[family]

    return get


@pytest.fixture(scope="module")
def sources(tiny_dirs):
    from sae_runtime.training.activations import ModelActivations

    loaded: dict = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = ModelActivations(tiny_dirs(family))
        return loaded[family]

    return get


def _ids(source, batch: int = 2) -> torch.Tensor:
    """``[batch, seq]`` token ids: the prompt, and (batch 2) the prompt reversed."""
    ids = torch.tensor(source.tokenizer(PROMPT)["input_ids"])
    return torch.stack([ids, ids.flip(0)][:batch])


@pytest.mark.parametrize("family", FAMILIES)
def test_harvested_stream_equals_transformers_hidden_states(family, sources):
    source = sources(family)
    n = source.num_layers
    assert n == 3 and source.d_model == 128
    ids = _ids(source)
    got = source.residuals(ids, [-1, 1, n - 1])
    assert set(got) == {-1, 1, n - 1}
    # reference: transformers' output_hidden_states, and the raw output of the last layer
    last_out: dict[str, torch.Tensor] = {}
    handle = source.layers[n - 1].register_forward_hook(
        lambda _m, _i, o: last_out.__setitem__("x", (o[0] if isinstance(o, tuple) else o).float()))
    try:
        with torch.no_grad():
            full = source.model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    hs = full.hidden_states
    assert len(hs) == n + 1
    for L in got:
        assert got[L].dtype == torch.float32 and got[L].shape == (*ids.shape, 128)
    torch.testing.assert_close(got[-1], hs[0].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], hs[2].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[n - 1], last_out["x"], atol=1e-5, rtol=0)
    # hook points are distinct streams (a harvest of the wrong one would pass none of the above)
    assert not torch.allclose(got[1], hs[1].float(), atol=1e-3)
    # harvest(): every token but position 0, in order, at each hook point
    acts = source.harvest([ids[0]], [-1, 1])
    for L in (-1, 1):
        assert acts[L].shape == (ids.shape[1] - 1, 128)
        torch.testing.assert_close(acts[L], got[L][0, 1:], atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_stops_after_the_deepest_hook_point(family, sources):
    source = sources(family)
    calls = {L: 0 for L in range(source.num_layers)}
    handles = [layer.register_forward_hook(lambda *_a, L=L: calls.__setitem__(L, calls[L] + 1))
               for L, layer in enumerate(source.layers)]
    head_calls = []
    handles.append(source.model.get_output_embeddings().register_forward_hook(
        lambda *_a: head_calls.append(1)))
    try:
        ids = _ids(source, 1)
        source.residuals(ids, [-1])
        assert calls == {0: 0, 1: 0, 2: 0}  # stopped at layer 0's input
        source.residuals(ids, [-1, 1])
        assert calls == {0: 1, 1: 1, 2: 0}
        source.residuals(ids, [2])
        assert calls == {0: 2, 1: 2, 2: 1}
        assert not head_calls
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluation_splice_is_exact_and_skips_the_prefix(family, sources):
    """At each hook point: putting ``x`` back gives the clean logits; a changed stream
    gives what a full forward with that stream hooked in gives; layers before the hook
    point do not run again."""
    from sae_runtime.training.evaluate import _CleanPass

    source = sources(family)
    ids = _ids(source)
    first_layer_children = list(source.layers[0].children())
    for layer in (-1, 1, source.num_layers - 1):
        clean = _CleanPass(source, ids, layer)
        assert clean.x.shape == (*ids.shape, 128)
        inner_calls = []
        handles = [c.register_forward_hook(lambda *_a, calls=inner_calls: calls.append(1))
                   for c in first_layer_children]
        try:
            again = clean.logits_with(clean.x.clone())
            changed = clean.logits_with(clean.x.roll(1, dims=-1))  # a direction change:
            # a mere rescale would vanish in the final RMSNorm after the last layer
        finally:
            for h in handles:
                h.remove()
        torch.testing.assert_close(again, clean.logits, atol=1e-5, rtol=0)
        assert bool(inner_calls) == (layer == -1), f"layer 0 re-ran for hook point {layer}"
        reference = hf_streams.forward_with_stream(source.model, ids, layer, clean.x.roll(1, dims=-1),
                                                   skip_prefix=False).logits.float()
        torch.testing.assert_close(changed, reference, atol=1e-5, rtol=0)
        assert (changed - clean.logits).abs().max() > 1e-3  # the splice reaches the logits


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("arch_corpus")
    for i, text in enumerate(TEXT * 2):
        (root / f"doc{i:02d}.txt").write_text(f"{text} {text}")
    return root


@pytest.mark.parametrize("family,hook_flag,canonical", [
    ("llama", "layers.1", "layers.1"),
    ("gpt2", "embeddings", "embeddings"),
    ("gemma2", "blocks.3.hook_resid_pre", "layers.2"),  # SAELens alias of the last layer
])
def test_sae_train_cli_on_family(family, hook_flag, canonical, tiny_dirs, corpus, tmp_path, capsys):
    from sae_runtime.dictionary import SparseDictionary
    from sae_runtime.hook_points import saelens_hook_name
    from sae_runtime.model_info import read_model_info
    from sae_runtime.registry import DictionaryRegistry
    from sae_runtime.training.cli import main

    model_dir = tiny_dirs(family)
    out = tmp_path / "out"
    rc = main(["--model", str(model_dir), "--hook-point", hook_flag, "--data", str(corpus),
               "--ctx-len", "32", "--eval-fraction", "0.25", "--max-tokens", "600",
               "--d-sae", "64", "--k", "8", "--batch-size", "64", "--steps", "6",
               "--warmup-steps", "1", "--eval-tokens", "96", "--cache-dir", str(tmp_path / "cache"),
               "--no-progress", "--threads", "1", "--harvest", "transformers", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    info = read_model_info(model_dir)
    d = SparseDictionary.load(out, expected_d_in=info.hidden_size, expected_hook_point=canonical)
    assert d.hook_point == canonical and d.model_name == info.name == family
    raw = json.loads((out / "cfg.json").read_text())
    assert raw["metadata"]["hook_point"] == canonical and raw["metadata"]["model_name"] == info.name
    assert raw["metadata"]["hook_name"] == saelens_hook_name(canonical)  # what SAELens reads
    # what `sae-serve --model DIR --dictionary OUT` does with it before any engine starts
    registry = DictionaryRegistry.load([out], model_name=info.name, num_layers=info.num_layers,
                                       hidden_size=info.hidden_size)
    assert registry.hook_points() == [canonical]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_name"] == info.name and metrics["hook_point"] == canonical
    for key in ("fvu", "l0", "dead_frac", "ce_loss_clean", "ce_loss_with_sae",
                "ce_loss_zero_ablated", "ce_loss_recovered", "kl_div"):
        assert math.isfinite(metrics["eval"][key]), (key, metrics["eval"])
    assert metrics["eval"]["eval_tokens"] > 0 and metrics["eval"]["lm_eval_predictions"] > 0
    assert "wrote" in capsys.readouterr().out


def test_sae_train_refuses_a_hook_point_the_model_lacks(tiny_dirs, tmp_path, capsys):
    from sae_runtime.training.cli import main

    rc = main(["--model", str(tiny_dirs("gpt2")), "--hook-point", "layers.3", "-o", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "layers.3" in err and "3 decoder layers" in err
    assert not (tmp_path / "o").exists()
