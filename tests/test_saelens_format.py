"""cfg.json as SAELens 6 reads it: the keys and values it needs, for every architecture we write.

SAELens (6.x, checked against the 6.54 sources) loads a directory with
``SAE.load_from_disk`` (sae_lens/saes/sae.py):

1. ``sae_lens_disk_loader`` / ``get_sae_lens_config_from_disk``
   (sae_lens/loading/pretrained_sae_loaders.py) read cfg.json as it is;
   ``read_sae_components_from_disk`` looks up ``DTYPE_MAP[cfg_dict["dtype"]]``
   (sae_lens/constants.py) and reads every tensor of sae_weights.safetensors.
2. ``handle_config_defaulting`` (same file) takes ``sae_lens_version`` from the top level or
   else from ``metadata``; missing or < ``Version("6.0.0-rc.0")``, ``handle_pre_6_0_config``
   rebuilds ``metadata`` from the *top-level* keys in ``LLM_METADATA_KEYS`` only, so a
   ``metadata`` of ours would be dropped: no hook_name, no model_name.
3. ``SAEConfig.from_dict`` (sae_lens/saes/sae.py) picks the config class by
   ``architecture`` (registered in sae_lens/__init__.py: standard, topk, jumprelu, gated),
   keeps the top-level keys that are fields of that dataclass
   (``filter_valid_dataclass_fields``, sae_lens/util.py) and builds ``SAEMetadata`` from
   ``metadata`` as it is. ``SAEConfig``: d_in, d_sae (required), dtype="float32",
   device, apply_b_dec_to_input=True, normalize_activations="none",
   reshape_activations="none"; ``TopKSAEConfig`` (sae_lens/saes/topk_sae.py) adds k=100 and
   rescale_acts_by_decoder_norm=False. ``__post_init__`` allows normalize_activations in
   none / expected_average_only_in / constant_norm_rescale / layer_norm.
4. The architecture's SAE class is built and ``load_state_dict`` (strict) takes the
   tensors: W_enc, W_dec, b_enc, b_dec (standard_sae.py, topk_sae.py); + threshold
   (jumprelu_sae.py); gated_sae.py has b_gate, r_mag, b_mag and no b_enc.
5. Users attach it at ``cfg.metadata.hook_name``, a TransformerLens hook name.

SAELens is not a dependency: the tables below mirror those functions, and when sae_lens
is importable a test loads our files with it for real.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from packaging.version import Version

import sae_runtime
from sae_runtime.dictionary import (
    DictionaryConfig,
    DictionaryFormatError,
    SparseDictionary,
)
from sae_runtime.registry import default_dictionary_id

D_IN, D_SAE, K = 24, 96, 8
ARCHS = ["standard", "topk", "jumprelu", "gated"]
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# (what the dictionary is given, SAELens' hook_name, our hook point)
HOOKS = [
    ("layers.3", "blocks.3.hook_resid_post", "layers.3"),
    ("embeddings", "blocks.0.hook_resid_pre", "embeddings"),
    ("blocks.4.hook_resid_pre", "blocks.3.hook_resid_post", "layers.3"),  # same point as layers.3
]

# Top-level keys SAELens 6 needs from us, with the values for what we write
# (SAEConfig / TopKSAEConfig fields in sae_lens/saes/sae.py and sae_lens/saes/topk_sae.py;
# architecture from SAEConfig.from_dict). None: checked separately.
SAELENS6_TOP_LEVEL = {
    "architecture": None,                # must be one of SAELENS6_ARCHITECTURES
    "d_in": D_IN,                        # SAEConfig field without a default
    "d_sae": D_SAE,                      # SAEConfig field without a default
    "dtype": "float32",                  # read_sae_components_from_disk: DTYPE_MAP[dtype]
    "apply_b_dec_to_input": None,        # default True: written always, False must survive
    "normalize_activations": "none",     # weights are folded; SAEConfig.__post_init__ values
    "reshape_activations": "none",       # SAEConfig Literal["none", "hook_z"]
}
SAELENS6_TOPK_TOP_LEVEL = {
    "k": K,                              # TopKSAEConfig.k, which defaults to 100
    "rescale_acts_by_decoder_norm": False,  # TopKSAEConfig; our weights are already folded
}
# SAELens 6's config dataclass fields (what filter_valid_dataclass_fields keeps).
SAELENS6_CONFIG_FIELDS = {
    "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
    "reshape_activations", "metadata",
}
SAELENS6_TOPK_FIELDS = SAELENS6_CONFIG_FIELDS | {"k", "rescale_acts_by_decoder_norm"}
SAELENS6_ARCHITECTURES = {"standard", "topk", "jumprelu", "gated"}  # sae_lens/__init__.py
SAELENS6_DTYPES = {"float32", "float64", "float16", "bfloat16", "torch.float32",
                   "torch.float64", "torch.float16", "torch.bfloat16"}  # constants.DTYPE_MAP
# Parameters of SAELens' inference SAE classes (load_state_dict is strict).
SAELENS6_TENSORS = {
    "standard": {"W_enc", "W_dec", "b_enc", "b_dec"},
    "topk": {"W_enc", "W_dec", "b_enc", "b_dec"},
    "jumprelu": {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"},
    "gated": {"W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag"},
}
# The hook names SAELens users attach residual-stream SAEs at (TransformerLens).
TRANSFORMERLENS_RESID = re.compile(r"blocks\.\d+\.hook_resid_(post|pre)")


def saelens_reads_as_6x(cfg: dict) -> bool:
    """handle_config_defaulting's test (pretrained_sae_loaders.py): 6.x layout or pre-6.0."""
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    return bool(version) and Version(version) >= Version("6.0.0-rc.0")


def make_dictionary(arch: str, hook: str, *, apply_b_dec: bool = True,
                    dtype: torch.dtype = torch.float32, **extra) -> SparseDictionary:
    g = torch.Generator().manual_seed(ARCHS.index(arch))
    t = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) / 5,
         "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    if arch == "gated":
        t.update(b_gate=torch.randn(D_SAE, generator=g), r_mag=torch.randn(D_SAE, generator=g) / 5,
                 b_mag=torch.randn(D_SAE, generator=g))
    else:
        t["b_enc"] = torch.randn(D_SAE, generator=g) / 3
    if arch == "jumprelu":
        t["threshold"] = torch.rand(D_SAE, generator=g) / 2
    data = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
            "apply_b_dec_to_input": apply_b_dec,
            "metadata": {"model_name": MODEL, "hook_name": hook}, **extra}
    if arch == "topk":
        data["k"] = K
    return SparseDictionary(DictionaryConfig.model_validate(data), t, dtype=dtype)


def check_saelens6_cfg(raw: dict, arch: str, saelens_hook: str, our_hook: str,
                       apply_b_dec: bool = True, dtype: str = "float32") -> None:
    """Every key SAELens 6 needs, with the value it must have."""
    assert saelens_reads_as_6x(raw), raw.get("metadata")
    expected = dict(SAELENS6_TOP_LEVEL, architecture=arch, apply_b_dec_to_input=apply_b_dec,
                    dtype=dtype)
    if arch == "topk":
        expected.update(SAELENS6_TOPK_TOP_LEVEL)
    for key, value in expected.items():
        assert key in raw, f"cfg.json lacks {key!r}"
        assert raw[key] == value, (key, raw[key], value)
    assert raw["architecture"] in SAELENS6_ARCHITECTURES and raw["dtype"] in SAELENS6_DTYPES
    assert arch == "topk" or "k" not in raw  # k is a TopKSAEConfig field only
    fields = SAELENS6_TOPK_FIELDS if arch == "topk" else SAELENS6_CONFIG_FIELDS
    assert set(expected) - {"architecture"} <= fields  # each one reaches SAELens' config
    metadata = raw["metadata"]
    assert metadata["hook_name"] == saelens_hook and TRANSFORMERLENS_RESID.fullmatch(saelens_hook)
    assert metadata["model_name"] == MODEL
    assert metadata["hook_point"] == our_hook  # ours, beside SAELens' hook_name
    # SAELens 6 reads these in metadata only; a top-level copy would be ignored
    for key in ("hook_name", "model_name", "sae_lens_version"):
        assert key not in raw, key


@pytest.mark.parametrize("given,saelens_hook,our_hook", HOOKS)
@pytest.mark.parametrize("arch", ARCHS)
def test_cfg_json_has_what_saelens6_needs(tmp_path, arch, given, saelens_hook, our_hook):
    from safetensors.torch import load_file

    make_dictionary(arch, given).save(tmp_path)
    raw = json.loads((tmp_path / "cfg.json").read_text())
    check_saelens6_cfg(raw, arch, saelens_hook, our_hook)
    assert set(load_file(str(tmp_path / "sae_weights.safetensors"))) == SAELENS6_TENSORS[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_cfg_json_non_default_values_survive(tmp_path, arch):
    make_dictionary(arch, "layers.7", apply_b_dec=False, dtype=torch.bfloat16).save(tmp_path)
    raw = json.loads((tmp_path / "cfg.json").read_text())
    check_saelens6_cfg(raw, arch, "blocks.7.hook_resid_post", "layers.7", apply_b_dec=False,
                       dtype="bfloat16")


@pytest.mark.parametrize("given,saelens_hook,our_hook", HOOKS)
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip(tmp_path, arch, given, saelens_hook, our_hook):
    d = make_dictionary(arch, given)
    d.save(tmp_path)
    loaded = SparseDictionary.load(tmp_path)
    assert loaded.hook_point == our_hook == d.hook_point
    assert loaded.hook_name == saelens_hook and loaded.model_name == MODEL
    assert loaded.architecture == arch and loaded.k == d.k
    assert dict(loaded.named_parameters()).keys() == dict(d.named_parameters()).keys()
    for name, param in d.named_parameters():
        assert torch.equal(getattr(loaded, name), param), name
    assert default_dictionary_id(loaded) == default_dictionary_id(d) == f"{our_hook}/{arch}-{D_SAE}"
    # a second save of what was loaded writes the same file
    first = (tmp_path / "cfg.json").read_text()
    loaded.save(tmp_path)
    assert (tmp_path / "cfg.json").read_text() == first


# What this server wrote before the SAELens 6 layout (the committed default dictionary's
# cfg.json until then): metadata without sae_lens_version, hook_name in our form.
OLD_OWN_CFG = {
    "architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "k": K,
    "apply_b_dec_to_input": True, "normalize_activations": "none",
    "metadata": {"model_name": MODEL, "hook_name": "layers.12", "trained_with": "sae-train",
                 "context_size": 256},
}
# SAELens < 6: model/hook names and the other metadata keys at the top level.
OLD_SAELENS_CFG = {
    "architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "k": K,
    "apply_b_dec_to_input": True, "normalize_activations": "none",
    "model_name": MODEL, "hook_name": "blocks.12.hook_resid_post", "context_size": 256,
    "prepend_bos": True, "sae_lens_training_version": "5.3.0",
}


@pytest.mark.parametrize("old", [OLD_OWN_CFG, OLD_SAELENS_CFG], ids=["ours", "saelens5"])
def test_older_cfg_json_loads_and_resaves_in_saelens6_layout(tmp_path, old):
    make_dictionary("topk", "layers.12").save(tmp_path / "new")
    weights = (tmp_path / "new" / "sae_weights.safetensors").read_bytes()
    src = tmp_path / "old"
    src.mkdir()
    (src / "sae_weights.safetensors").write_bytes(weights)
    (src / "cfg.json").write_text(json.dumps(old))
    assert not saelens_reads_as_6x(old)  # the layout SAELens 6 half-reads
    d = SparseDictionary.load(src)
    assert d.hook_point == "layers.12" and d.model_name == MODEL
    assert default_dictionary_id(d) == f"layers.12/topk-{D_SAE}"
    d.save(tmp_path / "resaved")
    raw = json.loads((tmp_path / "resaved" / "cfg.json").read_text())
    check_saelens6_cfg(raw, "topk", "blocks.12.hook_resid_post", "layers.12")
    assert raw["metadata"]["context_size"] == 256 and "context_size" not in raw
    if old is OLD_SAELENS_CFG:  # training provenance kept, moved where SAELens 6 reads it
        assert raw["metadata"]["sae_lens_training_version"] == "5.3.0"
        assert raw["metadata"]["prepend_bos"] is True
    again = SparseDictionary.load(tmp_path / "resaved")
    assert again.hook_point == "layers.12" and torch.equal(again.W_enc, d.W_enc)


def _rewrite_metadata(directory: Path, **changes) -> None:
    raw = json.loads((directory / "cfg.json").read_text())
    raw["metadata"].update(changes)
    raw["metadata"] = {k: v for k, v in raw["metadata"].items() if v is not None}
    (directory / "cfg.json").write_text(json.dumps(raw))


def test_hook_point_alone_is_enough(tmp_path):
    make_dictionary("standard", "layers.5").save(tmp_path)
    _rewrite_metadata(tmp_path, hook_name=None)
    assert SparseDictionary.load(tmp_path).hook_point == "layers.5"


def test_hook_name_and_hook_point_must_agree(tmp_path):
    make_dictionary("standard", "layers.5").save(tmp_path)
    _rewrite_metadata(tmp_path, hook_name="blocks.6.hook_resid_post")
    with pytest.raises(DictionaryFormatError, match="name different hook points"):
        SparseDictionary.load(tmp_path)
    # an explicit hook_name override replaces both
    d = SparseDictionary.load(tmp_path, overrides={"hook_name": "layers.6"})
    assert d.hook_point == "layers.6"


DEFAULT_DICTIONARY = Path(sae_runtime.__file__).parent / "data" / "default_dictionary"


@pytest.mark.skipif(not (DEFAULT_DICTIONARY / "cfg.json").is_file(),
                    reason="no committed default dictionary")
def test_committed_default_dictionary_is_in_saelens6_layout():
    raw = json.loads((DEFAULT_DICTIONARY / "cfg.json").read_text())
    assert saelens_reads_as_6x(raw)
    assert raw["architecture"] == "topk" and raw["k"] == 96
    assert raw["metadata"]["hook_name"] == "blocks.12.hook_resid_post"
    assert raw["metadata"]["hook_point"] == "layers.12"
    d = SparseDictionary.load(DEFAULT_DICTIONARY)
    assert default_dictionary_id(d) == "layers.12/topk-4608"


# ---------------------------------------------------------------- SAELens itself, if installed


@pytest.mark.parametrize("given,saelens_hook,our_hook", HOOKS[:2])
@pytest.mark.parametrize("arch", ARCHS)
def test_real_saelens_reads_every_field(tmp_path, arch, given, saelens_hook, our_hook):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed")
    d = make_dictionary(arch, given, apply_b_dec=arch != "standard")
    d.save(tmp_path)
    sae = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert sae.cfg.architecture() == arch
    assert sae.cfg.metadata.hook_name == saelens_hook
    assert sae.cfg.metadata.model_name == MODEL
    assert sae.cfg.metadata.hook_point == our_hook
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    assert sae.cfg.apply_b_dec_to_input == (arch != "standard")
    if arch == "topk":
        assert sae.cfg.k == K
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sae.encode(x), d.encode(x), atol=1e-5, rtol=1e-5)
