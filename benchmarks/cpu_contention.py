"""What a little CPU taken by another process costs the engine on this machine.

``serving_efficiency.py`` finds the deployment at 0.80-0.95 of its in-process engine at 32
streams on two cores, while Ray Serve's processes take only 0.1-0.2 core beside it. This
measures the engine alone against the engine beside a synthetic load of known size: a
process that spins ``busy`` seconds every ``period`` seconds (``--load busy:period``,
several allowed), e.g. ``0.01:0.1`` = 10 ms every 100 ms, about 0.1 core in short bursts,
the shape of a server process waking once per decode step. The in-process ``SAEEngine``
with sae-serve's default engine settings and binding (``serving_efficiency.start_engine``)
runs 32 greedy chat requests × 64 new tokens (its prompts, no features); configurations
take turns round after round (``rounds.py``); median
tokens/s and the ratio to the engine alone, with the load's measured CPU share.

    .venv/bin/python benchmarks/cpu_contention.py [--load 0.005:0.1,0.01:0.1,0.02:0.1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from rounds import interleaved  # noqa: E402  (benchmarks/rounds.py)
from serving_efficiency import messages, start_engine  # noqa: E402  (the same engine and prompts)

SPIN = """
import sys, time
busy, period = float(sys.argv[1]), float(sys.argv[2])
while True:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < busy:
        pass
    time.sleep(max(0.0, period - busy))
"""


def cpu_seconds(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", default="0.005:0.1,0.01:0.1,0.02:0.1",
                   help="busy:period seconds of each synthetic load, comma-separated (default %(default)s)")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    loads = [tuple(float(v) for v in spec.split(":")) for spec in args.load.split(",") if spec]

    from vllm import SamplingParams

    from server.config import ServeConfig

    bind = ServeConfig().engine.cpu_threads_bind  # sae-serve's binding, as its replica gets it
    if bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    eng = await start_engine(argparse.Namespace(eager=False, stream_interval=None))
    try:
        ids = [eng.encode_chat(messages(i)) for i in range(args.streams)]
        params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
        load_cpu: dict[tuple[float, ...] | None, list[float]] = {}

        def batch_with(load: tuple[float, ...] | None):
            async def batch() -> float:
                spinner = None
                if load is not None:
                    spinner = subprocess.Popen([sys.executable, "-c", SPIN, str(load[0]), str(load[1])])
                    await asyncio.sleep(0.3)
                try:
                    c0 = cpu_seconds(psutil.Process(spinner.pid)) if spinner else 0.0
                    t0 = time.perf_counter()
                    outs = await asyncio.gather(*[eng.complete(x, params, None) for x in ids])
                    wall = time.perf_counter() - t0
                    if spinner:
                        load_cpu.setdefault(load, []).append((cpu_seconds(psutil.Process(spinner.pid)) - c0) / wall)
                finally:
                    if spinner:
                        spinner.kill()
                        spinner.wait()
                return sum(o.num_generated_tokens for o in outs) / wall
            return batch

        rates = await interleaved({load: batch_with(load) for load in [None, *loads]}, args.repeats)
    finally:
        eng.shutdown()
    alone = statistics.median(rates[None])
    print(f"\n{args.streams} requests x {args.tokens} new tokens, median of {args.repeats} rounds\n")
    print("| beside the engine | its CPU (core) | tokens/s | / engine alone |\n|---|---:|---:|---:|")
    for load, r in rates.items():
        name = "nothing" if load is None else f"{load[0] * 1e3:g} ms busy every {load[1] * 1e3:g} ms"
        share = statistics.median(load_cpu.get(load, [0.0]))
        print(f"| {name} | {share:.2f} | {statistics.median(r):.1f} | {statistics.median(r) / alone:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
