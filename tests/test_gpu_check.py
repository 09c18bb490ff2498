"""The GPU readiness check (benchmarks/gpu_check.sh) rehearsed on the CPU (``--dry-run``).

The real run needs a CUDA machine; these make sure that, when one is lent, the script runs
every part, prints figures for each, and fails loudly when a part breaks. One run sees the
packages of this environment, one only what a bare torch + Triton GPU machine has (no
vLLM, pydantic, transformers, ...; hidden here by a ``sitecustomize`` import hook).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
# What the lent GPU machine lacks (it has torch, Triton, numpy, safetensors, pytest).
ABSENT_ON_BARE_GPU = ["vllm", "pydantic", "pydantic_core", "pydantic_settings", "transformers", "tokenizers",
                      "huggingface_hub", "httpx", "psutil", "ray", "fastapi", "grpc", "yaml", "tqdm", "pyarrow"]
# Hides the packages the way absence looks: find_spec None, import ModuleNotFoundError.
BLOCKER = '''import sys
BLOCKED = {blocked!r}
class _Hide:
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return self.inner.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.inner, attr)
sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
'''
NUM = r"\d+(?:\.\d+)?"


def run_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=400)


def summary_block(out: str) -> str:
    m = re.search(r"----- 8< -----[^\n]*\n(.*)\n----- >8 -----", out, flags=re.S)
    assert m, out
    return m.group(1)


@pytest.mark.parametrize("bare", [False, True], ids=["this-env", "bare-gpu-machine"])
def test_dry_run_prints_every_part(tmp_path, bare):
    env = {}
    if bare:
        (tmp_path / "sitecustomize.py").write_text(BLOCKER.format(blocked=ABSENT_ON_BARE_GPU))
        env["PYTHONPATH"] = str(tmp_path)
    p = run_check("--markdown", str(tmp_path / "summary.md"), env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    block = summary_block(p.stdout)
    assert (tmp_path / "summary.md").read_text().strip() == block.strip()
    assert "DRY RUN" in block and re.search(rf"torch {NUM}", block)
    # one line per part, with figures
    assert re.search(rf"^\| tests \| ok \| {NUM} passed, 0 failed, [1-9]\d* skipped", block, flags=re.M), block
    assert re.search(rf"^\| kernels \| ok \| torch vs dense, float32: decode median {NUM}×, max {NUM}×.*"
                     rf"Flash-SAE reports 13.6×.*steer median {NUM}×", block, flags=re.M), block
    assert re.search(r"^\| training \| ok \| 8 configs, synthetic activations", block, flags=re.M), block
    assert re.search(r"^\| engine \| skipped \| dry run: no vLLM engine started", block, flags=re.M), block
    # the detail tables, with numbers in every cell
    for tokens in (1, 16):
        assert re.search(rf"^\| 64 \| 512 \| {tokens} \| {NUM} / {NUM} \({NUM}×\) \| {NUM} / {NUM} \({NUM}×\) \|$",
                         block, flags=re.M), block
    for kind in ("topk", "batchtopk", "jumprelu", "standard"):
        for precision in ("float32", "bfloat16"):
            assert re.search(rf"^\| {kind} \| 32 \| 128 \| (8|-) \| 256 \| {precision} \| {NUM} \| {NUM} \| {NUM} \|$",
                             block, flags=re.M), (kind, precision, block)
    if bare:
        assert "(vllm not installed)" in block
        # test files that need pydantic are reported, not counted as failures
        assert "not collected: " in block and "needs pydantic" in block, block
    else:
        assert "not collected" not in block, block


def test_broken_part_fails_the_check():
    # An invalid kernel backend makes every sparse decode raise: the training steps fail.
    p = run_check("--parts", "training", env={"SAE_KERNELS_BACKEND": "bogus"})
    assert p.returncode == 1, p.stdout + p.stderr
    block = summary_block(p.stdout)
    assert re.search(r"^\| training \| FAIL \| exit 1", block, flags=re.M), block
    assert "SAE_KERNELS_BACKEND must be auto, torch or triton" in block
    assert "FAILED: training" in p.stderr


def test_unknown_part_is_refused():
    p = run_check("--parts", "kernels,nope")
    assert p.returncode == 2 and "unknown part" in p.stderr
