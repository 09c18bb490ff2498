"""Dictionary sources: Gemma Scope / Llama Scope files, the HF cache, SAELens release names.

All offline: every file is written here in the layout its publisher uses (a Gemma Scope
``layer_3/width_1k/average_l0_10/params.npz``, a Hugging Face cache tree
``models--ORG--NAME/{refs,blobs,snapshots}``, a SAELens ``pretrained_saes.yaml``), and the
loaded dictionary is compared with the publisher's formula written out here. Where the
formula is SAELens', the comment names the SAELens 6.x function it mirrors.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from sae_runtime import dictionary_sources as sources
from sae_runtime.dictionary import DictionaryFormatError, SparseDictionary
from sae_runtime.dictionary_sources import (
    DictionaryNotCachedError,
    DictionarySourceError,
    SAELensNotInstalledError,
    load_dictionary,
    parse_hf_spec,
    resolve_dictionary_source,
)
from sae_runtime.registry import DictionaryRegistry

D_IN, D_SAE = 16, 40
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
GEMMA_REPO = "google/gemma-scope-2b-pt-res"
GEMMA_SUB = "layer_3/width_1k/average_l0_10"


def gemma_params(seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, np.ndarray]:
    """Random Gemma Scope parameters; b_dec large so that subtracting it would show."""
    g = np.random.default_rng(seed)
    return {"W_enc": (g.standard_normal((d_in, d_sae)) / d_in ** 0.5).astype(np.float32),
            "W_dec": g.standard_normal((d_sae, d_in)).astype(np.float32),
            "b_enc": (0.3 * g.standard_normal(d_sae)).astype(np.float32),
            "b_dec": (2.0 * g.standard_normal(d_in)).astype(np.float32),
            "threshold": (0.4 * g.random(d_sae)).astype(np.float32)}


def write_npz(folder: Path, params: dict, name: str = "params.npz") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / name, **params)
    return folder / name


def inputs(n: int = 32, seed: int = 1, d_in: int = D_IN) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed)) * 2


def t64(params: dict) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v) if isinstance(v, np.ndarray) else v).double()
            for k, v in params.items()}


def gemma_scope_encode(params: dict, x: torch.Tensor) -> torch.Tensor:
    """Gemma Scope's JumpReLU (and SAELens JumpReLUSAE.encode with apply_b_dec_to_input
    False): pre = x @ W_enc + b_enc, a = relu(pre) * (pre > threshold); b_dec NOT subtracted."""
    p = t64(params)
    pre = x.double() @ p["W_enc"] + p["b_enc"]
    return torch.relu(pre) * (pre > p["threshold"])


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- Gemma Scope


def test_gemma_scope_folder_and_npz_file(tmp_path):
    params = gemma_params()
    npz = write_npz(tmp_path / GEMMA_SUB, params)
    x = inputs()
    want = gemma_scope_encode(params, x)
    assert 0 < int((want > 0).sum()) < want.numel()  # both firing and silent features
    # subtracting b_dec first (the SAELens default) would give other numbers
    p = t64(params)
    pre_b = (x.double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    assert not torch.allclose(want, torch.relu(pre_b) * (pre_b > p["threshold"]))

    for source in (tmp_path / GEMMA_SUB, npz, str(npz)):
        d = SparseDictionary.load(source)
        assert (d.architecture, d.d_in, d.d_sae) == ("jumprelu", D_IN, D_SAE)
        assert d.hook_point == "layers.3" and d.hook_name == "blocks.3.hook_resid_post"
        assert d.model_name == "unknown" and d.cfg.apply_b_dec_to_input is False
        assert d.cfg.normalize_activations == "none" and d.dtype == torch.float32
        assert_close(d.encode(x), want)
        assert_close(d.decode(d.encode(x)), want @ p["W_dec"] + p["b_dec"])
        assert d.path == Path(source) and d.source == str(source)
    assert SparseDictionary.load(npz, model_name="gemma-2-2b").model_name == "gemma-2-2b"
    # a hook name from the caller wins over the folder layout
    assert SparseDictionary.load(npz, hook_name="layers.7").hook_point == "layers.7"


def test_gemma_scope_model_from_repo_folder_and_saved_copy(tmp_path):
    params = gemma_params(seed=2)
    # `hf download google/gemma-scope-9b-it-res --local-dir gemma-scope-9b-it-res` layout
    folder = tmp_path / "gemma-scope-9b-it-res" / "layer_20" / "width_1k" / "average_l0_5"
    write_npz(folder, params)
    d = SparseDictionary.load(folder)
    # SAELens get_gemma_2_config_from_hf: model from the repo name, -it kept
    assert d.model_name == "gemma-2-9b-it" and d.hook_point == "layers.20"
    # served as it is, saved as an equivalent SAELens directory
    d.save(tmp_path / "converted")
    again = SparseDictionary.load(tmp_path / "converted")
    x = inputs()
    assert torch.equal(again.encode(x), d.encode(x)) and again.hook_point == "layers.20"
    assert again.cfg.apply_b_dec_to_input is False


def test_gemma_scope_needs_a_hook_point(tmp_path):
    npz = write_npz(tmp_path / "my_sae", gemma_params())
    with pytest.raises(DictionaryFormatError) as info:
        SparseDictionary.load(npz)
    assert str(npz) in str(info.value) and "cannot tell the hook point" in str(info.value)
    assert "layer_12/width_16k/average_l0_71/params.npz" in str(info.value)
    assert SparseDictionary.load(npz, hook_name="layers.5").hook_point == "layers.5"


def _gemma_edit(name, value=None):
    def edit(params):
        if value is None:
            del params[name]
        else:
            params[name] = value(params[name])
    return edit


def _nan_first(a):
    a = a.copy()
    a.flat[0] = np.nan
    return a


GEMMA_REFUSALS = {
    # case: (folder below tmp_path, edit of the parameters, words expected in the message)
    "missing_threshold": (GEMMA_SUB, _gemma_edit("threshold"),
                          ["params.npz", "missing key 'threshold'"]),
    "missing_W_dec": (GEMMA_SUB, _gemma_edit("W_dec"), ["params.npz", "missing key 'W_dec'"]),
    "wrong_shape": (GEMMA_SUB, _gemma_edit("W_dec", lambda a: a.T.copy()),
                    ["params.npz", "'W_dec'", "wrong shape", f"expected [{D_SAE}, {D_IN}]",
                     f"got [{D_IN}, {D_SAE}]", "transposed"]),
    "wrong_threshold": (GEMMA_SUB, _gemma_edit("threshold", lambda a: a[:-1].copy()),
                        ["params.npz", "'threshold'", f"expected [{D_SAE}]"]),
    "nan": (GEMMA_SUB, _gemma_edit("W_enc", _nan_first), ["params.npz", "'W_enc'", "NaN or Inf"]),
    "inf_threshold": (GEMMA_SUB, _gemma_edit("threshold", lambda a: a * np.inf),
                      ["params.npz", "'threshold'", "NaN or Inf"]),
    "mlp_repo": (f"gemma-scope-2b-pt-mlp/{GEMMA_SUB}", None,
                 ["params.npz", "gemma-scope-2b-pt-mlp", "MLP output", "residual-stream"]),
    "att_repo": (f"gemma-scope-2b-pt-att/{GEMMA_SUB}", None, ["attention output"]),
    "transcoders": (f"gemma-scope-2b-pt-transcoders/{GEMMA_SUB}", None, ["transcoder"]),
    "mlp_folder": (f"saes/mlp/{GEMMA_SUB}", None, ["folder 'mlp'", "MLP output"]),
    "embedding": ("gemma-scope-2b-pt-res/embedding/width_4k/average_l0_6", None,
                  ["params.npz", "embedding", "cannot be served"]),
}


@pytest.mark.parametrize("case", list(GEMMA_REFUSALS))
def test_gemma_scope_refusals(tmp_path, case):
    folder, edit, words = GEMMA_REFUSALS[case]
    params = gemma_params()
    if edit is not None:
        edit(params)
    npz = write_npz(tmp_path / "x" / folder, params)
    with pytest.raises(DictionaryFormatError) as info:
        SparseDictionary.load(npz.parent)
    message = str(info.value)
    assert str(npz) in message, message
    for word in words:
        assert word in message, (word, message)


def test_gemma_scope_unreadable_and_missing_files(tmp_path):
    npz = tmp_path / GEMMA_SUB / "params.npz"
    npz.parent.mkdir(parents=True)
    npz.write_bytes(b"not a zip")
    with pytest.raises(DictionaryFormatError, match=r"params\.npz: cannot read npz file"):
        SparseDictionary.load(npz.parent)
    empty = tmp_path / "layer_1" / "width_1k"
    write_npz(empty / "average_l0_3", gemma_params())
    with pytest.raises(DictionaryFormatError) as info:  # a width folder, not a dictionary
        SparseDictionary.load(empty)
    assert "missing cfg.json" in str(info.value) and "params.npz" in str(info.value)
    assert "subfolders are dictionaries: average_l0_3" in str(info.value)
    with pytest.raises(DictionaryFormatError, match="does not exist"):
        SparseDictionary.load(tmp_path / "nope" / "params.npz")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(DictionaryFormatError, match="not a dictionary"):
        SparseDictionary.load(tmp_path / "weights.bin")


def test_gemma_scope_2_safetensors_folder(tmp_path):
    # SAELens gemma_3 converter: params.safetensors with lower-case w_enc / w_dec.
    params = gemma_params(seed=3)
    folder = tmp_path / "gemma-scope-2-1b-pt" / "resid_post" / "layer_4_width_1k_l0_small"
    folder.mkdir(parents=True)
    save_file({("w_" + k[2:] if k.startswith("W_") else k): torch.from_numpy(v)
               for k, v in params.items()}, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"architecture": "jump_relu", "model_name": "gemma-v3-1b-pt"}))
    d = SparseDictionary.load(folder)
    # get_gemma_3_config_from_hf: "google/" added, "-v3" -> "-3"
    assert d.model_name == "google/gemma-3-1b-pt" and d.hook_point == "layers.4"
    assert_close(d.encode(inputs()), gemma_scope_encode(params, inputs()))
    attn = tmp_path / "g" / "attn_out" / "layer_4_width_1k_l0_small"
    shutil.copytree(folder, attn)
    with pytest.raises(DictionaryFormatError, match="'attn_out' is not the residual stream"):
        SparseDictionary.load(attn)


def test_registry_serves_gemma_scope_files(tmp_path):
    a = write_npz(tmp_path / "gemma-scope-2b-pt-res" / GEMMA_SUB, gemma_params(seed=4))
    b = write_npz(tmp_path / "gemma-scope-2b-pt-res" / "layer_5/width_1k/average_l0_9",
                  gemma_params(seed=5))
    reg = DictionaryRegistry.load([a, str(b.parent)], model_name="google/gemma-2-2b",
                                  num_layers=8, hidden_size=D_IN)
    assert reg.ids() == ["layers.3/jumprelu-40", "layers.5/jumprelu-40"]
    assert reg.get("layers.3/jumprelu-40").source == str(a)
    assert reg.get("layers.5/jumprelu-40").metrics is None
    with pytest.raises(DictionaryFormatError, match="hidden size 32"):
        DictionaryRegistry.load([a], model_name="google/gemma-2-2b", num_layers=8, hidden_size=32)


# --------------------------------------------------------------------------- HF cache


def add_to_cache(cache: Path, repo_id: str, staged: Path, *, commit: str = COMMIT,
                 refs: tuple[str, ...] = ("main",)) -> Path:
    """Move the files under ``staged`` into the cache the way huggingface_hub stores them:
    content in ``blobs/<hash>``, ``snapshots/<commit>/<path>`` a relative symlink to it,
    ``refs/<branch>`` holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in staged.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(staged)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv(sources.SAELENS_YAML_ENV, raising=False)
    return cache


def stage_gemma(tmp_path: Path, params: dict, sub: str = GEMMA_SUB, name: str = "stage") -> Path:
    stage = tmp_path / name
    write_npz(stage / sub, params)
    return stage


def test_hf_gemma_scope_from_cache(tmp_path, hf_cache):
    params = gemma_params(seed=6)
    snapshot = add_to_cache(hf_cache, GEMMA_REPO, stage_gemma(tmp_path, params))
    spec = f"hf:{GEMMA_REPO}/{GEMMA_SUB}"
    d = SparseDictionary.load(spec)
    assert d.model_name == "gemma-2-2b" and d.hook_point == "layers.3"
    assert d.path == snapshot / GEMMA_SUB and d.source == spec
    meta = d.cfg.metadata.model_extra
    assert (meta["hf_repo_id"], meta["hf_path"], meta["hf_revision"]) == (
        GEMMA_REPO, GEMMA_SUB, COMMIT)
    x = inputs()
    assert_close(d.encode(x), gemma_scope_encode(params, x))
    # the cache folder itself (what a worker gets as a path) loads the same dictionary
    same = SparseDictionary.load(d.path)
    assert torch.equal(same.encode(x), d.encode(x)) and same.model_name == "gemma-2-2b"
    # and the registry takes the same string, keeping it for the worker
    reg = DictionaryRegistry.load([spec], model_name="google/gemma-2-2b", num_layers=4,
                                  hidden_size=D_IN)
    assert reg.get("layers.3/jumprelu-40").source == spec
    assert reg.get("layers.3/jumprelu-40").path == snapshot / GEMMA_SUB


def test_hf_revisions(tmp_path, hf_cache):
    old, new = gemma_params(seed=7), gemma_params(seed=8)
    add_to_cache(hf_cache, GEMMA_REPO, stage_gemma(tmp_path, old, name="old"),
                 commit=OTHER_COMMIT, refs=("v1",))
    add_to_cache(hf_cache, GEMMA_REPO, stage_gemma(tmp_path, new, name="new"))
    x = inputs()
    for spec, params, commit in [
        (f"hf:{GEMMA_REPO}/{GEMMA_SUB}", new, COMMIT),
        (f"hf:{GEMMA_REPO}@v1/{GEMMA_SUB}", old, OTHER_COMMIT),
        (f"hf:{GEMMA_REPO}@{OTHER_COMMIT}/{GEMMA_SUB}", old, OTHER_COMMIT),
    ]:
        d = load_dictionary(spec)
        assert_close(d.encode(x), gemma_scope_encode(params, x))
        assert d.cfg.metadata.model_extra["hf_revision"] == commit
    with pytest.raises(DictionaryNotCachedError) as info:
        load_dictionary(f"hf:{GEMMA_REPO}@v2/{GEMMA_SUB}")
    assert "revision v2" in str(info.value) and "--revision v2" in str(info.value)


def test_hf_saelens_and_sparsify_folders(tmp_path, hf_cache):
    from tests.test_dictionary import make_dict, random_tensors, write_sparsify

    stage = tmp_path / "stage"
    saelens = make_dict("topk")
    saelens.save(stage / "res" / "layer_3")
    write_sparsify(stage / "layers.2", random_tensors("topk", seed=3))
    add_to_cache(hf_cache, "someone/saes", stage)
    x = torch.randn(5, saelens.d_in)
    d = load_dictionary("hf:someone/saes/res/layer_3")
    assert torch.equal(d.encode(x), saelens.encode(x)) and d.hook_point == "layers.3"
    s = load_dictionary("hf:someone/saes/layers.2", model_name="SmolLM2-135M-Instruct")
    assert s.architecture == "topk" and s.hook_point == "layers.2"
    assert s.model_name == "SmolLM2-135M-Instruct"


def test_hf_missing_from_cache(tmp_path, hf_cache):
    add_to_cache(hf_cache, GEMMA_REPO, stage_gemma(tmp_path, gemma_params()))
    with pytest.raises(DictionaryNotCachedError) as info:
        load_dictionary("hf:google/gemma-scope-9b-pt-res/layer_9/width_16k/average_l0_88")
    message = str(info.value)
    for word in ["google/gemma-scope-9b-pt-res", "layer_9/width_16k/average_l0_88",
                 "is not in the cache", str(hf_cache), "Nothing is downloaded",
                 "hf download google/gemma-scope-9b-pt-res --include "
                 "'layer_9/width_16k/average_l0_88/*'",
                 "huggingface-cli download google/gemma-scope-9b-pt-res"]:
        assert word in message, (word, message)
    with pytest.raises(DictionaryNotCachedError) as info:  # repo cached, folder not
        DictionaryRegistry.load([f"hf:{GEMMA_REPO}/layer_12/width_16k/average_l0_82"],
                                model_name="gemma-2-2b", num_layers=26, hidden_size=D_IN)
    message = str(info.value)
    for word in ["folder 'layer_12/width_16k/average_l0_82'", GEMMA_REPO, COMMIT, str(hf_cache),
                 f"hf download {GEMMA_REPO} --include 'layer_12/width_16k/average_l0_82/*'"]:
        assert word in message, (word, message)
    assert isinstance(info.value, DictionaryFormatError)  # what sae-serve reports at start


def test_hf_cache_from_hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    assert sources.hf_hub_cache_dir() == home / "hub"
    params = gemma_params(seed=9)
    add_to_cache(home / "hub", GEMMA_REPO, stage_gemma(tmp_path, params))
    x = inputs()
    assert_close(load_dictionary(f"hf:{GEMMA_REPO}/{GEMMA_SUB}").encode(x),
                 gemma_scope_encode(params, x))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(DictionaryNotCachedError, match="elsewhere"):
        load_dictionary(f"hf:{GEMMA_REPO}/{GEMMA_SUB}")


def test_hf_partial_download_with_tree_listing(tmp_path, hf_cache):
    # `hf download REPO --include 'FOLDER/*'` caches the repo's whole file listing
    # (trees/<commit>.json) but only FOLDER: that folder must load, the others must not.
    tree_cache = pytest.importorskip("huggingface_hub._tree_cache")
    snapshot = add_to_cache(hf_cache, GEMMA_REPO, stage_gemma(tmp_path, gemma_params()))
    other = "layer_4/width_1k/average_l0_12"
    tree_cache.write_tree_cache(str(snapshot.parent.parent), COMMIT, {
        f"{sub}/params.npz": tree_cache.TreeCacheEntry(size=1, blob_id="0" * 40)
        for sub in (GEMMA_SUB, other)})
    assert tree_cache.read_tree_cache(str(snapshot.parent.parent), COMMIT) is not None
    assert load_dictionary(f"hf:{GEMMA_REPO}/{GEMMA_SUB}").hook_point == "layers.3"
    with pytest.raises(DictionaryNotCachedError) as info:
        load_dictionary(f"hf:{GEMMA_REPO}/{other}")
    assert other in str(info.value) and f"--include '{other}/*'" in str(info.value)


def test_hf_broken_blob_is_not_cached(tmp_path, hf_cache):
    snapshot = add_to_cache(hf_cache, GEMMA_REPO, stage_gemma(tmp_path, gemma_params()))
    (snapshot / GEMMA_SUB / "params.npz").resolve().unlink()  # blob gone, link left
    with pytest.raises(DictionaryNotCachedError, match="blobs are missing"):
        load_dictionary(f"hf:{GEMMA_REPO}/{GEMMA_SUB}")


@pytest.mark.parametrize("spec,words", [
    ("hf:google", ["expected hf:ORG/REPO"]),
    ("hf:google/x@/layer_1", ["around '@'"]),
    ("hf:google/x/../y", ["inside the repository"]),
    ("sae_lens:gemma-scope-2b-pt-res", ["expected sae_lens:RELEASE/SAE_ID"]),
])
def test_malformed_source_strings(spec, words, hf_cache):
    with pytest.raises(DictionarySourceError) as info:
        load_dictionary(spec, saelens_directory={})
    for word in words:
        assert word in str(info.value)


def test_parse_hf_spec():
    assert parse_hf_spec("hf:google/gemma-scope-2b-pt-res@abc/layer_1/width_16k/") == (
        "google/gemma-scope-2b-pt-res", "abc", "layer_1/width_16k")
    assert parse_hf_spec("hf://org/repo") == ("org/repo", None, "")
    assert resolve_dictionary_source("~/x").path == Path("~/x").expanduser()


# --------------------------------------------------------------------------- SAELens names


def write_saelens(folder: Path, cfg: dict, tensors: dict) -> Path:
    """A SAELens directory written as SAELens writes it (SAE.save_model)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.float().contiguous() for k, v in tensors.items()},
              str(folder / "sae_weights.safetensors"))
    return folder


def saelens_tensors(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) / D_IN ** 0.5,
         "W_dec": torch.randn(D_SAE, D_IN, generator=g),
         "b_dec": torch.randn(D_IN, generator=g)}
    if arch == "gated":
        t.update(b_gate=torch.randn(D_SAE, generator=g) * 0.3,
                 r_mag=torch.randn(D_SAE, generator=g) * 0.2,
                 b_mag=torch.randn(D_SAE, generator=g) * 0.3)
    else:
        t["b_enc"] = torch.randn(D_SAE, generator=g) * 0.3
    if arch == "jumprelu":
        t["threshold"] = torch.rand(D_SAE, generator=g) * 0.4
    return t


def saelens_cfg(arch: str, *, k: int = 6, hook: str = "blocks.2.hook_resid_post",
                model: str = "gemma-2b", **extra) -> dict:
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"model_name": model, "hook_name": hook, "sae_lens_version": "6.54.0"},
           **extra}
    if arch == "topk":
        cfg["k"] = k
    return cfg


def saelens_encode(arch: str, t: dict, x: torch.Tensor, *, apply_b_dec_to_input: bool = True,
                   k: int = 6) -> torch.Tensor:
    """SAELens 6.x, written out: SAE.process_sae_in (x - b_dec * apply_b_dec_to_input), then
    StandardSAE.encode relu(h) | JumpReLUSAE.encode relu(h) * (h > threshold) |
    TopKSAE.encode (TopK: relu of the k largest h) | GatedSAE.encode
    ((sae_in @ W_enc + b_gate > 0) * relu(sae_in @ (W_enc * exp(r_mag)) + b_mag))."""
    t = {n: v.double() for n, v in t.items()}
    sae_in = x.double() - t["b_dec"] * apply_b_dec_to_input
    if arch == "gated":
        active = (sae_in @ t["W_enc"] + t["b_gate"]) > 0
        return active * torch.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    h = sae_in @ t["W_enc"] + t["b_enc"]
    if arch == "standard":
        return torch.relu(h)
    if arch == "jumprelu":
        return torch.relu(h) * (h > t["threshold"])
    values, indices = h.topk(k, dim=-1)
    return torch.zeros_like(h).scatter(-1, indices, torch.relu(values))


def fold_activation_norm_scaling_factor(t: dict, s: float) -> dict:
    """SAELens SAE.fold_activation_norm_scaling_factor: W_enc *= s, W_dec /= s, b_dec /= s."""
    t = dict(t)
    t["W_enc"], t["W_dec"], t["b_dec"] = t["W_enc"] * s, t["W_dec"] / s, t["b_dec"] / s
    return t


def saelens_yaml(tmp_path: Path) -> dict:
    """A pretrained_saes.yaml in SAELens' format, with one release per converter."""
    text = f"""
gemma-scope-2b-pt-res-canonical:
  conversion_func: gemma_2
  links:
    model: https://huggingface.co/google/gemma-2-2b
  model: gemma-2-2b
  repo_id: {GEMMA_REPO}
  saes:
  - id: layer_3/width_1k/canonical
    neuronpedia: gemma-2-2b/3-gemmascope-res-1k
    path: {GEMMA_SUB}
  - id: layer_4/width_1k/canonical
    path: layer_4/width_1k/average_l0_12
gemma-2b-res-jb:
  conversion_func: null
  model: gemma-2b
  repo_id: jbloom/Gemma-2b-Residual-Stream-SAEs
  saes:
  - id: blocks.2.hook_resid_post
    l0: 47.0
    neuronpedia: gemma-2b/2-res-jb
    norm_scaling_factor: 2.5
    path: gemma_2b_blocks.2.hook_resid_post_16384_anthropic
gpt2-small-res-jb:
  config_overrides:
    model_from_pretrained_kwargs:
      center_writing_weights: true
  conversion_func: null
  model: gpt2-small
  repo_id: jbloom/GPT2-Small-SAEs-Reformatted
  saes:
  - id: blocks.3.hook_resid_pre
    path: blocks.3.hook_resid_pre
mistral-7b-res-wg:
  config_overrides:
    normalize_activations: constant_norm_rescale
  conversion_func: null
  model: mistral-7b
  repo_id: JoshEngels/Mistral-7B-Residual-Stream-SAEs
  saes:
  - id: blocks.8.hook_resid_pre
    path: mistral_7b_layer_8
llama_scope_lxr_8x:
  conversion_func: llama_scope
  model: meta-llama/Llama-3.1-8B
  repo_id: fnlp/Llama3_1-8B-Base-LXR-8x
  saes:
  - id: l5r_8x
    neuronpedia: llama3.1-8b/5-llamascope-res-32k
    norm_scaling_factor: 1.75
    path: Llama3_1-8B-Base-L5R-8x
llama_scope_r1_distill:
  conversion_func: llama_scope_r1_distill
  model: deepseek-ai/DeepSeek-R1-Distill-Llama-8B
  repo_id: fnlp/Llama-Scope-R1-Distill
  saes:
  - id: l6r_800m
    norm_scaling_factor: 3.0
    path: 800M-Slimpajama-0-OpenR1-Math-220k/L6R
saebench_pythia-70m-deduped_width-2pow12:
  conversion_func: dictionary_learning_1
  model: pythia-70m-deduped
  repo_id: canrager/saebench_pythia-70m-deduped_width-2pow12
  saes:
  - id: blocks.3.hook_resid_post__trainer_0
    path: resid_post_layer_3/trainer_0
"""
    (tmp_path / "pretrained_saes.yaml").write_text(text)
    return yaml.safe_load(text)


def test_saelens_gemma_scope_release(tmp_path, hf_cache):
    directory = saelens_yaml(tmp_path)
    params = gemma_params(seed=10)
    add_to_cache(hf_cache, GEMMA_REPO, stage_gemma(tmp_path, params))
    spec = "sae_lens:gemma-scope-2b-pt-res-canonical/layer_3/width_1k/canonical"
    d = load_dictionary(spec, saelens_directory=directory)
    x = inputs()
    assert_close(d.encode(x), gemma_scope_encode(params, x))
    assert d.model_name == "gemma-2-2b" and d.hook_name == "blocks.3.hook_resid_post"
    assert d.source == spec and d.path.name == "average_l0_10"
    meta = d.cfg.metadata.model_extra
    assert meta["neuronpedia_id"] == "gemma-2-2b/3-gemmascope-res-1k"
    assert (meta["sae_lens_release"], meta["sae_lens_id"]) == (
        "gemma-scope-2b-pt-res-canonical", "layer_3/width_1k/canonical")
    assert meta["sae_lens_release_model"] == "gemma-2-2b" and meta["hf_repo_id"] == GEMMA_REPO
    # the id's folder is not cached: the message names the release's repo and real folder
    with pytest.raises(DictionaryNotCachedError) as info:
        load_dictionary("sae_lens:gemma-scope-2b-pt-res-canonical/layer_4/width_1k/canonical",
                        saelens_directory=directory)
    assert GEMMA_REPO in str(info.value)
    assert "--include 'layer_4/width_1k/average_l0_12/*'" in str(info.value)


def test_saelens_release_norm_scaling_factor_is_folded(tmp_path, hf_cache):
    # A SAELens directory saved with expected_average_only_in and no factor of its own:
    # SAE.from_pretrained folds the release's norm_scaling_factor (2.5 in the YAML).
    directory = saelens_yaml(tmp_path)
    t = saelens_tensors("standard", seed=11)
    stage = tmp_path / "stage"
    write_saelens(stage / "gemma_2b_blocks.2.hook_resid_post_16384_anthropic",
                  saelens_cfg("standard", normalize_activations="expected_average_only_in"), t)
    add_to_cache(hf_cache, "jbloom/Gemma-2b-Residual-Stream-SAEs", stage)
    spec = "sae_lens:gemma-2b-res-jb/blocks.2.hook_resid_post"
    d = load_dictionary(spec, saelens_directory=directory)
    x = inputs()
    folded = fold_activation_norm_scaling_factor(t, 2.5)
    assert_close(d.encode(x), saelens_encode("standard", folded, x))
    # = the unfolded dictionary on the scaled input it was trained on
    assert_close(d.encode(x), saelens_encode("standard", t, x * 2.5))
    want = saelens_encode("standard", folded, x)
    assert_close(d.decode(d.encode(x)), want @ folded["W_dec"].double() + folded["b_dec"].double())
    assert d.cfg.metadata.model_extra["folded_norm_scaling_factor"] == 2.5
    assert d.cfg.metadata.model_extra["sae_lens_l0"] == 47.0
    # without the release the folder says expected_average_only_in but has no factor
    with pytest.raises(DictionaryFormatError, match="needs a positive norm_scaling_factor"):
        load_dictionary(d.path)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "gated"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_center_writing_weights_is_folded(tmp_path, hf_cache, arch, apply_b_dec):
    # gpt2-small-res-jb: trained on TransformerLens' GPT-2 with center_writing_weights=True
    # (HookedTransformer.center_writing_weights), i.e. on x - mean(x) of the raw stream.
    directory = saelens_yaml(tmp_path)
    t = saelens_tensors(arch, seed=12)
    stage = tmp_path / "stage"
    write_saelens(stage / "blocks.3.hook_resid_pre",
                  saelens_cfg(arch, hook="blocks.3.hook_resid_pre", model="gpt2-small",
                              apply_b_dec_to_input=apply_b_dec), t)
    add_to_cache(hf_cache, "jbloom/GPT2-Small-SAEs-Reformatted", stage)
    d = load_dictionary("sae_lens:gpt2-small-res-jb/blocks.3.hook_resid_pre",
                        saelens_directory=directory)
    assert d.hook_point == "layers.2" and d.model_name == "gpt2-small"
    x = inputs()
    want = saelens_encode(arch, t, x - x.mean(-1, keepdim=True), apply_b_dec_to_input=apply_b_dec)
    assert 0 < int((want > 0).sum()) < want.numel()
    assert_close(d.encode(x), want)
    assert d.cfg.metadata.model_extra["folded_center_writing_weights"] is True
    # the same folder without the release's override is served on the raw stream
    plain = load_dictionary(d.path)
    assert_close(plain.encode(x), saelens_encode(arch, t, x, apply_b_dec_to_input=apply_b_dec))


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "gated"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_directory_encode_matches_saelens(tmp_path, arch, apply_b_dec):
    t = saelens_tensors(arch, seed=13)
    folder = write_saelens(tmp_path / "d", saelens_cfg(arch, apply_b_dec_to_input=apply_b_dec), t)
    d = SparseDictionary.load(folder)
    x = inputs()
    want = saelens_encode(arch, t, x, apply_b_dec_to_input=apply_b_dec)
    assert 0 < int((want > 0).sum()) < want.numel()
    assert_close(d.encode(x), want)


@pytest.mark.parametrize("value,words", [
    ("constant_norm_rescale", ["sqrt(d_in)", "per-token"]),
    ("layer_norm", ["standard deviation", "per token"]),
    ("covariance_whitening", ["whitening statistics are not stored"]),
    ("bogus", ["not a normalisation SAELens 6.x knows"]),
])
def test_unservable_normalisations_are_refused(tmp_path, value, words):
    folder = write_saelens(tmp_path / "d", saelens_cfg("standard", normalize_activations=value),
                           saelens_tensors("standard"))
    with pytest.raises(DictionaryFormatError) as info:
        SparseDictionary.load(folder)
    message = str(info.value)
    assert f"normalize_activations={value!r} is not supported" in message and "cfg.json" in message
    for word in words:
        assert word in message, (word, message)


def test_saelens_config_override_is_applied_and_refused(tmp_path, hf_cache):
    # mistral-7b-res-wg: the release overrides normalize_activations to constant_norm_rescale
    directory = saelens_yaml(tmp_path)
    stage = tmp_path / "stage"
    write_saelens(stage / "mistral_7b_layer_8",
                  saelens_cfg("standard", hook="blocks.8.hook_resid_pre", model="mistral-7b"),
                  saelens_tensors("standard"))
    add_to_cache(hf_cache, "JoshEngels/Mistral-7B-Residual-Stream-SAEs", stage)
    with pytest.raises(DictionaryFormatError) as info:
        load_dictionary("sae_lens:mistral-7b-res-wg/blocks.8.hook_resid_pre",
                        saelens_directory=directory)
    message = str(info.value)
    assert message.startswith("sae_lens:mistral-7b-res-wg/blocks.8.hook_resid_pre: ")
    assert "normalize_activations='constant_norm_rescale' is not supported" in message
    assert SparseDictionary.load(stage / "mistral_7b_layer_8").hook_point == "layers.7"


def write_llama_scope(folder: Path, *, d_in: int = D_IN, d_sae: int = D_SAE, seed: int = 14,
                      avg_norm: float = 7.0, jump: float = 0.05, **hyper) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = {"encoder.weight": torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5,
         "decoder.weight": torch.randn(d_in, d_sae, generator=g),
         "encoder.bias": torch.randn(d_sae, generator=g) * 0.1,
         "decoder.bias": torch.randn(d_in, generator=g)}
    (folder / "checkpoints").mkdir(parents=True)
    save_file(w, str(folder / "checkpoints" / "final.safetensors"))
    (folder / "hyperparams.json").write_text(json.dumps({
        "d_model": d_in, "d_sae": d_sae, "hook_point_in": "blocks.5.hook_resid_post",
        "hook_point_out": "blocks.5.hook_resid_post", "jump_relu_threshold": jump,
        "dataset_average_activation_norm": {"in": avg_norm, "out": avg_norm},
        "act_fn": "jumprelu", **hyper}))
    return w


def llama_scope_saelens_encode(w: dict, x: torch.Tensor, *, avg_norm: float, jump: float,
                               fold: float) -> torch.Tensor:
    """SAELens llama_scope_sae_huggingface_loader + SAE.from_pretrained, written out:
    get_llama_scope_config_from_hf: s = sqrt(d_model) / dataset_average_activation_norm.in,
    threshold = jump_relu_threshold * s for every feature, apply_b_dec_to_input False;
    W_enc = encoder.weight.T, W_dec = decoder.weight.T; then
    fold_activation_norm_scaling_factor(release norm_scaling_factor); JumpReLUSAE.encode."""
    s = D_IN ** 0.5 / avg_norm
    t = {"W_enc": w["encoder.weight"].T, "W_dec": w["decoder.weight"].T,
         "b_enc": w["encoder.bias"], "b_dec": w["decoder.bias"],
         "threshold": torch.ones(D_SAE) * (jump * s)}
    return saelens_encode("jumprelu", fold_activation_norm_scaling_factor(t, fold), x,
                          apply_b_dec_to_input=False)


def test_llama_scope_folder_and_release(tmp_path, hf_cache):
    directory = saelens_yaml(tmp_path)
    stage = tmp_path / "stage"
    w = write_llama_scope(stage / "Llama3_1-8B-Base-L5R-8x", avg_norm=7.0, jump=0.05)
    add_to_cache(hf_cache, "fnlp/Llama3_1-8B-Base-LXR-8x", stage)
    x = inputs() * 3
    s_cfg = D_IN ** 0.5 / 7.0

    # hf: / local folder: the factor computed from hyperparams.json is folded
    d = load_dictionary("hf:fnlp/Llama3_1-8B-Base-LXR-8x/Llama3_1-8B-Base-L5R-8x")
    want = llama_scope_saelens_encode(w, x, avg_norm=7.0, jump=0.05, fold=s_cfg)
    assert 0 < int((want > 0).sum()) < want.numel()
    assert_close(d.encode(x), want)
    assert d.model_name == "meta-llama/Llama-3.1-8B" and d.hook_point == "layers.5"
    assert d.cfg.apply_b_dec_to_input is False
    assert d.cfg.metadata.model_extra["folded_norm_scaling_factor"] == pytest.approx(s_cfg)

    # sae_lens: the release's norm_scaling_factor (1.75) is folded, the threshold keeps
    # the hyperparams.json factor: exactly what SAELens computes
    r = load_dictionary("sae_lens:llama_scope_lxr_8x/l5r_8x", saelens_directory=directory)
    assert_close(r.encode(x), llama_scope_saelens_encode(w, x, avg_norm=7.0, jump=0.05, fold=1.75))
    assert not torch.allclose(r.encode(x), d.encode(x))
    assert r.cfg.metadata.model_extra["neuronpedia_id"] == "llama3.1-8b/5-llamascope-res-32k"
    assert r.cfg.metadata.model_extra["folded_norm_scaling_factor"] == 1.75


@pytest.mark.parametrize("change,words", [
    ({"hook_point_in": "blocks.5.ln2.hook_normalized", "hook_point_out": "blocks.5.hook_mlp_out"},
     ["a transcoder"]),
    ({"hook_point_in": "blocks.5.hook_mlp_out", "hook_point_out": "blocks.5.hook_mlp_out"},
     ["unsupported hook point", "blocks.5.hook_mlp_out"]),
    ({"dataset_average_activation_norm": {"in": 0}}, ["dataset_average_activation_norm.in",
                                                      "positive"]),
    ({"jump_relu_threshold": None}, ["jump_relu_threshold must be a number"]),
])
def test_llama_scope_refusals(tmp_path, change, words):
    folder = tmp_path / "Llama3_1-8B-Base-L5M-8x"
    write_llama_scope(folder, **change)
    with pytest.raises(DictionaryFormatError) as info:
        SparseDictionary.load(folder)
    assert "hyperparams.json" in str(info.value)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_llama_scope_r1_distill(tmp_path, hf_cache):
    directory = saelens_yaml(tmp_path)
    stage = tmp_path / "stage"
    folder = stage / "800M-Slimpajama-0-OpenR1-Math-220k" / "L6R"
    folder.mkdir(parents=True)
    d_sae = 2 * D_IN  # SAELens: d_sae = d_model * expansion_factor
    g = torch.Generator().manual_seed(15)
    w = {"encoder.weight": torch.randn(d_sae, D_IN, generator=g) / D_IN ** 0.5,
         "decoder.weight": torch.randn(D_IN, d_sae, generator=g),
         "encoder.bias": torch.randn(d_sae, generator=g) * 0.1,
         "decoder.bias": torch.randn(D_IN, generator=g),
         "log_jumprelu_threshold": torch.randn(d_sae, generator=g) - 2}
    save_file(w, str(folder / "sae_weights.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"d_model": D_IN, "expansion_factor": 2, "hook_point_in": "blocks.6.hook_resid_post",
         "hook_point_out": "blocks.6.hook_resid_post"}))
    add_to_cache(hf_cache, "fnlp/Llama-Scope-R1-Distill", stage)
    d = load_dictionary("sae_lens:llama_scope_r1_distill/l6r_800m", saelens_directory=directory)
    # llama_scope_r1_distill_sae_huggingface_loader: threshold = exp(log_jumprelu_threshold),
    # then SAE.from_pretrained folds the release's norm_scaling_factor (3.0)
    t = {"W_enc": w["encoder.weight"].T, "W_dec": w["decoder.weight"].T,
         "b_enc": w["encoder.bias"], "b_dec": w["decoder.bias"],
         "threshold": w["log_jumprelu_threshold"].exp()}
    x = inputs()
    want = saelens_encode("jumprelu", fold_activation_norm_scaling_factor(t, 3.0), x,
                          apply_b_dec_to_input=False)
    assert 0 < int((want > 0).sum()) < want.numel()
    assert d.d_sae == d_sae and d.hook_point == "layers.6"
    assert d.model_name == "meta-llama/Llama-3.1-8B"
    assert_close(d.encode(x), want)
    # its factor is only in SAELens' directory
    with pytest.raises(DictionaryFormatError, match="norm_scaling_factor"):
        load_dictionary(d.path)


def test_saelens_lookup_errors(tmp_path, hf_cache):
    directory = saelens_yaml(tmp_path)
    with pytest.raises(DictionarySourceError) as info:
        load_dictionary("sae_lens:gemma-scope-2b-pt-res-canonicl/layer_3/width_1k/canonical",
                        saelens_directory=directory)
    assert "unknown SAELens release 'gemma-scope-2b-pt-res-canonicl'" in str(info.value)
    assert "did you mean 'gemma-scope-2b-pt-res-canonical'" in str(info.value)
    with pytest.raises(DictionarySourceError) as info:
        load_dictionary("sae_lens:gemma-scope-2b-pt-res-canonical/layer_30/width_1k/canonical",
                        saelens_directory=directory)
    assert "release 'gemma-scope-2b-pt-res-canonical' has no SAE id " \
           "'layer_30/width_1k/canonical'" in str(info.value)
    assert "layer_3/width_1k/canonical" in str(info.value)  # suggestions
    with pytest.raises(DictionarySourceError) as info:
        load_dictionary("sae_lens:saebench_pythia-70m-deduped_width-2pow12/"
                        "blocks.3.hook_resid_post__trainer_0", saelens_directory=directory)
    assert "conversion 'dictionary_learning_1'" in str(info.value)
    assert "gemma_2" in str(info.value)  # what is supported
    with pytest.raises(DictionarySourceError, match="needs repo_id"):
        load_dictionary("sae_lens:a/b", saelens_directory={"a": {"saes": []}})


def test_saelens_not_installed(monkeypatch, hf_cache):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(SAELensNotInstalledError) as info:
        SparseDictionary.load("sae_lens:gemma-scope-2b-pt-res-canonical/layer_3/width_1k/canonical")
    message = str(info.value)
    assert "sae-lens is not installed" in message and "pip install 'sae-serve[saelens]'" in message
    assert sources.SAELENS_YAML_ENV in message and "hf:" in message
    assert isinstance(info.value, DictionaryFormatError)


def test_saelens_yaml_from_environment(tmp_path, hf_cache, monkeypatch):
    saelens_yaml(tmp_path)
    monkeypatch.setenv(sources.SAELENS_YAML_ENV, str(tmp_path / "pretrained_saes.yaml"))
    params = gemma_params(seed=16)
    add_to_cache(hf_cache, GEMMA_REPO, stage_gemma(tmp_path, params))
    spec = "sae_lens:gemma-scope-2b-pt-res-canonical/layer_3/width_1k/canonical"
    # the string alone works everywhere a directory does: the registry, SparseDictionary.load
    reg = DictionaryRegistry.load([spec], model_name="google/gemma-2-2b", num_layers=4,
                                  hidden_size=D_IN, ids=["res3"])
    entry = reg.get("res3")
    assert entry.source == spec and entry.hook_point == "layers.3"
    again = SparseDictionary.load(entry.source)  # what a worker process does
    x = inputs()
    assert torch.equal(again.encode(x), entry.dictionary.encode(x))
    assert_close(again.encode(x), gemma_scope_encode(params, x))
    monkeypatch.setenv(sources.SAELENS_YAML_ENV, str(tmp_path / "nope.yaml"))
    with pytest.raises(SAELensNotInstalledError, match="no such file"):
        SparseDictionary.load(spec)


def _installed_saelens_yaml() -> bool:
    try:
        importlib.metadata.distribution(sources.SAELENS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed_saelens_yaml(),
                    reason="sae-lens is not installed (pip install 'sae-serve[saelens]')")
def test_real_packaged_saelens_directory(monkeypatch):
    monkeypatch.delenv(sources.SAELENS_YAML_ENV, raising=False)
    releases = sources.installed_saelens_directory()
    gemma = releases["gemma-scope-2b-pt-res-canonical"]
    assert (gemma.repo_id, gemma.model, gemma.conversion_func) == (
        "google/gemma-scope-2b-pt-res", "gemma-2-2b", "gemma_2")
    assert gemma.saes["layer_12/width_16k/canonical"]["path"].startswith(
        "layer_12/width_16k/average_l0_")
    llama = releases["llama_scope_lxr_8x"]
    assert llama.conversion_func == "llama_scope"
    assert llama.repo_id == "fnlp/Llama3_1-8B-Base-LXR-8x"
    assert all(math.isfinite(s["norm_scaling_factor"]) for s in llama.saes.values())
    assert releases["gpt2-small-res-jb"].config_overrides == {
        "model_from_pretrained_kwargs": {"center_writing_weights": True}}
    # every release either resolves to something we read or is refused by name
    for name, release in releases.items():
        sae_id = next(iter(release.saes))
        if release.conversion_func in sources.SUPPORTED_CONVERSIONS:
            assert sources.lookup_saelens(name, sae_id)[1]["path"]
        else:
            with pytest.raises(DictionarySourceError, match="conversion"):
                sources.lookup_saelens(name, sae_id)
