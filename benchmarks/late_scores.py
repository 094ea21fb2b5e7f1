"""What a late predictor score costs, and whether re-ranking a request when its score lands would pay.

Under overload the ingress gives up on the predictor after `predictor_timeout_s`. Three placements of
such a request are simulated at paper scale (`sim_study.py`'s workload: ShareGPT test split, A100 /
Llama-3-8B profile, one replica, LTR default policy):

  first      unscored: ordered by arrival ahead of all ranked work (the engine's convention, the old ingress)
  neutral    the median of recent predictions (what the ingress does now, deployments/neutral.py)
  re-ranked  its own score, as if re-ranked in the queue when it lands: an upper bound for that design,
             since a score that lands a fraction of a second late costs nothing at these queueing delays

for a share of late requests drawn at random, over arrival seeds. Mean per-token latency (latency ÷
output tokens) is reported as FCFS ÷ variant, with the mean and range over seeds.

    python benchmarks/late_scores.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_study import PROFILE, Workload  # noqa: E402

from ltr.scheduling.policy import PolicyConfig  # noqa: E402
from ltr.sim import ClusterConfig, simulate, with_scores  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PLACEMENTS = ("first", "neutral", "re-ranked")


def per_token(requests, policy: PolicyConfig, seed: int) -> float:
    result = simulate(requests, PROFILE, ClusterConfig(1, "least_work", policy), seed=seed)
    return float(result.summary()["mean_per_token_latency"])


def place_late(requests, late_share: float, placement: str, rng: np.random.Generator):
    """The requests with a random `late_share` of them placed as `placement` says."""
    scores = np.array([r.score for r in requests], dtype=float)
    expected = np.array([r.expected_tokens for r in requests], dtype=float)
    late = rng.random(len(requests)) < late_share
    if placement == "re-ranked":
        return requests, int(late.sum())
    if placement == "neutral":
        scores[late], expected[late] = np.median(scores), np.median(expected)
        return with_scores(requests, scores, expected), int(late.sum())
    placed = with_scores(requests, scores, expected)
    return [r if not is_late else type(r)(r.request_id, r.arrival, r.prompt_len, r.output_len, None, None)
            for r, is_late in zip(placed, late)], int(late.sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tau", type=float, default=0.455, help="noise-model tau (the shipped predictor's test tau)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "late_scores.json")
    args = ap.parse_args()
    started = time.time()
    workload = Workload(args.tau, 0, use_predictor=False)
    n = 300 if args.quick else 1000
    rates = [16.0, 64.0]
    shares = [0.1, 0.4] if args.quick else [0.1, 0.2, 0.4]
    ltr, fcfs = PolicyConfig(name="ltr"), PolicyConfig(name="fcfs")
    rows = []
    for rate in rates:
        for seed in range(args.seeds):
            base = workload.sample(n, rate, seed, "pred")
            fcfs_pt = per_token(with_scores(base, None), fcfs, seed)
            for share in shares:
                for placement in PLACEMENTS:
                    requests, late = place_late(base, share, placement, np.random.default_rng(seed + 99))
                    pt = per_token(requests, ltr, seed)
                    rows.append({"rate": rate, "seed": seed, "late_share": share, "placement": placement,
                                 "late_requests": late, "per_token_mean": pt, "fcfs_per_token_mean": fcfs_pt,
                                 "gain_vs_fcfs": fcfs_pt / pt})
                    print(rows[-1], flush=True)
    summary = {}
    for rate in rates:
        for share in shares:
            cell = {}
            for placement in PLACEMENTS:
                gains = [r["gain_vs_fcfs"] for r in rows
                         if (r["rate"], r["late_share"], r["placement"]) == (rate, share, placement)]
                cell[placement] = {"mean": round(float(np.mean(gains)), 3), "min": round(min(gains), 3),
                                   "max": round(max(gains), 3)}
            summary[f"rate {rate:g}, late {share:g}"] = cell
    report = {"command": " ".join(["python", "benchmarks/late_scores.py", *map(shlex.quote, sys.argv[1:])]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (simulation)",
              "profile": PROFILE.name, "n": n, "tau_target": args.tau, "tau_realized": workload.tau,
              "seeds": args.seeds, "rows": rows, "summary_gain_vs_fcfs": summary,
              "wall_s": round(time.time() - started, 1)}
    args.out.write_text(json.dumps(report, indent=1))
    plot(summary, args.out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))
    return 0


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(summary)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    for k, placement in enumerate(PLACEMENTS):
        means = [summary[c][placement]["mean"] for c in cells]
        low = [m - summary[c][placement]["min"] for c, m in zip(cells, means)]
        high = [summary[c][placement]["max"] - m for c, m in zip(cells, means)]
        ax.bar(np.arange(len(cells)) + (k - 1) * width, means, width, yerr=[low, high], capsize=3, label=placement)
    ax.set_xticks(np.arange(len(cells)), cells, rotation=20, fontsize=8)
    ax.set_ylabel("FCFS ÷ LTR mean per-token latency")
    ax.set_title("Requests whose predictor score is late (simulated, A100 / Llama-3-8B profile)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
