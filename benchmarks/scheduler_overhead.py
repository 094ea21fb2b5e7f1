"""The rank scheduler's own cost per engine step at GPU-like batch sizes and queue depths.

    python benchmarks/scheduler_overhead.py [--requests 4096 --max-num-seqs 256]

The scheduler benchmark measures overhead at 8 seats and a few dozen queued requests. A GPU replica runs
~256 seats with thousands waiting, and the adapter's work (re-sorting the waiting queue, choosing victims,
aging every request) grows with the queue, while the model step does not. The adapter is CPU-bound Python,
so its cost here is what it costs next to a GPU engine too.

A real vLLM engine (in-process, CPU) serves a tiny random-init Llama with `max_num_seqs` seats; one burst of
`--requests` requests (random prompts, 16-64 output tokens with ignore_eos, random scores) is drained under
each adapter policy. After every engine step the benchmark reads the scheduler's counters: the adapter's time
(ours), the rest of `schedule()` (vLLM's own), the model step, and the waiting-queue depth. Steps are binned
by depth. The adapter's time is also set against the *derived* A100 / Llama-3-8B decode step for a full batch
(`ltr.sim.a100_llama3_8b`), since the tiny model's CPU step says nothing about a GPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# The scheduler benchmark's import sets the rest of the in-process vLLM environment and the import path.
import scheduler_bench as bench  # noqa: E402
import numpy as np  # noqa: E402

from ltr.models import build_tiny_llama, cache_dir  # noqa: E402
from ltr.scheduling.engine import engine_kwargs, scored_sampling_params  # noqa: E402
from ltr.scheduling.policy import PolicyConfig  # noqa: E402
from ltr.sim import a100_llama3_8b  # noqa: E402

DEPTH_BINS = (0, 256, 1024, 2048, 4096, 1 << 30)
#: The default (Gittins: keys move as outputs cross their length distribution's quantiles), static LTR, MLFQ.
POLICIES = {"gittins": PolicyConfig(), "ltr": PolicyConfig(name="ltr"), "mlfq": PolicyConfig(name="mlfq")}


def drain(llm, scheduler, requests: list[tuple[list[int], int, float]], tag: str) -> list[dict]:
    """Submit the burst, step the engine until it is empty, and record one row per step."""
    engine = llm.llm_engine
    for i, (prompt, max_tokens, score) in enumerate(requests):
        params = scored_sampling_params(score, max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": prompt}, params)
    rows = []
    while engine.has_unfinished_requests():
        c = scheduler.counters
        waiting, running = len(scheduler.waiting), len(scheduler.running)
        adapter, schedule, model, model_steps = c.adapter_s, c.schedule_s, c.model_s, c.model_steps
        engine.step()
        c = scheduler.counters
        if c.model_steps == model_steps:
            continue   # no model step ran (nothing scheduled)
        rows.append({"waiting": waiting, "running": running,
                     "adapter_ms": 1e3 * (c.adapter_s - adapter),
                     "vllm_schedule_ms": 1e3 * ((c.schedule_s - schedule) - (c.adapter_s - adapter)),
                     "model_ms": 1e3 * (c.model_s - model)})
    return rows


def by_depth(rows: list[dict]) -> list[dict]:
    """Mean costs per waiting-queue depth bin (bins with no steps are left out)."""
    out = []
    for lo, hi in zip(DEPTH_BINS, DEPTH_BINS[1:]):
        sel = [r for r in rows if lo <= r["waiting"] < hi]
        if sel:
            out.append({"waiting_from": lo, "waiting_to": hi, "steps": len(sel),
                        "mean_waiting": float(np.mean([r["waiting"] for r in sel])),
                        **{f"{k}_mean": float(np.mean([r[k] for r in sel]))
                           for k in ("adapter_ms", "vllm_schedule_ms", "model_ms")},
                        "adapter_ms_p90": float(np.percentile([r["adapter_ms"] for r in sel], 90))})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=bench.RESULTS / "scheduler_overhead.json")
    args = ap.parse_args()
    if args.requests < 1 or args.max_num_seqs < 1:
        ap.error("--requests and --max-num-seqs must be >= 1")
    from vllm import LLM

    rng = random.Random(args.seed)
    model = build_tiny_llama(cache_dir() / "models" / "tiny-llama")
    # Scores over the shipped predictor's range, so the Gittins policy's requests fall in every length bin.
    requests = [([rng.randrange(100, 30000) for _ in range(rng.randint(32, 128))], rng.randint(16, 64),
                 rng.uniform(-3.0, 4.0)) for _ in range(args.requests)]
    llm = LLM(**engine_kwargs(str(model), PolicyConfig(), max_num_seqs=args.max_num_seqs, max_model_len=512,
                              max_num_batched_tokens=8192, enforce_eager=True, disable_log_stats=True))
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    a100 = a100_llama3_8b()
    # A full decode batch of the derived A100 profile: max_num_seqs sequences at ~600 tokens of context each.
    a100_step_ms = 1e3 * a100.step.step_time(0, args.max_num_seqs, 600 * args.max_num_seqs)
    report = {"command": "python " + shlex.join(["benchmarks/scheduler_overhead.py", *sys.argv[1:]]),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_avg_at_start": list(os.getloadavg())},
              "requests": args.requests, "max_num_seqs": args.max_num_seqs,
              "a100_llama3_8b_decode_step_ms": a100_step_ms, "policies": {}}
    for name, policy in POLICIES.items():
        scheduler.set_policy(policy)
        drain(llm, scheduler, requests[:8], f"{name}-warm")
        scheduler.set_policy(policy)
        t0 = time.perf_counter()
        rows = drain(llm, scheduler, requests, name)
        bins = by_depth(rows)
        for b in bins:
            b["adapter_fraction_of_a100_step"] = b["adapter_ms_mean"] / a100_step_ms
        report["policies"][name] = {"wall_s": time.perf_counter() - t0, "steps": len(rows), "by_depth": bins,
                                    "scheduler_stats": scheduler.stats()}
        for b in bins:
            print(f"[{name}] waiting {b['waiting_from']}-{b['waiting_to']}: adapter {b['adapter_ms_mean']:.2f} ms "
                  f"(p90 {b['adapter_ms_p90']:.2f}), vLLM schedule {b['vllm_schedule_ms_mean']:.2f} ms, "
                  f"model {b['model_ms_mean']:.1f} ms, adapter / A100 step {100 * b['adapter_fraction_of_a100_step']:.1f}%",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    plot(report, args.out.with_suffix(".png"))
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, res in report["policies"].items():
        bins = res["by_depth"]
        ax.plot([b["mean_waiting"] for b in bins], [b["adapter_ms_mean"] for b in bins], marker="o",
                label=f"{name}: adapter (ours)")
        ax.plot([b["mean_waiting"] for b in bins], [b["vllm_schedule_ms_mean"] for b in bins], marker="x", ls=":",
                label=f"{name}: rest of schedule() (vLLM)")
    ax.axhline(0.02 * report["a100_llama3_8b_decode_step_ms"], ls="--", c="gray",
               label="2% of a derived A100 Llama-3-8B decode step")
    ax.set(xlabel="waiting requests", ylabel="ms per engine step",
           title=f"Scheduler cost per step, {report['max_num_seqs']} seats, burst of {report['requests']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
