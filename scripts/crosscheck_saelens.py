"""Cross-check sae-serve's dictionary loaders against SAELens itself (offline).

Writes dictionaries into a throwaway Hugging Face cache, loads each one with SAELens 6.54
(``SAE.from_pretrained`` / ``SAE.load_from_disk``) and with sae-serve (``hf:`` /
``sae_lens:`` / a directory), and compares ``encode`` and ``decode``: Gemma Scope npz
(SAELens' gemma_2 converter), Llama Scope (llama_scope, with the release's
norm_scaling_factor), a SAELens directory with expected_average_only_in + the release's
factor, every architecture x apply_b_dec_to_input (+ top-k decoder-norm rescaling), and
TransformerLens' center_writing_weights (gpt2-small-res-jb) end to end; and the other
way, directories sae-serve writes loaded by ``SAE.load_from_disk`` (every architecture, a
``layers.L`` and the embeddings hook point: hook_name, model_name, k and activations).
Prints OK/BAD.

sae-lens is not a dependency; install it and its dependencies beside the project's torch
without touching .venv, then run with that folder on PYTHONPATH:

    .venv/bin/python -m pip install --dry-run --report /tmp/r.json -q sae-lens==6.54.0
    .venv/bin/python -c "import json; print(' '.join(f\"{i['metadata']['name']}=={i['metadata']['version']}\"
        for i in json.load(open('/tmp/r.json'))['install']))" > /tmp/pkgs.txt
    .venv/bin/python -m pip install -q --no-deps --target /tmp/slsite $(cat /tmp/pkgs.txt)
    PYTHONPATH=/tmp/slsite .venv/bin/python scripts/crosscheck_saelens.py

Last run (sae-lens 6.54.0, transformer-lens 3.9.0, torch 2.13.0+cpu): every line OK, the
activations equal to the bit except top-k with decoder-norm rescaling (folded: < 1e-5).
Section G (our writer -> SAELens) was added afterwards and has not been run against
sae-lens yet; tests/test_saelens_format.py checks the keys it relies on without sae-lens.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

CACHE = Path(tempfile.mkdtemp(prefix="saelens-crosscheck-")) / "hub"
CACHE.mkdir(parents=True)
DISK = CACHE.parent / "disk"
os.environ["HF_HUB_CACHE"] = str(CACHE)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("SAE_SERVE_SAELENS_YAML", None)
import numpy as np
import torch
from sae_lens import SAE
from sae_lens.loading.pretrained_sae_loaders import gemma_2_sae_huggingface_loader
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sae_runtime.dictionary import SparseDictionary
from sae_runtime.dictionary_sources import load_dictionary

COMMIT = "1" * 40


def snap(repo):
    d = CACHE / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True, exist_ok=True)
    (d / "refs/main").write_text(COMMIT)
    return d / "snapshots" / COMMIT


def check(name, ours, theirs, x):
    a, b = ours.encode(x).double(), theirs.encode(x.to(theirs.dtype)).double()
    err = (a - b).abs().max().item()
    frac = (b > 0).float().mean().item()
    ok = torch.allclose(a, b, atol=1e-4, rtol=1e-4) and 0 < frac < 1
    ra = ours.decode(ours.encode(x)).double()
    rb = theirs.decode(theirs.encode(x)).double()
    rerr = (ra - rb).abs().max().item()
    verdict = "OK " if ok and rerr < 1e-3 else "BAD"
    print(f"{verdict} {name}: max|Δacts|={err:.2e} firing={frac:.3f} max|Δrecon|={rerr:.2e}")


g = torch.Generator().manual_seed(0)
# A. Gemma Scope params.npz through SAELens' gemma_2 converter (d_in 2304 from the repo name)
repo, folder = "google/gemma-scope-2b-pt-res", "layer_3/width_4k/average_l0_10"
d_in, d_sae = 2304, 4096
f = snap(repo) / folder
f.mkdir(parents=True)
rng = np.random.default_rng(0)
np.savez(
    f / "params.npz",
    W_enc=(rng.standard_normal((d_in, d_sae)) / 48).astype("f4"),
    W_dec=rng.standard_normal((d_sae, d_in)).astype("f4") * 0.1,
    b_enc=(0.1 * rng.standard_normal(d_sae)).astype("f4"),
    b_dec=rng.standard_normal(d_in).astype("f4"),
    threshold=(0.3 * rng.random(d_sae)).astype("f4"),
)
theirs = SAE.from_pretrained(repo, folder, converter=gemma_2_sae_huggingface_loader)
ours = load_dictionary(f"hf:{repo}/{folder}")
print(
    "   gemma: theirs",
    theirs.cfg.metadata.model_name,
    theirs.cfg.metadata.hook_name,
    "| ours",
    ours.model_name,
    ours.hook_name,
)
check("Gemma Scope npz (gemma_2)", ours, theirs, torch.randn(64, d_in, generator=g))

# B. Llama Scope through the real release llama_scope_lxr_8x/l5r_8x (yaml norm_scaling_factor)
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

rel = get_pretrained_saes_directory()["llama_scope_lxr_8x"]
path = rel.saes_map["l5r_8x"]
nsf = rel.norm_scaling_factor["l5r_8x"]
d_in, d_sae = 64, 160
f = snap(rel.repo_id) / path
(f / "checkpoints").mkdir(parents=True)
save_file(
    {
        "encoder.weight": torch.randn(d_sae, d_in, generator=g) / 8,
        "decoder.weight": torch.randn(d_in, d_sae, generator=g),
        "encoder.bias": torch.randn(d_sae, generator=g) * 0.1,
        "decoder.bias": torch.randn(d_in, generator=g),
    },
    str(f / "checkpoints/final.safetensors"),
)
avg = 8 / nsf * 0.93  # hyperparams factor differs a little from the release's, on purpose
(f / "hyperparams.json").write_text(
    json.dumps(
        {
            "d_model": d_in,
            "d_sae": d_sae,
            "hook_point_in": "blocks.5.hook_resid_post",
            "hook_point_out": "blocks.5.hook_resid_post",
            "jump_relu_threshold": 0.3,
            "dataset_average_activation_norm": {"in": avg, "out": avg},
        }
    )
)
theirs = SAE.from_pretrained("llama_scope_lxr_8x", "l5r_8x")
ours = load_dictionary("sae_lens:llama_scope_lxr_8x/l5r_8x")
print(
    "   llama: release factor",
    nsf,
    "| theirs",
    theirs.cfg.metadata.model_name,
    theirs.cfg.metadata.hook_name,
    "| ours",
    ours.model_name,
    ours.hook_name,
)
check("Llama Scope (llama_scope, release factor)", ours, theirs, torch.randn(64, d_in, generator=g) * avg / 8 * 3)

# C. SAELens directory, expected_average_only_in + the release's norm_scaling_factor (gemma-2b-res-jb)
rel = get_pretrained_saes_directory()["gemma-2b-res-jb"]
sid = next(i for i in rel.saes_map if i in rel.norm_scaling_factor)
d_in, d_sae = 32, 96
f = snap(rel.repo_id) / rel.saes_map[sid]
f.mkdir(parents=True)
(f / "cfg.json").write_text(
    json.dumps(
        {
            "architecture": "standard",
            "d_in": d_in,
            "d_sae": d_sae,
            "dtype": "float32",
            "apply_b_dec_to_input": True,
            "normalize_activations": "expected_average_only_in",
            "metadata": {"model_name": "gemma-2b", "hook_name": sid, "sae_lens_version": "6.54.0"},
        }
    )
)
save_file(
    {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / 6,
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_enc": torch.randn(d_sae, generator=g) * 0.3,
        "b_dec": torch.randn(d_in, generator=g),
    },
    str(f / "sae_weights.safetensors"),
)
theirs = SAE.from_pretrained("gemma-2b-res-jb", sid)
ours = load_dictionary(f"sae_lens:gemma-2b-res-jb/{sid}")
print(
    "   jb: factor", rel.norm_scaling_factor[sid], "| neuronpedia", ours.cfg.metadata.model_extra.get("neuronpedia_id")
)
check(
    "SAELens dir + release norm_scaling_factor",
    ours,
    theirs,
    torch.randn(64, d_in, generator=g) / rel.norm_scaling_factor[sid] * 3,
)

# D. SAELens directories from disk: every architecture x apply_b_dec_to_input (+ topk rescale)
for arch in ["standard", "jumprelu", "topk", "gated"]:
    for apply in [True, False]:
        for rescale in [False, True] if arch == "topk" else [False]:
            f = DISK / f"{arch}-{apply}-{rescale}"
            f.mkdir(parents=True)
            t = {
                "W_enc": torch.randn(d_in, d_sae, generator=g) / 6,
                "W_dec": torch.randn(d_sae, d_in, generator=g),
                "b_dec": torch.randn(d_in, generator=g),
            }
            if arch == "gated":
                t.update(
                    b_gate=torch.randn(d_sae, generator=g) * 0.3,
                    r_mag=torch.randn(d_sae, generator=g) * 0.2,
                    b_mag=torch.randn(d_sae, generator=g) * 0.3,
                )
            else:
                t["b_enc"] = torch.randn(d_sae, generator=g) * 0.3
            if arch == "jumprelu":
                t["threshold"] = torch.rand(d_sae, generator=g) * 0.4
            cfg = {
                "architecture": arch,
                "d_in": d_in,
                "d_sae": d_sae,
                "dtype": "float32",
                "apply_b_dec_to_input": apply,
                "normalize_activations": "none",
                "metadata": {"model_name": "m", "hook_name": "blocks.1.hook_resid_post", "sae_lens_version": "6.54.0"},
            }
            if arch == "topk":
                cfg.update(k=8, rescale_acts_by_decoder_norm=rescale)
            (f / "cfg.json").write_text(json.dumps(cfg))
            save_file(t, str(f / "sae_weights.safetensors"))
            check(
                f"disk {arch} apply_b_dec={apply}" + (f" rescale={rescale}" if arch == "topk" else ""),
                SparseDictionary.load(f),
                SAE.load_from_disk(str(f)),
                torch.randn(64, d_in, generator=g),
            )

# E. TransformerLens center_writing_weights: the centred model's residual = raw residual - mean
from transformer_lens import HookedTransformer, HookedTransformerConfig

tl_cfg = HookedTransformerConfig(
    n_layers=2,
    d_model=32,
    n_ctx=16,
    d_head=8,
    n_heads=4,
    d_vocab=50,
    act_fn="gelu",
    normalization_type="LN",
    original_architecture="GPT2LMHeadModel",
)
torch.manual_seed(0)
raw = HookedTransformer(tl_cfg)
for p in raw.parameters():
    torch.nn.init.normal_(p, std=0.2)
cent = HookedTransformer(tl_cfg)
cent.load_state_dict(raw.state_dict())
cent.process_weights_(fold_ln=False, center_writing_weights=True, center_unembed=False)
toks = torch.randint(0, 50, (2, 10))
_, c1 = raw.run_with_cache(toks)
_, c2 = cent.run_with_cache(toks)
for hook in ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"]:
    x = c1[hook]
    err = (c2[hook] - (x - x.mean(-1, keepdim=True))).abs().max().item()
    print(
        f"{'OK ' if err < 1e-4 else 'BAD'} TL center_writing_weights at {hook}: max|centred - (raw - mean)| = {err:.2e}"
    )

# F. gpt2-small-res-jb (config_overrides center_writing_weights): ours on the raw TL stream
#    == SAELens' SAE on the centred TL model's stream
rel = get_pretrained_saes_directory()["gpt2-small-res-jb"]
sid = "blocks.1.hook_resid_pre"
f = snap(rel.repo_id) / rel.saes_map[sid]
f.mkdir(parents=True)
d_in, d_sae = 32, 96
(f / "cfg.json").write_text(
    json.dumps(
        {
            "architecture": "standard",
            "d_in": d_in,
            "d_sae": d_sae,
            "dtype": "float32",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "metadata": {"model_name": "gpt2-small", "hook_name": sid, "sae_lens_version": "6.54.0"},
        }
    )
)
save_file(
    {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / 6,
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_enc": torch.randn(d_sae, generator=g) * 0.3,
        "b_dec": torch.randn(d_in, generator=g),
    },
    str(f / "sae_weights.safetensors"),
)
theirs = SAE.from_pretrained("gpt2-small-res-jb", sid)
ours = load_dictionary(f"sae_lens:gpt2-small-res-jb/{sid}")
a = ours.encode(c1[sid].reshape(-1, d_in)).double()
b = theirs.encode(c2[sid].reshape(-1, d_in)).double()
err = (a - b).abs().max().item()
verdict = "OK " if err < 1e-4 and 0 < (b > 0).float().mean() < 1 else "BAD"
print(
    f"{verdict} center_writing_weights end to end: ours(raw TL stream) vs SAELens(centred TL stream) "
    f"max|Δ|={err:.2e}; hook {ours.hook_point}"
)

# G. The other direction: directories sae-serve writes (SparseDictionary.save, as sae-train
#    does), loaded by SAELens: every field read (hook_name in TransformerLens' form, model_name,
#    k), same activations. A layers.L and the embeddings hook point.
from sae_runtime.dictionary import DictionaryConfig

for arch in ["standard", "jumprelu", "topk", "gated"]:
    for hook, want in [("layers.1", "blocks.1.hook_resid_post"), ("embeddings", "blocks.0.hook_resid_pre")]:
        t = {
            "W_enc": torch.randn(d_in, d_sae, generator=g) / 6,
            "W_dec": torch.randn(d_sae, d_in, generator=g),
            "b_dec": torch.randn(d_in, generator=g),
        }
        if arch == "gated":
            t.update(
                b_gate=torch.randn(d_sae, generator=g) * 0.3,
                r_mag=torch.randn(d_sae, generator=g) * 0.2,
                b_mag=torch.randn(d_sae, generator=g) * 0.3,
            )
        else:
            t["b_enc"] = torch.randn(d_sae, generator=g) * 0.3
        if arch == "jumprelu":
            t["threshold"] = torch.rand(d_sae, generator=g) * 0.4
        cfg = DictionaryConfig.model_validate(
            {
                "architecture": arch,
                "d_in": d_in,
                "d_sae": d_sae,
                "k": 8 if arch == "topk" else None,
                "metadata": {"model_name": "m", "hook_name": hook},
            }
        )
        f = SparseDictionary(cfg, t).save(DISK / f"ours-{arch}-{hook}")
        theirs = SAE.load_from_disk(str(f))
        meta = theirs.cfg.metadata
        fields_ok = (
            meta.hook_name == want
            and meta.model_name == "m"
            and theirs.cfg.architecture() == arch
            and (arch != "topk" or theirs.cfg.k == 8)
        )
        verdict = "OK " if fields_ok else "BAD"
        print(f"{verdict} ours -> SAELens {arch} {hook}: hook_name={meta.hook_name} model_name={meta.model_name}")
        check(f"ours -> SAELens {arch} {hook}", SparseDictionary.load(f), theirs, torch.randn(64, d_in, generator=g))

shutil.rmtree(CACHE.parent, ignore_errors=True)
