"""GPU readiness check: every GPU figure of benchmarks/README.md from one command.

On a CUDA machine, in this order, each part time-bounded (the whole fits in ~10 minutes on
one H200 at the default ``--budget 570``):

1. **tests** -- pytest on the ``gpu``-marked tests (the files that carry the marker), run
   with ``--noconftest`` (the conftest's server fixtures need httpx/psutil; the GPU tests use
   only pytest's own fixtures). A test file whose imports need a package that is not
   installed (pydantic, on a bare torch + Triton machine) is reported as skipped with the
   package's name; no pytest at all skips the part;
2. **kernels** -- ``benchmarks/kernels.py`` (Triton sparse decode / steering edit vs dense
   cuBLAS, bf16, each cell also checked sparse-vs-dense), its default grid under a time
   budget;
3. **training** -- steps/s of ``SAETrainer`` + ``train_step`` (the step ``sae-train`` runs)
   for each architecture (topk, batchtopk, jumprelu, standard), float32 and bf16 autocast,
   on **synthetic activations** (random sparse mixtures of unit directions, generated on the
   device: no model, no download); data does not change the cost of a step;
4. **engine** -- ``benchmarks/engine_overhead.py --modes compiled --repeats 2``, only where
   ``import vllm`` works, with whatever time is left.

It needs torch (+ Triton for the kernels) and the repo; nothing is installed or
downloaded. A part that cannot run here is reported as skipped with the reason; a part that
fails (a test fails, a kernel disagrees with the dense result, a step raises or gives a
non-finite loss, a part overruns its time) makes the exit status 1. The figures are printed
as one markdown block, ready to paste into benchmarks/README.md.

``--dry-run`` runs every part on the CPU at toy sizes (well under a minute; the engine part
only checks its command line, it never starts vLLM): what ``tests/test_gpu_check.py`` runs.

    benchmarks/gpu_check.sh [--dry-run] [--budget SECONDS] [--parts tests,kernels,training,engine]
                            [--markdown FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("tests", "kernels", "training", "engine")
FLASH_SAE_DECODE = 13.6  # Flash-SAE's reported sparse-decode speed-up, the anchor for ours
# Per-part caps in seconds (GPU, dry run); each part also stops at the overall deadline.
CAPS = {"tests": (210, 150), "kernels": (150, 60), "training": (100, 60), "engine": (600, 30)}
ENGINE_ARGS = ["--modes", "compiled", "--repeats", "2"]
ENGINE_MIN_S = 150  # below this much time left the engine part is not started


@dataclasses.dataclass
class Result:
    part: str
    status: str  # "ok" | "FAIL" | "skipped"
    summary: str
    details: str = ""
    seconds: float = 0.0


# --------------------------------------------------------------------------- helpers


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def child_env(dry_run: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    if dry_run:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_child(cmd: list[str], timeout: float, dry_run: bool) -> tuple[int | None, str]:
    """(exit status or None on timeout, stdout+stderr)."""
    try:
        p = subprocess.run(cmd, cwd=REPO, env=child_env(dry_run), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=timeout)
        return p.returncode, p.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        return None, out.decode(errors="replace") if isinstance(out, bytes) else out


def tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def environment(dry_run: bool) -> dict[str, str]:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # any import failure: reported, not fatal
        env["triton"] = f"not importable ({type(e).__name__})"
    if torch.cuda.is_available() and not dry_run:
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = str(torch.version.cuda)
    else:
        env["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores){' dry run' if dry_run else ''}"
    return env


# --------------------------------------------------------------------------- parts


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text(encoding="utf-8"))


def part_tests(timeout: float, dry_run: bool) -> Result:
    if not has_module("pytest"):
        return Result("tests", "skipped", "pytest is not installed")
    files = gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--noconftest", "-m", "gpu", "-q",
           "-rfEs", "--continue-on-collection-errors", *files]
    rc, out = run_child(cmd, timeout, dry_run)
    if rc is None:
        return Result("tests", "FAIL", f"timed out after {timeout:.0f} s", tail(out))
    counts = {}
    last = [ln for ln in out.strip().splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)]
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", last[-1] if last
                              else ""):
        counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    # Collection errors for a missing package are this machine's limit, not a failure.
    missing, other_errors = {}, []
    sections = re.split(r"^_+ ERROR collecting (\S+) _+$", out, flags=re.M)
    reasons = dict(zip(sections[1::2], sections[2::2], strict=True))
    for path in re.findall(r"^ERROR (\S+)", out, flags=re.M):
        m = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", reasons.get(path, ""))
        if m and m.group(1).split(".")[0] not in ("sae_runtime", "server", "clients", "sae_wire", "tests"):
            missing[path] = m.group(1)
        else:
            other_errors.append(path)
    figures = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("passed", "failed", "skipped"))
    if missing:
        figures += "; not collected: " + ", ".join(f"{Path(p).name} (needs {m}, not installed)"
                                                   for p, m in missing.items())
    failed = counts.get("failed", 0) or other_errors or rc not in (0, 1, 5) or (rc == 1 and not missing)
    if not dry_run and not counts.get("passed"):
        failed = True
        figures += "; no GPU test passed on a CUDA machine"
    if failed:
        return Result("tests", "FAIL", figures + ("; errors: " + "; ".join(other_errors) if other_errors else ""),
                      tail(out, 40))
    return Result("tests", "ok", figures)


def part_kernels(timeout: float, dry_run: bool) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "kernels.json"
        cmd = [sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--json", str(out_json)]
        if dry_run:
            cmd += ["--device", "cpu", "--tiny", "--threads", "1", "--min-run-time", "0.02"]
        else:
            cmd += ["--device", "cuda", "--min-run-time", "0.1", "--budget", str(max(10.0, timeout - 40))]
        rc, out = run_child(cmd, timeout, dry_run)
        data = json.loads(out_json.read_text()) if out_json.is_file() else None
    if rc is None:
        return Result("kernels", "FAIL", f"timed out after {timeout:.0f} s", tail(out))
    if data is None or rc != 0:
        why = f"{data['mismatches']} cell(s) disagree with dense" if data and data.get("mismatches") else f"exit {rc}"
        return Result("kernels", "FAIL", why, tail(out))
    rows = data["rows"]
    dec = [r[7] for r in rows if r[0] == "decode"]
    steer = [r[7] for r in rows if r[0] == "steer"]

    def spread(v: list[float]) -> str:
        return f"median {statistics.median(v):.1f}×, max {max(v):.1f}×" if v else "none"

    backend = data["backend"] + ("" if dry_run or data["backend"] == "triton" else " (Triton not importable!)")
    summary = (f"{backend} vs dense, {data['dtype']}: decode {spread(dec)} "
               f"(Flash-SAE reports {FLASH_SAE_DECODE}× for sparse decode); steer {spread(steer)}; "
               f"{len(rows)} cells, max err {max(r[8] for r in rows):.1e}")
    if data["cells_not_run"]:
        summary += f"; {data['cells_not_run']} cells not run (time budget)"
    # README layout: one line per (d_in, d_sae, tokens); cells "dense ms / sparse ms (ratio×)".
    cell: dict[tuple[int, int, int], dict[str, str]] = {}
    for op, d_in, d_sae, k, n, td, ts, ratio, _err in rows:
        col = f"decode k={k}" if op == "decode" else "steer"
        r = f"{ratio:.1f}" if ratio >= 1 else f"{ratio:.2f}"
        cell.setdefault((d_in, d_sae, n), {})[col] = f"{td:.3g} / {ts:.3g} ({r}×)"
    cols = sorted({c for v in cell.values() for c in v}, key=lambda c: (c == "steer", len(c), c))
    lines = ["| d_in | d_sae | tokens | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for (d_in, d_sae, n), v in sorted(cell.items()):
        lines.append(f"| {d_in} | {d_sae} | {n} | " + " | ".join(v.get(c, "") for c in cols) + " |")
    details = f"Kernels ({data['header']}); cells: dense ms / sparse ms (dense ÷ sparse)\n\n" + "\n".join(lines)
    return Result("kernels", "ok", summary, details)


def part_training(timeout: float, dry_run: bool) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "training.json"
        per_config = 0.3 if dry_run else max(1.0, min(4.0, (timeout - 30) / 24))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", "training", "--json", str(out_json),
               "--seconds", str(per_config), *(["--dry-run"] if dry_run else [])]
        rc, out = run_child(cmd, timeout, dry_run)
        data = json.loads(out_json.read_text()) if out_json.is_file() else None
    if rc is None:
        return Result("training", "FAIL", f"timed out after {timeout:.0f} s", tail(out))
    if rc != 0 or not data:
        return Result("training", "FAIL", f"exit {rc}", tail(out))
    rows = data["rows"]
    bad = [r for r in rows if not math.isfinite(r["loss"])]
    lines = ["| architecture | d_in | d_sae | k | batch | precision | steps/s | tokens/s | FVU after |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        k = r["k"] if r["kind"] in ("topk", "batchtopk") else "-"
        lines.append(f"| {r['kind']} | {r['d_in']} | {r['d_sae']} | {k} | {r['batch']} | {r['precision']} "
                     f"| {r['steps_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['fvu']:.3f} |")
    big = [r for r in rows if (r["d_in"], r["d_sae"]) == (rows[-1]["d_in"], rows[-1]["d_sae"])]
    summary = (f"{len(rows)} configs, synthetic activations; at {big[0]['d_in']}×{big[0]['d_sae']}: "
               + ", ".join(f"{r['kind']} {r['precision']} {r['steps_per_s']:.1f}" for r in big) + " steps/s")
    details = (f"Training steps/s (`SAETrainer` + `train_step`, Adam, {data['device']}; synthetic activations: "
               f"random sparse mixtures of unit directions, no model)\n\n" + "\n".join(lines))
    if bad:
        return Result("training", "FAIL", f"non-finite loss: {[r['kind'] for r in bad]}; " + summary, details)
    return Result("training", "ok", summary, details)


def part_engine(timeout: float, dry_run: bool) -> Result:
    script = REPO / "benchmarks" / "engine_overhead.py"
    if dry_run:
        # Never start vLLM here: only check that the command line the real run uses is accepted.
        rc, out = run_child([sys.executable, str(script), "--help"], timeout, dry_run)
        if rc != 0 or not all(a in out for a in ENGINE_ARGS if a.startswith("--")):
            return Result("engine", "FAIL", f"`engine_overhead.py --help` failed or lacks {ENGINE_ARGS}", tail(out))
        have = "installed" if has_module("vllm") else "not installed"
        return Result("engine", "skipped", f"dry run: no vLLM engine started (vllm {have}); would run "
                      f"`engine_overhead.py {' '.join(ENGINE_ARGS)}`")
    if not has_module("vllm"):
        return Result("engine", "skipped", "vllm is not installed")
    rc, out = run_child([sys.executable, "-c", "import vllm"], min(timeout, 120), dry_run)
    if rc != 0:
        return Result("engine", "skipped", f"`import vllm` fails: {tail(out, 1)}")
    if timeout < ENGINE_MIN_S:
        return Result("engine", "skipped", f"time budget: {timeout:.0f} s left, the engine part needs "
                      f"~{ENGINE_MIN_S} s (run `--parts engine` on its own)")
    rc, out = run_child([sys.executable, str(script), *ENGINE_ARGS], timeout, dry_run)
    table = [ln for ln in out.splitlines() if ln.startswith("|")]
    measured = [ln for ln in out.splitlines() if ln.startswith("# measured:")]
    if rc is None:
        return Result("engine", "FAIL", f"timed out after {timeout:.0f} s ({len(measured)} configurations "
                      "measured)", "\n".join(measured))
    if rc != 0 or not table:
        return Result("engine", "FAIL", f"exit {rc}", tail(out))
    rates = re.findall(r"^\| compiled \| ([^|]+) \| ([\d.]+) \| ([\d.]+) \|", "\n".join(table), flags=re.M)
    summary = "tokens/s (ratio to plain): " + ", ".join(f"{n.strip()} {r} ({q})" for n, r, q in rates)
    return Result("engine", "ok", summary, "Engine overhead (`engine_overhead.py "
                  f"{' '.join(ENGINE_ARGS)}`)\n\n" + "\n".join(table))


# --------------------------------------------------------------------------- training (child)


def training_child(args: argparse.Namespace) -> int:
    """Time train_step per architecture and precision; writes JSON rows."""
    import torch

    from sae_runtime.training.trainers import TRAINERS, SAETrainer, train_step

    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    if dry:
        torch.set_num_threads(1)
    # (d_in, d_sae, k, batch): the default model's width, then a 2k-wide model; sae-train's
    # defaults otherwise (8× expansion, k=64, 2048 tokens a step).
    shapes = [(32, 128, 8, 256)] if dry else [(576, 4608, 64, 2048), (2048, 16384, 64, 2048)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for d_in, d_sae, k, batch in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        n_feat = 4 * d_in
        dirs = torch.randn(n_feat, d_in, device=device, generator=g)
        dirs /= dirs.norm(dim=1, keepdim=True)
        pool = []
        for _ in range(4):
            idx = torch.rand(batch, n_feat, device=device, generator=g).topk(16, dim=1).indices
            coef = torch.zeros(batch, n_feat, device=device).scatter_(
                1, idx, torch.rand(batch, 16, device=device, generator=g) * 3 + 0.5)
            pool.append(coef @ dirs + 0.01 * torch.randn(batch, d_in, device=device, generator=g))
        for kind in TRAINERS:
            for precision in ("float32", "bfloat16"):
                trainer = SAETrainer(kind, d_in, d_sae, k=k, dead_window=500_000).to(device)  # type: ignore[arg-type]
                trainer.init_b_dec(pool[0], "mean")
                opt = torch.optim.Adam(trainer.parameters(), lr=1e-3)
                bf16 = precision == "bfloat16"
                for i in range(3):  # warm-up (Triton compile, cuBLAS heuristics, allocator)
                    out = train_step(trainer, opt, pool[i % len(pool)], bf16=bf16)
                sync()
                steps, t0 = 0, time.perf_counter()
                while True:
                    out = train_step(trainer, opt, pool[steps % len(pool)], bf16=bf16)
                    steps += 1
                    if steps % 5 == 0:
                        sync()
                        if time.perf_counter() - t0 >= args.seconds or steps >= 2000:
                            break
                dt = time.perf_counter() - t0
                row = dict(kind=kind, precision=precision, d_in=d_in, d_sae=d_sae, k=k, batch=batch, steps=steps,
                           steps_per_s=steps / dt, tokens_per_s=steps * batch / dt,
                           loss=float(out.loss), fvu=float(out.fvu))
                print(json.dumps(row), flush=True)
                rows.append(row)
                del trainer, opt, out
    Path(args.json).write_text(json.dumps({"device": str(torch.cuda.get_device_name() if device.type == "cuda"
                                                         else "cpu"), "rows": rows}, indent=1))
    return 0


# --------------------------------------------------------------------------- driver


def render(env: dict[str, str], results: list[Result], total_s: float, dry_run: bool) -> str:
    day = datetime.datetime.now(datetime.UTC).date().isoformat()
    head = (f"GPU check{' (DRY RUN on CPU: toy sizes, not figures)' if dry_run else ''}: {env['device']}"
            + (f", CUDA {env['cuda']}" if "cuda" in env else "")
            + f", torch {env['torch']}, triton {env['triton']}, python {env['python']}, {day}, {total_s:.0f} s")
    lines = [head, "", "| part | status | figures | s |", "|---|---|---|---:|"]
    for r in results:
        lines.append(f"| {r.part} | {r.status} | {r.summary.replace('|', '/')} | {r.seconds:.0f} |")
    for r in results:
        if r.details:
            lines += ["", r.details if r.status == "ok" else f"{r.part} ({r.status}), last output:\n\n```\n"
                      f"{r.details}\n```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", "--cpu", action="store_true", help="every part on the CPU at toy sizes")
    p.add_argument("--budget", type=float, default=570, help="seconds for the whole check (default 570)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--markdown", default=None, help="also write the summary block to this file")
    p.add_argument("--part", choices=["training"], help=argparse.SUPPRESS)  # child process
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=3.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part == "training":
        return training_child(args)

    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; choose from {','.join(PARTS)}")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; `--dry-run` rehearses every part on the CPU", file=sys.stderr)
        return 2
    env = environment(args.dry_run)
    print(f"[gpu-check] {env}", flush=True)
    funcs = {"tests": part_tests, "kernels": part_kernels, "training": part_training, "engine": part_engine}
    t_start = time.monotonic()
    deadline = t_start + args.budget
    results = []
    for name in parts:
        left = deadline - time.monotonic()
        limit = min(CAPS[name][1 if args.dry_run else 0], left)
        if limit < 10:
            res = Result(name, "skipped", f"time budget spent ({args.budget:.0f} s)")
        else:
            print(f"[gpu-check] {name}: running (at most {limit:.0f} s)", flush=True)
            t0 = time.monotonic()
            try:
                res = funcs[name](limit, args.dry_run)
            except Exception as e:  # a bug in the check itself: reported as the part's failure
                res = Result(name, "FAIL", f"check crashed: {type(e).__name__}: {e}")
            res.seconds = time.monotonic() - t0
        print(f"[gpu-check] {name}: {res.status}: {res.summary}", flush=True)
        results.append(res)
    block = render(env, results, time.monotonic() - t_start, args.dry_run)
    print("\n----- 8< ----- summary for benchmarks/README.md -----\n" + block + "\n----- >8 -----", flush=True)
    if args.markdown:
        Path(args.markdown).write_text(block + "\n", encoding="utf-8")
    failed = [r.part for r in results if r.status == "FAIL"]
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
