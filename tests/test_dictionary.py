"""SparseDictionary: formulas, SAELens/sparsify files, refusals, hook point names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_runtime.dictionary import (
    DictionaryConfig,
    DictionaryFormatError,
    DictionaryOutput,
    SparseDictionary,
    saelens_config_dict,
)
from sae_runtime.hook_points import canonical_hook_point, parse_hook_point, validate_hook_point

D_IN, D_SAE, K = 24, 96, 8  # d_in deliberately not a power of two
ARCHS = ["standard", "topk", "jumprelu", "gated"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
META = {"model_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "hook_name": "blocks.3.hook_resid_post"}


def random_tensors(arch: str, seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE) -> dict:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    t = {"W_enc": randn(d_in, d_sae, scale=d_in ** -0.5), "W_dec": randn(d_sae, d_in, scale=0.3),
         "b_dec": randn(d_in, scale=0.1)}
    if arch == "gated":
        t.update(b_gate=randn(d_sae, scale=0.3), r_mag=randn(d_sae, scale=0.2),
                 b_mag=randn(d_sae, scale=0.3))
    else:
        t["b_enc"] = randn(d_sae, scale=0.3)
    if arch == "jumprelu":
        t["threshold"] = torch.rand(d_sae, generator=g) * 0.5
    return t


def make_cfg(arch: str, **extra) -> DictionaryConfig:
    data = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
            "metadata": dict(META), **extra}
    if arch == "topk":
        data.setdefault("k", K)
    return DictionaryConfig.model_validate(data)


def make_dict(arch: str, dtype=torch.float32, seed: int = 0, **extra) -> SparseDictionary:
    return SparseDictionary(make_cfg(arch, **extra), random_tensors(arch, seed), dtype=dtype)


def inputs(n: int = 16, seed: int = 1, d_in: int = D_IN) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))


def reference_encode(arch: str, t: dict, x: torch.Tensor, k: int = K,
                     apply_b_dec: bool = True) -> torch.Tensor:
    """The encode/decode formulas (README.md, "Dictionaries"), written out independently, in float64."""
    t = {name: v.double() for name, v in t.items()}
    x = x.double()
    xc = x - t["b_dec"] if apply_b_dec else x
    if arch == "gated":
        gate = xc @ t["W_enc"] + t["b_gate"]
        magnitude = torch.relu(xc @ (t["W_enc"] * torch.exp(t["r_mag"])) + t["b_mag"])
        return (gate > 0).double() * magnitude
    pre = xc @ t["W_enc"] + t["b_enc"]
    if arch == "standard":
        return torch.relu(pre)
    if arch == "jumprelu":
        return pre * (pre > t["threshold"]).double()
    values, indices = torch.relu(pre).topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


def reference_decode(t: dict, a: torch.Tensor) -> torch.Tensor:
    return a.double() @ t["W_dec"].double() + t["b_dec"].double()


# --------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_matches_reference_formula(arch):
    d, x = make_dict(arch), inputs()
    expected = reference_encode(arch, random_tensors(arch), x)
    torch.testing.assert_close(d.encode(x).double(), expected, atol=1e-5, rtol=1e-5)
    # the reference must exercise both active and inactive features
    assert 0 < int((expected > 0).sum()) < expected.numel()
    if arch == "topk":
        assert ((d.encode(x) > 0).sum(-1) == K).all()
    torch.testing.assert_close(d.decode(d.encode(x)).double(),
                               reference_decode(random_tensors(arch), expected),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_pre(arch):
    d, x, t = make_dict(arch), inputs(), random_tensors(arch)
    bias = t["b_gate"] if arch == "gated" else t["b_enc"]
    torch.testing.assert_close(d.encode_pre(x), (x - t["b_dec"]) @ t["W_enc"] + bias)
    if arch != "gated":
        # act(pre) is the encoding; for gated the pre-activation is the gate
        pre = d.encode_pre(x)
        assert torch.equal((d.encode(x) > 0), (d.encode(x) > 0) & (pre > 0))


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_encode_through_a_given_matmul(arch):
    """``encode(x, matmul)`` computes ``xin @ W_enc`` with ``matmul`` (the worker's packed
    copy of W_enc) on 2-D rows, whatever x's leading dimensions, and is otherwise encode."""
    d = make_dict(arch)
    x = inputs(12).reshape(3, 4, D_IN)
    calls: list[tuple[int, ...]] = []

    def matmul(xin: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(xin.shape))
        return 2.0 * (xin @ d.W_enc)  # doubled: shows the encode used it

    # the doubled GEMM is the encode of a dictionary whose W_enc is doubled
    t = random_tensors(arch)
    t["W_enc"] = 2.0 * t["W_enc"]
    twice = SparseDictionary(make_cfg(arch), t)
    torch.testing.assert_close(d.encode(x, matmul), twice.encode(x))
    assert calls == [(12, D_IN)]
    torch.testing.assert_close(d.encode(x, lambda xin: xin @ d.W_enc), d.encode(x))
    # some columns: top-k needs the full pre-activation (through matmul), the others only theirs
    calls.clear()
    ids = [3, 50]
    torch.testing.assert_close(d.feature_activations(x, ids, matmul),
                               (twice if arch == "topk" else d).feature_activations(x, ids))
    assert calls == ([(12, D_IN)] if arch == "topk" else [])
    with pytest.raises(ValueError, match="matmul"):
        make_dict("gated").encode(x, matmul)


def test_apply_b_dec_to_input_false():
    d = make_dict("standard", apply_b_dec_to_input=False)
    x = inputs()
    expected = reference_encode("standard", random_tensors("standard"), x, apply_b_dec=False)
    torch.testing.assert_close(d.encode(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_feature_activations_equal_dense_columns(arch, dtype):
    d = make_dict(arch, dtype=dtype)
    x = inputs(12).reshape(3, 4, D_IN)  # leading dimensions are free
    ids = [0, 7, 95, 42, 7]
    got = d.feature_activations(x, ids)
    assert got.shape == (3, 4, len(ids)) and got.dtype == dtype
    dense = d.encode(x)[..., ids]
    if arch == "topk":
        assert torch.equal(got, dense)
    else:  # a column slice of the matmul may round differently
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(got, dense, atol=tol, rtol=tol)
    if arch == "topk":  # all features by id give the dense encoding
        assert torch.equal(d.feature_activations(x, list(range(D_SAE))), d.encode(x))


def test_topk_ties_are_kept_consistently():
    # Three features tie for the k-th place (k=2): all tied ones are kept, in encode and
    # in feature_activations alike, whatever order a sort would have put them in.
    cfg = DictionaryConfig(architecture="topk", d_in=4, d_sae=6, k=2,
                           metadata={"hook_name": "layers.0"})
    W_enc = torch.zeros(4, 6)
    W_enc[0] = torch.tensor([3.0, 1.0, 1.0, 1.0, -1.0, 0.5])
    t = {"W_enc": W_enc, "W_dec": torch.randn(6, 4), "b_enc": torch.zeros(6),
         "b_dec": torch.zeros(4)}
    d = SparseDictionary(cfg, t)
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    acts = d.encode(x)
    assert acts[0].tolist() == [3.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert acts[1].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # fewer than k positive
    assert torch.equal(d.feature_activations(x, [5, 3, 4]), acts[:, [5, 3, 4]])


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_reconstruction_and_error(arch):
    d, x = make_dict(arch), inputs()
    out = d(x)
    assert isinstance(out, DictionaryOutput)
    assert torch.equal(out.feature_acts, d.encode(x))
    assert torch.equal(out.reconstruction, d.decode(out.feature_acts))
    assert torch.equal(out.error, x - out.reconstruction)
    assert torch.equal(d.reconstruction_error(x), out.error)
    expected_fvu = (out.error ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(d.fvu(x), expected_fvu)
    assert DictionaryOutput.error.__doc__ and "x - x_hat" in DictionaryOutput.error.__doc__


def test_attributes_and_to_dtype(tmp_path):
    d = make_dict("topk")
    assert (d.d_in, d.d_sae, d.k, d.hook_point, d.layer) == (D_IN, D_SAE, K, "layers.3", 3)
    assert d.model_name == META["model_name"] and d.activation == "topk"
    assert make_dict("standard").activation == "relu" and make_dict("standard").k is None
    assert make_dict("gated").b_enc is None and make_dict("gated").threshold is None
    d = d.to(torch.bfloat16)
    assert d.dtype == torch.bfloat16 and d.encode(inputs()).dtype == torch.bfloat16
    d.save(tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["dtype"] == "bfloat16"
    assert SparseDictionary.load(tmp_path).dtype == torch.bfloat16


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(tmp_path, arch, dtype):
    d = make_dict(arch, dtype=dtype)
    d.save(tmp_path)
    stored = load_file(str(tmp_path / "sae_weights.safetensors"))
    expected_names = {"W_enc", "W_dec", "b_dec"} | (
        {"b_gate", "r_mag", "b_mag"} if arch == "gated" else {"b_enc"}) | (
        {"threshold"} if arch == "jumprelu" else set())
    assert set(stored) == expected_names
    loaded = SparseDictionary.load(tmp_path)
    assert loaded.dtype == dtype and loaded.path == tmp_path
    for name, param in d.named_parameters():
        assert torch.equal(getattr(loaded, name), param), name
    assert not any(p.requires_grad for p in loaded.parameters())
    x = inputs()
    assert torch.equal(loaded.encode(x), d.encode(x))
    assert loaded.hook_point == d.hook_point and loaded.model_name == d.model_name
    # saving what was loaded writes the same cfg.json again
    assert saelens_config_dict(loaded.cfg) == saelens_config_dict(d.cfg, str(dtype)[6:])


def test_weights_stored_in_half_precision_are_served_in_the_cfg_dtype(tmp_path):
    d = make_dict("topk", dtype=torch.float32)
    d.save(tmp_path, storage_dtype="float16")
    stored = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}
    assert (tmp_path / "sae_weights.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others
    assert json.loads((tmp_path / "cfg.json").read_text())["dtype"] == "float32"
    loaded = SparseDictionary.load(tmp_path)
    assert loaded.dtype == torch.float32 and loaded.W_enc.dtype == torch.float32
    for name, param in d.named_parameters():
        assert torch.equal(getattr(loaded, name), param.half().float()), name


def test_cfg_extras_preserved_and_extra_files_untouched(tmp_path):
    d = make_dict("jumprelu", context_size=128,
                  metadata=dict(META, neuronpedia_id="x/y", sae_lens_version="6.5.0"))
    d.sparsity = torch.linspace(-6, 0, D_SAE)
    (tmp_path / "metrics.json").write_text('{"fvu": 0.1}')
    d.save(tmp_path, extra_files={"labels.json": {"0": "cats"}})
    raw = json.loads((tmp_path / "cfg.json").read_text())
    # context_size is one of SAELens' metadata keys: SAELens 6 reads it from metadata
    assert raw["metadata"]["context_size"] == 128 and raw["metadata"]["neuronpedia_id"] == "x/y"
    assert "context_size" not in raw
    assert "k" not in raw  # SAELens writes no k for jumprelu
    assert (tmp_path / "metrics.json").read_text() == '{"fvu": 0.1}'
    assert json.loads((tmp_path / "labels.json").read_text()) == {"0": "cats"}
    loaded = SparseDictionary.load(tmp_path)
    assert torch.equal(loaded.sparsity, d.sparsity)
    assert loaded.cfg.metadata.model_extra["context_size"] == 128
    loaded.sparsity = None
    loaded.save(tmp_path)  # a stale sparsity file must not outlive its weights
    assert not (tmp_path / "sparsity.safetensors").exists()
    assert (tmp_path / "metrics.json").exists()
    with pytest.raises(ValueError, match="plain file name"):
        d.save(tmp_path, extra_files={"cfg.json": {}})


@pytest.mark.parametrize("variant", ["top_level", "meta_key", "hook_point_key"])
def test_older_saelens_config_variants(tmp_path, variant):
    make_dict("standard").save(tmp_path)
    raw = json.loads((tmp_path / "cfg.json").read_text())
    metadata = raw.pop("metadata")
    if variant == "top_level":
        raw.update(model_name=metadata["model_name"], hook_name=metadata["hook_name"])
    elif variant == "meta_key":
        raw["meta"] = metadata
    else:
        raw.update(model_name=metadata["model_name"], hook_point="blocks.3.hook_resid_post")
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    d = SparseDictionary.load(tmp_path)
    assert d.hook_point == "layers.3" and d.model_name == META["model_name"]


def write_sparsify(directory: Path, t: dict, *, with_d_in: bool = True, **cfg) -> Path:
    directory.mkdir(parents=True)
    data = {"activation": "topk", "expansion_factor": D_SAE // D_IN, "normalize_decoder": True,
            "num_latents": 0, "k": K, "multi_topk": False, "skip_connection": False,
            "transcode": False, **cfg}
    if with_d_in:
        data["d_in"] = D_IN
    (directory / "cfg.json").write_text(json.dumps(data))
    save_file({"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"],
               "W_dec": t["W_dec"], "b_dec": t["b_dec"]}, str(directory / "sae.safetensors"))
    return directory


@pytest.mark.parametrize("with_d_in", [True, False])
def test_sparsify_import_equals_topk(tmp_path, with_d_in):
    t = random_tensors("topk")
    directory = write_sparsify(tmp_path / "layers.3", t, with_d_in=with_d_in)
    imported = SparseDictionary.load(directory, model_name="SmolLM2-135M-Instruct")
    assert (imported.architecture, imported.k, imported.d_in, imported.d_sae) == ("topk", K, D_IN, D_SAE)
    assert imported.hook_point == "layers.3" and imported.model_name == "SmolLM2-135M-Instruct"
    x = inputs()
    assert torch.equal(imported.encode(x), make_dict("topk").encode(x))
    # sparsify's own recipe: top k of relu(x - b_dec) @ encoder.weight.T + encoder.bias
    pre = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    values, indices = pre.topk(K)
    torch.testing.assert_close(imported.encode(x), torch.zeros_like(pre).scatter(-1, indices, values))
    # imported dictionaries save as SAELens directories
    imported.save(tmp_path / "converted")
    again = SparseDictionary.load(tmp_path / "converted")
    assert torch.equal(again.encode(x), imported.encode(x)) and again.hook_point == "layers.3"


def test_sparsify_hook_name_argument(tmp_path):
    directory = write_sparsify(tmp_path / "my_sae", random_tensors("topk"))
    with pytest.raises(DictionaryFormatError, match="pass hook_name"):
        SparseDictionary.load(directory)
    assert SparseDictionary.load(directory, hook_name="layers.5").hook_point == "layers.5"
    assert SparseDictionary.load(directory, hook_name="layers.5").model_name == "unknown"


@pytest.mark.parametrize("where", ["cfg", "metadata"])
@pytest.mark.parametrize("arch", ARCHS)
def test_norm_scaling_factor_is_folded(tmp_path, arch, where):
    for s in (4.0, 2.7):
        t = random_tensors(arch)
        extra = {"normalize_activations": "expected_average_only_in"}
        if where == "cfg":
            extra["norm_scaling_factor"] = s
        else:
            extra["metadata"] = dict(META, norm_scaling_factor=s)
        SparseDictionary(make_cfg(arch, **extra), t).save(tmp_path)
        d = SparseDictionary.load(tmp_path)
        assert d.cfg.normalize_activations == "none"
        assert d.cfg.metadata.model_extra["folded_norm_scaling_factor"] == s
        x = inputs()
        # trained on x * s: encode sees x * s, the reconstruction is divided by s
        unfolded = SparseDictionary(make_cfg(arch), t)
        expected_acts = unfolded.encode(x * s)
        expected_recon = unfolded.decode(expected_acts) / s
        if s == 4.0:  # a power of two: the fold is exact to the bit
            assert torch.equal(d.encode(x), expected_acts)
        torch.testing.assert_close(d.encode(x), expected_acts)
        torch.testing.assert_close(d(x).reconstruction, expected_recon)
        d.save(tmp_path / "again")
        assert torch.equal(SparseDictionary.load(tmp_path / "again").encode(x), d.encode(x))


def test_topk_rescale_acts_by_decoder_norm_is_folded(tmp_path):
    t = random_tensors("topk")
    SparseDictionary(make_cfg("topk", rescale_acts_by_decoder_norm=True), t).save(tmp_path)
    d = SparseDictionary.load(tmp_path)
    x = inputs()
    # SAELens: pre * ||W_dec[i]||, top-k, then acts / ||W_dec[i]|| @ W_dec + b_dec
    norm = t["W_dec"].norm(dim=-1)
    pre = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norm
    values, indices = pre.topk(K)
    acts = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    torch.testing.assert_close(d.encode(x), acts)
    torch.testing.assert_close(d.decode(d.encode(x)), (acts / norm) @ t["W_dec"] + t["b_dec"])
    assert d.cfg.model_extra["rescale_acts_by_decoder_norm"] is False


# --------------------------------------------------------------------------- refusals


def _edit_cfg(**changes):
    def edit(p: Path):
        raw = json.loads((p / "cfg.json").read_text())
        for key, value in changes.items():
            if value is None:
                raw.pop(key, None)
            else:
                raw[key] = value
        (p / "cfg.json").write_text(json.dumps(raw))
    return edit


def _edit_tensor(name, value=None):
    def edit(p: Path):
        t = load_file(str(p / "sae_weights.safetensors"))
        if value is None:
            del t[name]
        else:
            t[name] = value(t[name])
        save_file(t, str(p / "sae_weights.safetensors"))
    return edit


def _nan_at_0(t):
    t = t.clone()
    t.view(-1)[0] = math.nan
    return t


def _inf_at_3(t):
    t = t.clone()
    t.view(-1)[3] = math.inf
    return t


REFUSALS = {
    # name: (architecture, edit(dir), load kwargs, words expected in the message)
    "missing_dir": ("standard", lambda p: None, {"sub": "nope"}, ["nope", "does not exist"]),
    "missing_cfg": ("standard", lambda p: (p / "cfg.json").unlink(), {}, ["missing cfg.json"]),
    "invalid_json": ("standard", lambda p: (p / "cfg.json").write_text("{oops"), {},
                     ["cfg.json", "invalid JSON"]),
    "missing_weights": ("standard", lambda p: (p / "sae_weights.safetensors").unlink(), {},
                        ["missing weights file", "sae_weights.safetensors"]),
    "corrupt_weights": ("standard", lambda p: (p / "sae_weights.safetensors").write_bytes(b"xx"),
                        {}, ["sae_weights.safetensors", "cannot read"]),
    "missing_tensor": ("standard", _edit_tensor("b_enc"), {},
                       ["sae_weights.safetensors", "missing tensor 'b_enc'"]),
    "missing_threshold": ("jumprelu", _edit_tensor("threshold"), {}, ["missing tensor 'threshold'"]),
    "missing_r_mag": ("gated", _edit_tensor("r_mag"), {}, ["missing tensor 'r_mag'"]),
    "wrong_shape": ("standard", _edit_tensor("W_enc", lambda t: t.T.contiguous()), {},
                    ["'W_enc'", "wrong shape", "expected [24, 96]", "got [96, 24]"]),
    "wrong_bias_shape": ("standard", _edit_tensor("b_dec", lambda t: t[:-1].contiguous()), {},
                         ["'b_dec'", "expected [24]", "got [23]"]),
    "unknown_architecture": ("standard", _edit_cfg(architecture="batchtopk_v2"), {},
                             ["cfg.json", "unknown architecture 'batchtopk_v2'"]),
    "topk_without_k": ("topk", _edit_cfg(k=None), {}, ["cfg.json", "needs k"]),
    "k_too_large": ("topk", _edit_cfg(k=D_SAE + 1), {}, ["k must be between"]),
    "nan_weight": ("standard", _edit_tensor("W_dec", _nan_at_0), {}, ["'W_dec'", "NaN or Inf"]),
    "inf_threshold": ("jumprelu", _edit_tensor("threshold", _inf_at_3), {},
                      ["'threshold'", "NaN or Inf"]),
    "d_in_mismatch": ("standard", lambda p: None, {"expected_d_in": 576},
                      ["d_in=24", "hidden size 576"]),
    "hook_mismatch": ("standard", lambda p: None, {"expected_hook_point": "layers.4"},
                      ["layers.3", "layers.4"]),
    "per_token_norm": ("standard", _edit_cfg(normalize_activations="layer_norm"), {},
                       ["normalize_activations='layer_norm'", "not supported"]),
    "norm_without_factor": ("standard", _edit_cfg(normalize_activations="expected_average_only_in"),
                            {}, ["norm_scaling_factor"]),
    "attention_hook": ("standard", _edit_cfg(metadata={"model_name": "m", "hook_name": "blocks.3.attn.hook_z"}),
                       {}, ["unsupported hook point", "blocks.3.attn.hook_z"]),
    "no_hook_name": ("standard", _edit_cfg(metadata={"model_name": "m"}), {},
                     ["metadata.hook_name: missing"]),
    "bad_dtype": ("standard", _edit_cfg(dtype="int8"), {}, ["unsupported dtype"]),
    "hook_z_reshape": ("standard", _edit_cfg(reshape_activations="hook_z"), {},
                       ["reshape_activations"]),
    "bad_sparsity": ("standard", lambda p: save_file({"sparsity": torch.zeros(3)},
                                                     str(p / "sparsity.safetensors")), {},
                     ["sparsity.safetensors", "expected [96]", "got [3]"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_load_refuses(tmp_path, case):
    arch, edit, kwargs, words = REFUSALS[case]
    make_dict(arch).save(tmp_path)
    edit(tmp_path)
    kwargs = dict(kwargs)
    path = tmp_path / kwargs.pop("sub") if "sub" in kwargs else tmp_path
    with pytest.raises(DictionaryFormatError) as info:
        SparseDictionary.load(path, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


SPARSIFY_REFUSALS = {
    "transcoder": ({"transcode": True}, None, ["transcode=true"]),
    "skip": ({"skip_connection": True}, None, ["skip_connection=true"]),
    "groupmax": ({"activation": "groupmax"}, None, ["activation='groupmax'"]),
    "no_k": ({"k": None}, None, ["missing k"]),
    "no_decoder": ({}, "W_dec", ["sae.safetensors", "missing tensor 'W_dec'"]),
    "wrong_latents": ({"num_latents": 50}, None, ["encoder.weight", "expected [50, 24]"]),
}


@pytest.mark.parametrize("case", list(SPARSIFY_REFUSALS))
def test_sparsify_refusals(tmp_path, case):
    cfg, drop, words = SPARSIFY_REFUSALS[case]
    directory = write_sparsify(tmp_path / "layers.2", random_tensors("topk"), **cfg)
    if cfg.get("k", 1) is None:
        raw = json.loads((directory / "cfg.json").read_text())
        del raw["k"]
        (directory / "cfg.json").write_text(json.dumps(raw))
    if drop:
        t = load_file(str(directory / "sae.safetensors"))
        del t[drop]
        save_file(t, str(directory / "sae.safetensors"))
    with pytest.raises(DictionaryFormatError) as info:
        SparseDictionary.load(directory)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_constructor_checks_shapes():
    t = random_tensors("standard")
    t["W_dec"] = t["W_dec"][:, :5]
    with pytest.raises(DictionaryFormatError, match="wrong shape"):
        SparseDictionary(make_cfg("standard"), t)


# --------------------------------------------------------------------------- hook points


def test_hook_point_names():
    assert parse_hook_point("layers.12") == 12
    assert parse_hook_point("blocks.12.hook_resid_post") == 12
    assert parse_hook_point("blocks.12.hook_resid_pre") == 11
    assert parse_hook_point("model.layers.0") == 0
    assert canonical_hook_point("blocks.7.hook_resid_post") == "layers.7"
    assert validate_hook_point("layers.29", 30) == "layers.29"
    # The stream entering layer 0 (the embeddings) is hook point -1.
    assert parse_hook_point("blocks.0.hook_resid_pre") == parse_hook_point("embeddings") == -1
    assert canonical_hook_point("blocks.0.hook_resid_pre") == "embeddings"
    assert canonical_hook_point("blocks.1.hook_resid_pre") == "layers.0"
    for bad in ["layers.x", "blocks.3.hook_mlp_out", "layers.3.mlp", "layers.-1", "embed", ""]:
        with pytest.raises(ValueError):
            parse_hook_point(bad)
    with pytest.raises(ValueError, match="30 decoder layers"):
        validate_hook_point("layers.30", 30)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_encode_on_cuda_matches_cpu(tmp_path, arch):
    make_dict(arch).save(tmp_path)
    cpu = SparseDictionary.load(tmp_path)
    gpu = SparseDictionary.load(tmp_path, device="cuda")
    x = inputs(64)
    torch.testing.assert_close(gpu.encode(x.cuda()).cpu(), cpu.encode(x), atol=1e-4, rtol=1e-4)
    ids = [1, 50, 95]
    torch.testing.assert_close(gpu.feature_activations(x.cuda(), ids).cpu(),
                               cpu.feature_activations(x, ids), atol=1e-4, rtol=1e-4)
    gpu16 = gpu.to(torch.bfloat16)
    assert gpu16.encode(x.cuda()).dtype == torch.bfloat16
