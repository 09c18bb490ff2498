#!/usr/bin/env bash
# GPU readiness check: GPU-marked tests, kernel benchmark, training steps/s and (where vLLM
# is installed) engine overhead, in under 10 minutes; prints a markdown block for
# benchmarks/README.md. `--dry-run` rehearses it on the CPU. See benchmarks/gpu_check.py.
# Python: $PYTHON, else the repo's .venv, else python3 on PATH.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then py="$repo/.venv/bin/python"; else py="python3"; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$repo/benchmarks/gpu_check.py" "$@"
