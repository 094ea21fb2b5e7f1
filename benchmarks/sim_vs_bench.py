"""Saturated fidelity check: replay a real `scheduler_bench.py` run in the simulator and compare.

The scheduler benchmark's requests, scores and arrival times are rebuilt from the parameters recorded in
its JSON (same sampling, same seeds, same predictor), every policy x load is simulated on the calibrated
CPU profile (`ltr calibrate` / sim_fidelity.py output) with the benchmark's `max_num_seqs`, and the
simulated mean / p90 latency, per-token latency and throughput are set against the measured ones. No
engine runs here: it checks the simulator where queues are long (past saturation) and policies differ.
It then sweeps the starvation rule (threshold x aged_share) on the same trace: the mean-vs-tail trade-off,
and sets it against an aging rule that knows every request's FCFS latency in advance (a reference point).

    python benchmarks/sim_vs_bench.py --bench results/scheduler_bench_v2.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

import scheduler_bench as bench
from ltr.scheduling.policy import PolicyConfig, RankPolicy, RankState, SchedulingPolicy, SortKey, StarvationConfig
from ltr.sim import ClusterConfig, HardwareProfile, SimResult, build_requests, load_profile, poisson_arrivals, simulate

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.15
THRESHOLDS = (25, 50, 100, 200, 400)
AGED_SHARES = (0.125, 0.25, 0.375, 0.5)
DEADLINE_SLACKS = (0.75, 1.0, 1.1, 1.2, 1.25, 1.5, 2.0)


def rebuild(params: dict) -> tuple[list[bench.BenchRequest], list[tuple[str, np.ndarray]], int]:
    """The benchmark's requests (with scores), its loads' arrival times, and its short/long split."""
    requests = bench.load_requests(params["num_requests"], params["output_cap"], params["max_prompt"],
                                   params["seed"], params["length_scale"])
    requests, _ = bench.score_requests(requests, params["scores"], params["seed"])
    rng = np.random.default_rng(params["seed"])
    loads = [(f"poisson-{rate:g}", poisson_arrivals(len(requests), rate, rng)) for rate in params["rates"]]
    if not params["no_burst"]:
        loads.append(("burst", np.zeros(len(requests))))
    return requests, loads, int(np.median([r.output_len for r in requests]))


def replay(requests: list[bench.BenchRequest], arrivals: np.ndarray, scores: list[float] | None,
           profile: HardwareProfile, policy: PolicyConfig) -> SimResult:
    """The benchmark's requests at the given arrival times, simulated on one replica."""
    sim_requests = build_requests([r.prompt_len for r in requests], [r.output_len for r in requests],
                                  arrivals, scores)
    return simulate(sim_requests, profile, ClusterConfig(policy=policy))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, default=RESULTS / "scheduler_bench_v2.json")
    ap.add_argument("--profile", type=Path, default=RESULTS / "sim_calibration_cpu.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "sim_vs_bench.json")
    args = ap.parse_args()
    real = json.loads(args.bench.read_text())
    params = real["parameters"]
    profile = load_profile(args.profile)
    profile = dataclasses.replace(profile, limits=dataclasses.replace(
        profile.limits, max_num_seqs=params["max_num_seqs"]))
    requests, loads, split = rebuild(params)
    scores = [r.score for r in requests]
    rows = []
    for name, result in real["results"].items():
        policy, score_kind = bench.policy_setup(name, scores, params.get("aged_share"),
                                                params.get("preemption_patience"))
        sim_scores = {"none": None, "predicted": scores, "true": [float(r.output_len) for r in requests]}[score_kind]
        for load_name, arrivals in loads:
            measured = result["loads"][load_name]
            sim = replay(requests, arrivals, sim_scores, profile, policy)
            lat = np.array([r.latency for r in sim.records])
            row = {"policy": name, "load": load_name,
                   "real_mean_latency": measured["e2e_s"]["mean"], "sim_mean_latency": float(lat.mean()),
                   "real_p90_latency": measured["e2e_s"]["p90"], "sim_p90_latency": float(np.percentile(lat, 90)),
                   "real_mean_per_token_latency": measured["per_token_latency_s"]["mean"],
                   "sim_mean_per_token_latency": float(np.mean([r.per_token_latency for r in sim.records])),
                   "real_throughput_tok_s": measured["throughput_tok_s"],
                   "sim_throughput_tok_s": sim.summary()["throughput_tok_s"],
                   "sim_rank_preemptions": sim.rank_preemptions, "sim_promotions": sim.promotions}
            for key in ("mean_latency", "p90_latency", "mean_per_token_latency", "throughput_tok_s"):
                row[f"{key}_error"] = row[f"sim_{key}"] / row[f"real_{key}"] - 1
            rows.append(row)
            print(f"{name:13s} {load_name:11s} mean latency real {row['real_mean_latency']:6.2f}s "
                  f"sim {row['sim_mean_latency']:6.2f}s ({100 * row['mean_latency_error']:+.0f}%)", flush=True)

    def ratio(kind: str, load: str, num: str, den: str) -> float:
        by = {(r["policy"], r["load"]): r for r in rows}
        return by[(num, load)][f"{kind}_mean_per_token_latency"] / by[(den, load)][f"{kind}_mean_per_token_latency"]

    gains = [{"load": load, "policy": p,
              "real_fcfs_over_policy": ratio("real", load, "fcfs", p),
              "sim_fcfs_over_policy": ratio("sim", load, "fcfs", p)}
             for load, _ in loads for p in real["results"] if p != "fcfs" and "fcfs" in real["results"]]
    # FCFS at each Poisson load, the baseline of both studies below (simulated once).
    fcfs_runs = {name: replay(requests, arrivals, None, profile, PolicyConfig(name="fcfs"))
                 for name, arrivals in loads if name != "burst"}
    grid = sweep_against_fcfs(requests, loads, fcfs_runs, profile, split, "ltr", starvation_variants)
    reference = sweep_against_fcfs(requests, loads, fcfs_runs, profile, split, "policy", deadline_variants)
    errors = [abs(r["mean_latency_error"]) for r in rows]
    report = {
        "command": "python " + shlex.join(["benchmarks/sim_vs_bench.py", *sys.argv[1:]]),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "bench": {"file": args.bench.name, "command": real["command"], "machine": real["machine"]},
        "profile": profile.to_json(), "profile_file": args.profile.name, "short_long_split": split,
        "rows": rows, "gains_per_token": gains, "target_abs_mean_latency_error": TARGET,
        "max_abs_mean_latency_error": max(errors), "median_abs_mean_latency_error": float(np.median(errors)),
        "rows_within_target": sum(e <= TARGET for e in errors), "starvation_grid": grid,
        "fcfs_deadline_reference": reference,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps({k: report[k] for k in ("max_abs_mean_latency_error", "median_abs_mean_latency_error",
                                             "rows_within_target")}))
    return 0


def against_fcfs(summary: dict, fcfs: dict, label: str) -> dict[str, float]:
    """Per-token gain, long-request p99 ratio and throughput ratio of a policy's summary against FCFS's."""
    return {f"fcfs_over_{label}_per_token": fcfs["mean_per_token_latency"] / summary["mean_per_token_latency"],
            f"{label}_over_fcfs_long_p99": summary["long_p99_latency"] / fcfs["long_p99_latency"],
            f"{label}_over_fcfs_throughput": summary["throughput_tok_s"] / fcfs["throughput_tok_s"]}


def sweep_against_fcfs(requests: list[bench.BenchRequest], loads: list[tuple[str, np.ndarray]],
                       fcfs_runs: dict[str, SimResult], profile: HardwareProfile, split: int, label: str,
                       variants: Callable[[SimResult], Iterable[tuple[dict, PolicyConfig]]]) -> list[dict]:
    """Simulate each policy variant (predicted scores) at each Poisson load, against FCFS at that load.

    `variants` maps the load's FCFS run to (row fields, policy) pairs, so a variant may read it.
    """
    rows = []
    scores = [r.score for r in requests]
    for load_name, arrivals in loads:
        if load_name not in fcfs_runs:
            continue
        fcfs = fcfs_runs[load_name].summary(long_threshold=split + 1)
        for fields, policy in variants(fcfs_runs[load_name]):
            summary = replay(requests, arrivals, scores, profile, policy).summary(long_threshold=split + 1)
            rows.append({"load": load_name, **fields, **against_fcfs(summary, fcfs, label)})
    return rows


def starvation_variants(_: SimResult) -> Iterator[tuple[dict, PolicyConfig]]:
    """LTR over threshold x aged_share."""
    for threshold in THRESHOLDS:
        for share in AGED_SHARES:
            yield ({"threshold": threshold, "aged_share": share},
                   PolicyConfig(starvation=StarvationConfig(threshold, aged_share=share)))


class FCFSDeadlinePolicy(RankPolicy):
    """Analysis only, not deployable: LTR order, but each request has a deadline of `slack` x its own FCFS
    latency, known in advance (in iterations after it is first seen). A request past its deadline is
    promoted for good, keeps its seat, and promoted requests go earliest-deadline first. It shows what aging
    reaches when it knows exactly what FCFS would give each request, which no deployable rule does.
    """

    def __init__(self, deadline_iters: dict[str, float], slack: float) -> None:
        # The threshold never fires: the deadline rule below replaces aging; keep_seat protects the promoted.
        super().__init__(starvation=StarvationConfig(threshold=1 << 62, keep_seat=True, aged_share=None),
                         preemption_patience=100)
        self.deadline_iters = deadline_iters
        self.slack = slack
        self.due: dict[str, float] = {}
        self.open: dict[str, RankState] = {}

    def sort_key(self, state: RankState) -> SortKey:
        if state.aged:
            return (0.0, self.due[state.request_id], state.arrival)
        return (1.0, *self.rank_key(state), state.arrival)

    def track(self, state: RankState) -> None:
        super().track(state)
        self.due[state.request_id] = self.stats.steps + self.slack * self.deadline_iters[state.request_id]
        self.open[state.request_id] = state

    def forget(self, request_id: str) -> None:
        super().forget(request_id)
        self.open.pop(request_id, None)

    def observe_step(self, scheduled: dict[str, int]) -> None:
        super().observe_step(scheduled)
        for request_id in [r for r, s in self.open.items() if self.stats.steps >= self.due[r]]:
            state = self.open.pop(request_id)
            state.aged = True
            state.promoted_left = 1 << 62
            self.stats.promotions += 1


@dataclasses.dataclass(frozen=True)
class FCFSDeadlineConfig(PolicyConfig):
    """Builds `FCFSDeadlinePolicy` where the simulator builds a policy."""

    deadline_iters: dict[str, float] = dataclasses.field(default_factory=dict)
    slack: float = 1.0

    def build(self, max_num_seqs: int | None = None) -> SchedulingPolicy:
        return FCFSDeadlinePolicy(self.deadline_iters, self.slack)


def deadline_variants(fcfs_run: SimResult) -> Iterator[tuple[dict, PolicyConfig]]:
    """`FCFSDeadlinePolicy` over DEADLINE_SLACKS, deadlines from this load's FCFS latencies (in iterations)."""
    step_s = fcfs_run.makespan / sum(fcfs_run.steps)
    deadline_iters = {r.request_id: r.latency / step_s for r in fcfs_run.records}
    for slack in DEADLINE_SLACKS:
        yield {"slack": slack}, FCFSDeadlineConfig(deadline_iters=deadline_iters, slack=slack)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(21, 4.8))
    x = np.arange(len(rows))
    ax = axes[0]
    ax.bar(x - 0.2, [r["real_mean_latency"] for r in rows], 0.4, label="real vLLM (CPU)")
    ax.bar(x + 0.2, [r["sim_mean_latency"] for r in rows], 0.4, label="simulator")
    for xi, r in zip(x, rows):
        ax.annotate(f"{100 * r['mean_latency_error']:+.0f}%", (xi, max(r["real_mean_latency"], r["sim_mean_latency"])),
                    ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x, [f"{r['policy']}\n{r['load']}" for r in rows], fontsize=5, rotation=90)
    ax.set_ylabel("mean latency (s)")
    ax.set_title("mean latency per policy and load")
    ax.legend(fontsize=8)
    ax = axes[1]
    gains = report["gains_per_token"]
    ax.scatter([g["real_fcfs_over_policy"] for g in gains], [g["sim_fcfs_over_policy"] for g in gains])
    for g in gains:
        ax.annotate(f"{g['policy']} {g['load']}", (g["real_fcfs_over_policy"], g["sim_fcfs_over_policy"]), fontsize=6)
    top = max(max(g["real_fcfs_over_policy"], g["sim_fcfs_over_policy"]) for g in gains) * 1.1
    ax.plot([0, top], [0, top], ls="--", c="gray")
    ax.set(xlabel="real FCFS / policy per-token latency", ylabel="simulated", title="gains: real vs simulated")
    ax = axes[2]
    for (load, share) in dict.fromkeys((g["load"], g["aged_share"]) for g in report["starvation_grid"]):
        pts = [g for g in report["starvation_grid"] if (g["load"], g["aged_share"]) == (load, share)]
        ax.plot([g["fcfs_over_ltr_per_token"] for g in pts], [g["ltr_over_fcfs_long_p99"] for g in pts],
                marker="o", label=f"{load}, aged_share {share}")
        for g in pts:
            ax.annotate(str(g["threshold"]), (g["fcfs_over_ltr_per_token"], g["ltr_over_fcfs_long_p99"]), fontsize=6)
    for load in dict.fromkeys(g["load"] for g in report["fcfs_deadline_reference"]):
        pts = [g for g in report["fcfs_deadline_reference"] if g["load"] == load]
        ax.plot([g["fcfs_over_policy_per_token"] for g in pts], [g["policy_over_fcfs_long_p99"] for g in pts],
                marker="s", ls=":", c="k", label=f"{load}, FCFS-deadline reference (labels: slack)")
        for g in pts:
            ax.annotate(f"{g['slack']:g}x", (g["fcfs_over_policy_per_token"], g["policy_over_fcfs_long_p99"]), fontsize=6)
    ax.axvline(3.0, ls="--", c="gray")
    ax.axhline(1.5, ls="--", c="gray")
    ax.set(xlabel="FCFS / LTR per-token latency (higher is better)", ylabel="LTR / FCFS long-request p99",
           title="simulated starvation sweep (labels: threshold)")
    ax.legend(fontsize=6)
    fig.suptitle(f"Simulator replay of {report['bench']['file']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
