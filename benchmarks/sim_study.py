"""Paper-scale simulation study: Llama-3-8B-on-A100-like replicas serving the ShareGPT test split.

Sections (each a list of rows in the JSON, one panel in the PNG):
  rates       FCFS / priority / MLFQ / LTR (noise-model scores at --tau) / LTR variants / oracle SJF
              over Poisson 2-64 req/s on one replica; mean per-token latency = latency / output tokens.
  tau         LTR's gain over FCFS as the predictor's Kendall tau goes 0.3 -> 0.9 (high and medium load).
  starvation  threshold x quantum sweep at high load: mean per-token latency vs p99 latency.
  replicas    1-64 replicas at a fixed per-replica rate, `pow2` (Ray Serve default) vs `least_work`.
  synthetic   one burst of every request at t=0; completions within time budgets (synthetic data gen).

Scores: `noisy_scores` (Gaussian-copula noise model tuned to the target tau on this very trace, see
ltr/sim/workload.py), or the shipped predictor with --use-predictor when ltr/artifacts/predictor exists.

    python benchmarks/sim_study.py            # full (a few minutes)
    python benchmarks/sim_study.py --quick    # CI-sized
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ltr.data import load_pairs, split_pairs
from ltr.scheduling.length_distribution import fit_length_distribution
from ltr.scheduling.policy import PAPER_RULE, PolicyConfig, StarvationConfig
from ltr.sim import (
    ClusterConfig,
    a100_llama3_8b,
    build_requests,
    expected_tokens_from_scores,
    noisy_scores,
    poisson_arrivals,
    simulate,
)

RESULTS = Path(__file__).resolve().parent / "results"
MAX_MODEL_LEN = 8192   # Llama-3-8B context: longer ShareGPT pairs would be rejected by the engine
PAPER = {"chatbot_per_token_latency_gain": 2.8, "synthetic_throughput_gain": 6.5}


@dataclass(frozen=True)
class Variant:
    label: str
    policy: PolicyConfig
    scores: str   # "none" | "pred" | "oracle"


def variants(distribution: str | None = None) -> list[Variant]:
    """`gittins` is the project's default PolicyConfig (over the length distribution at `distribution`,
    None: the shipped one); `ltr` is static LTR with the same aging, the others change one thing each."""
    return [
        Variant("fcfs", PolicyConfig(name="fcfs"), "none"),
        Variant("priority", PolicyConfig(name="priority"), "pred"),
        Variant("mlfq", PolicyConfig(name="mlfq", starvation=None), "none"),
        Variant("gittins", PolicyConfig(length_distribution=distribution), "pred"),
        Variant("ltr", PolicyConfig(name="ltr"), "pred"),
        Variant("ltr-paper-rule", PAPER_RULE, "pred"),
        Variant("ltr-no-starvation", PolicyConfig(name="ltr", starvation=None), "pred"),
        Variant("ltr-no-rank-preempt", PolicyConfig(name="ltr", max_preemptions_per_step=0), "pred"),
        Variant("oracle-sjf", PolicyConfig(name="ltr", starvation=None), "oracle"),
    ]


class Workload:
    """ShareGPT test-split lengths (SmolLM2 tokens) with predicted scores and expected lengths."""

    def __init__(self, tau: float, seed: int, use_predictor: bool) -> None:
        splits = split_pairs(load_pairs())
        test = [p for p in splits.test if p.prompt_len + p.output_len <= MAX_MODEL_LEN]
        self.prompt = np.array([p.prompt_len for p in test])
        self.output = np.array([p.output_len for p in test])
        self.train_lens = np.array([p.output_len for p in splits.train])
        self.seed = seed
        self.source = f"noise model, target tau {tau}"
        if use_predictor:
            from ltr.predictor.length_distribution import shipped_split_scores
            scores, pairs = shipped_split_scores("test")
            self.scores = scores[[i for i, p in enumerate(pairs) if p.prompt_len + p.output_len <= MAX_MODEL_LEN]]
            from scipy.stats import kendalltau
            self.tau = float(kendalltau(self.scores, self.output).statistic)
            self.source = "shipped predictor (ltr.predictor.load_shipped_predictor; test-split scores cached)"
        else:
            self.scores, self.tau = noisy_scores(self.output, tau, np.random.default_rng(seed))
        self.val_lens = np.array([p.output_len for p in splits.val])
        #: Length distribution for the Gittins policy: the shipped one for predictor scores, else one fit on
        #: the validation split scored by the same noise model (`distribution_for`).
        self.distribution = None if use_predictor else self.distribution_for(tau)

    def distribution_for(self, tau: float) -> str:
        """A length distribution JSON for noise-model scores at `tau`: the validation split's lengths, scored
        by the noise model (the same copula, other noise), fit as the shipped one is fit on the predictor's."""
        path = Path(tempfile.gettempdir()) / f"ltr-sim-length-distribution-tau{tau:.3f}-seed{self.seed}.json"
        if not path.is_file():
            scores, _ = noisy_scores(self.val_lens, tau, np.random.default_rng(self.seed + 500))
            path.write_text(json.dumps(fit_length_distribution(scores, self.val_lens).to_mapping()))
        return str(path)

    def with_tau(self, tau: float) -> np.ndarray:
        return noisy_scores(self.output, tau, np.random.default_rng(self.seed + 1000 + int(tau * 100)))[0]

    def sample(self, n: int, rate: float, seed: int, scores: str, score_values: np.ndarray | None = None):
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(self.output), size=n, replace=n > len(self.output))
        arrivals = np.zeros(n) if rate <= 0 else poisson_arrivals(n, rate, rng)
        values = self.scores if score_values is None else score_values
        if scores == "oracle":
            s = self.output[idx].astype(float)
        elif scores == "pred":
            s = values[idx]
        else:
            s = None
        expected = expected_tokens_from_scores(values[idx], self.train_lens)
        return build_requests(self.prompt[idx], self.output[idx], arrivals, scores=s, expected_tokens=expected)


def run(workload: Workload, variant: Variant, n: int, rate: float, seed: int, replicas: int = 1,
        router: str = "least_work", score_values: np.ndarray | None = None) -> dict:
    requests = workload.sample(n, rate, seed, variant.scores, score_values)
    result = simulate(requests, PROFILE, ClusterConfig(replicas, router, variant.policy), seed=seed)
    long_threshold = int(np.percentile(workload.output, 90))
    row = {"policy": variant.label, "rate": rate, "n": n, "replicas": replicas, "router": router,
           **result.summary(long_threshold)}
    row["_result"] = result
    return row


PROFILE = a100_llama3_8b()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer points and requests (CI)")
    ap.add_argument("--tau", type=float, default=0.55, help="predictor Kendall tau for the noise model")
    ap.add_argument("--use-predictor", action="store_true", help="score with ltr/artifacts/predictor")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not 0 < args.tau < 1:
        ap.error("--tau must be in (0, 1)")
    out = args.out or RESULTS / ("sim_study_quick.json" if args.quick else "sim_study.json")
    started = time.time()
    wl = Workload(args.tau, args.seed, args.use_predictor)
    n = 400 if args.quick else 1000
    rates = [4, 16, 64] if args.quick else [2, 4, 8, 16, 32, 64]
    taus = [0.3, 0.55, 0.9] if args.quick else [0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9]
    thresholds = [50, 200, 1000] if args.quick else [25, 50, 100, 200, 400, 1000]
    quanta = [10] if args.quick else [5, 10, 40]
    aged_shares = [0.125, 0.5] if args.quick else [0.0625, 0.125, 0.5, 1.0]
    replica_counts = [1, 4, 16] if args.quick else [1, 4, 16, 64]
    per_replica = 150 if args.quick else 600
    high = 64.0
    report: dict = {"sections": {}}

    def clean(row: dict) -> dict:
        return {k: v for k, v in row.items() if not k.startswith("_")}

    # 1. policies x rates
    rows = []
    for rate in rates:
        for v in variants(wl.distribution):
            rows.append(clean(run(wl, v, n, rate, args.seed)))
            print(f"rates {rate:>4} {v.label:<20} per-token {rows[-1]['mean_per_token_latency']:.4f} s/tok",
                  file=sys.stderr)
    report["sections"]["rates"] = rows

    # 2. tau sensitivity (high and medium load)
    from scipy.stats import kendalltau

    named = {v.label: v for v in variants(wl.distribution)}
    fcfs, ltr, ltr_np, paper = named["fcfs"], named["ltr"], named["ltr-no-rank-preempt"], named["ltr-paper-rule"]
    rows = []
    for rate, variant in ((high, ltr), (high, paper), (16.0, ltr)):
        base = run(wl, fcfs, n, rate, args.seed)
        for tau in taus:
            s = wl.with_tau(tau)
            r = run(wl, variant, n, rate, args.seed, score_values=s)
            rows.append({"rate": rate, "variant": variant.label, "tau_target": tau,
                         "tau_realized": float(kendalltau(s, wl.output).statistic),
                         "fcfs_mean_per_token_latency": base["mean_per_token_latency"],
                         "ltr_mean_per_token_latency": r["mean_per_token_latency"],
                         "gain": base["mean_per_token_latency"] / r["mean_per_token_latency"],
                         "ltr_p99_latency": r["p99_latency"], "fcfs_p99_latency": base["p99_latency"]})
    report["sections"]["tau"] = rows

    # 3. starvation threshold x quantum (high load), the project's rule and the paper's
    rows = []
    for rule in ("ours", "paper"):
        for q in quanta:
            for th in thresholds:
                base = PolicyConfig(name="ltr") if rule == "ours" else PAPER_RULE
                starvation = replace(base.starvation, threshold=th, quantum=q)
                v = Variant(f"ltr-{rule}-t{th}-q{q}", replace(base, starvation=starvation), "pred")
                r = clean(run(wl, v, n, high, args.seed))
                rows.append({"rule": rule, "threshold": th, "quantum": q, **r})
    for share in aged_shares:
        v = Variant(f"ltr-aged-share-{share}", PolicyConfig(name="ltr", starvation=StarvationConfig(aged_share=share)),
                    "pred")
        rows.append({"rule": "ours", "threshold": 200, "quantum": 10, "aged_share": share,
                     **clean(run(wl, v, n, high, args.seed))})
    r = clean(run(wl, named["ltr-no-starvation"], n, high, args.seed))
    rows.append({"rule": None, "threshold": None, "quantum": None, **r})
    report["sections"]["starvation"] = rows

    # 4. replicas x routers at a fixed per-replica rate
    rows = []
    per_replica_rate = 24.0   # ~2x one replica's capacity (~11 req/s): queues form, routing matters
    for count in replica_counts:
        for router, v in (("pow2", fcfs), ("pow2", ltr_np), ("least_work", ltr_np)):
            r = clean(run(wl, v, per_replica * count, per_replica_rate * count, args.seed, count, router))
            rows.append(r)
        print(f"replicas {count} done", file=sys.stderr)
    report["sections"]["replicas"] = rows

    # 5. synthetic data generation: one burst, completions within budgets
    burst = n
    results = {v.label: run(wl, v, burst, 0.0, args.seed)["_result"] for v in variants(wl.distribution)
               if v.label in ("fcfs", "gittins", "ltr", "ltr-paper-rule", "oracle-sjf", "mlfq")}
    fcfs_makespan = results["fcfs"].makespan
    rows = []
    for frac in (0.05, 0.1, 0.25, 0.5, 1.0):
        budget = frac * fcfs_makespan
        counts = {label: res.completed_by(budget) for label, res in results.items()}
        rows.append({"budget_s": budget, "budget_frac_of_fcfs_makespan": frac, "completed": counts,
                     "ltr_over_fcfs": counts["ltr"] / max(counts["fcfs"], 1)})
    report["sections"]["synthetic"] = rows

    # headline
    by = {(r["rate"], r["policy"]): r for r in report["sections"]["rates"]}
    top = max(rates)
    report["headline"] = {
        "rate": top,
        "fcfs_over_ltr_per_token_latency": by[(top, "fcfs")]["mean_per_token_latency"]
        / by[(top, "ltr")]["mean_per_token_latency"],
        "fcfs_over_oracle_per_token_latency": by[(top, "fcfs")]["mean_per_token_latency"]
        / by[(top, "oracle-sjf")]["mean_per_token_latency"],
        "ltr_over_oracle_per_token_latency": by[(top, "ltr")]["mean_per_token_latency"]
        / by[(top, "oracle-sjf")]["mean_per_token_latency"],
        "fcfs_over_ltr_no_rank_preempt_per_token_latency": by[(top, "fcfs")]["mean_per_token_latency"]
        / by[(top, "ltr-no-rank-preempt")]["mean_per_token_latency"],
        "fcfs_over_ltr_paper_rule_per_token_latency": by[(top, "fcfs")]["mean_per_token_latency"]
        / by[(top, "ltr-paper-rule")]["mean_per_token_latency"],
        "ltr_over_fcfs_p99_latency": by[(top, "ltr")]["p99_latency"] / by[(top, "fcfs")]["p99_latency"],
        "ltr_over_fcfs_throughput": by[(top, "ltr")]["throughput_tok_s"] / by[(top, "fcfs")]["throughput_tok_s"],
        "fcfs_over_priority_per_token_latency": by[(top, "fcfs")]["mean_per_token_latency"]
        / by[(top, "priority")]["mean_per_token_latency"],
        "fcfs_over_gittins_per_token_latency": by[(top, "fcfs")]["mean_per_token_latency"]
        / by[(top, "gittins")]["mean_per_token_latency"],
        "synthetic_ltr_over_fcfs_at_5pct_budget": report["sections"]["synthetic"][0]["ltr_over_fcfs"],
        "synthetic_ltr_over_fcfs_at_10pct_budget": report["sections"]["synthetic"][1]["ltr_over_fcfs"],
        "paper": PAPER,
    }
    report.update({
        "command": "python " + shlex.join([sys.argv[0].split("/work/main/")[-1], *sys.argv[1:]]),
        "machine": f"simulated {PROFILE.name}; simulator ran on {platform.machine()}, {os.cpu_count()} CPU cores "
                   "shared with other jobs",
        "profile": PROFILE.to_json(), "requests_per_run": n, "score_source": wl.source,
        "tau_realized": wl.tau, "max_model_len": MAX_MODEL_LEN, "wall_s": time.time() - started,
        "notes": ("trace = ShareGPT test split (first-turn pairs, SmolLM2-token lengths) with prompt+output "
                  f"<= {MAX_MODEL_LEN}, sampled per run; Poisson arrivals; every run finishes all requests, so "
                  "at overload the latency numbers grow with the trace length"),
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(report, out.with_suffix(".png"))
    print(json.dumps(report["headline"], indent=2))
    print(out)
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["sections"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    ax = axes[0, 0]
    for label in dict.fromkeys(r["policy"] for r in s["rates"]):
        pts = [(r["rate"], r["mean_per_token_latency"]) for r in s["rates"] if r["policy"] == label]
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="request rate (req/s)", ylabel="mean per-token latency (s/token)",
           title="Policies vs load (1 replica)")
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    for key in dict.fromkeys((r["rate"], r["variant"]) for r in s["tau"]):
        pts = [(r["tau_realized"], r["gain"]) for r in s["tau"] if (r["rate"], r["variant"]) == key]
        ax.plot(*zip(*pts), marker="o", label=f"{key[1]}, {key[0]:g} req/s")
    ax.axhline(PAPER["chatbot_per_token_latency_gain"], ls="--", c="gray", label="paper 2.8x")
    ax.axhline(1.0, ls=":", c="k")
    ax.set(xlabel="predictor Kendall tau", ylabel="FCFS / LTR mean per-token latency", title="Gain vs predictor tau")
    ax.legend(fontsize=7)

    ax = axes[0, 2]
    sweep = [r for r in s["starvation"] if r["quantum"] is not None and "aged_share" not in r]
    for key in dict.fromkeys((r["rule"], r["quantum"]) for r in sweep):
        pts = [(r["mean_per_token_latency"], r["p99_latency"], r["threshold"]) for r in sweep
               if (r["rule"], r["quantum"]) == key]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} rule, quantum {key[1]}")
        for x, y, th in pts:
            ax.annotate(str(th), (x, y), fontsize=6)
    shares = [r for r in s["starvation"] if "aged_share" in r]
    if shares:
        ax.plot([r["mean_per_token_latency"] for r in shares], [r["p99_latency"] for r in shares], marker="s",
                ls=":", label="ours, aged_share sweep")
        for r in shares:
            ax.annotate(f"share {r['aged_share']}", (r["mean_per_token_latency"], r["p99_latency"]), fontsize=6)
    off = [r for r in s["starvation"] if r["quantum"] is None]
    if off:
        ax.scatter([off[0]["mean_per_token_latency"]], [off[0]["p99_latency"]], marker="x", c="r", label="no starvation")
    ax.set(xlabel="mean per-token latency (s/token)", ylabel="p99 latency (s)",
           title=f"Starvation threshold/quantum ({s['starvation'][0]['rate']:g} req/s)")
    ax.legend(fontsize=7)

    ax = axes[1, 0]
    for key in dict.fromkeys((r["policy"], r["router"]) for r in s["replicas"]):
        pts = [(r["replicas"], r["mean_per_token_latency"]) for r in s["replicas"]
               if (r["policy"], r["router"]) == key]
        ax.plot(*zip(*pts), marker="o", label=f"{key[0]} / {key[1]}")
    ax.set(xscale="log", yscale="log", xlabel="replicas (24 req/s each)", ylabel="mean per-token latency (s/token)",
           title="Replicas and routers")
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    labels = list(s["synthetic"][0]["completed"])
    for label in labels:
        ax.plot([r["budget_s"] for r in s["synthetic"]], [r["completed"][label] for r in s["synthetic"]],
                marker="o", label=label)
    ax.set(xlabel="time budget (s)", ylabel="requests completed", title="Synthetic data generation (one burst)")
    ax.legend(fontsize=7)

    ax = axes[1, 2]
    ax.axis("off")
    h = report["headline"]
    ax.text(0, 1, "\n".join([
        f"profile: {report['profile']['name']}",
        f"scores: {report['score_source']} (realized tau {report['tau_realized']:.3f})",
        f"at {h['rate']} req/s: FCFS/LTR per-token latency {h['fcfs_over_ltr_per_token_latency']:.2f}x "
        f"(paper {PAPER['chatbot_per_token_latency_gain']}x)",
        f"FCFS/oracle {h['fcfs_over_oracle_per_token_latency']:.2f}x, LTR/oracle {h['ltr_over_oracle_per_token_latency']:.2f}x",
        f"FCFS/LTR without rank preemption {h['fcfs_over_ltr_no_rank_preempt_per_token_latency']:.2f}x, "
        f"with the paper's aging rule {h['fcfs_over_ltr_paper_rule_per_token_latency']:.2f}x",
        f"LTR/FCFS p99 latency {h['ltr_over_fcfs_p99_latency']:.2f}x, throughput {h['ltr_over_fcfs_throughput']:.2f}x",
        f"synthetic, 5% / 10% budget: LTR/FCFS completions {h['synthetic_ltr_over_fcfs_at_5pct_budget']:.2f}x / "
        f"{h['synthetic_ltr_over_fcfs_at_10pct_budget']:.2f}x "
        f"(paper {PAPER['synthetic_throughput_gain']}x)",
        f"command: {report['command']}",
    ]), va="top", fontsize=8, family="monospace", wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
