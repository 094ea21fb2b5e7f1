"""Scheduling that corrects its own mispredictions (issue 14), in the simulator at paper scale.

The `sim_study.py` workload (ShareGPT test split, derived A100 / Llama-3-8B profile, one replica, 1,000
requests, Poisson arrivals at 64 req/s, shipped predictor scores), over many arrival seeds. Sections:

  seeds      FCFS, vLLM priority, MLFQ, static LTR, the paper's rule, the Gittins policy (default), oracle
             SJF: FCFS / policy mean per-token latency per seed, mean and 95% t-interval; tails, throughput.
  diagnosis  where MLFQ's edge over static LTR comes from: queueing delay (TTFT) and per-token latency of
             short requests, preemptions, recompute, batch composition; ablations of the Gittins policy
             (no prefill term, mean-latency reward) and of MLFQ (no skip-join).
  tau        noise-model scores at a target Kendall tau (length distribution fit on the validation split
             scored by the same noise model): static LTR vs Gittins vs oracle.
  frontier   starvation threshold per policy: mean per-token latency against long-request p99 and TTFT p99.
  aged_share the other starvation knob at the default threshold: the share of seats aged requests may hold.

    python benchmarks/sim_gittins.py                   # everything (~30 min on 2 busy cores)
    python benchmarks/sim_gittins.py --seeds 3 --sections seeds --out /tmp/x.json   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_study import MAX_MODEL_LEN, PROFILE, RESULTS, Variant, Workload  # noqa: E402

from ltr.scheduling.policy import PAPER_RULE, PolicyConfig, StarvationConfig  # noqa: E402
from ltr.sim import ClusterConfig, simulate  # noqa: E402

RATE = 64.0
N = 1000
SECTIONS = ("seeds", "diagnosis", "tau", "frontier", "aged_share")
AGED_SHARES = (0.05, 0.1, 0.15, 0.25, 0.5)
GITTINS = PolicyConfig()


def main_variants() -> list[Variant]:
    return [
        Variant("fcfs", PolicyConfig(name="fcfs"), "none"),
        Variant("priority", PolicyConfig(name="priority"), "pred"),
        Variant("mlfq", PolicyConfig(name="mlfq", starvation=None), "none"),
        Variant("ltr", PolicyConfig(name="ltr"), "pred"),
        Variant("ltr-paper-rule", PAPER_RULE, "pred"),
        Variant("gittins", GITTINS, "pred"),
        Variant("oracle-sjf", PolicyConfig(name="ltr", starvation=None), "oracle"),
    ]


def ablations() -> list[Variant]:
    return [
        Variant("gittins-no-prefill-term", replace(GITTINS, gittins_prefill_weight=0.0), "pred"),
        Variant("gittins-latency-reward", replace(GITTINS, gittins_per_token=False), "pred"),
        Variant("gittins-threshold-200", replace(GITTINS, starvation=StarvationConfig(threshold=200)), "pred"),
        Variant("mlfq-no-skip-join", PolicyConfig(name="mlfq", starvation=None, mlfq_skip_join=False), "none"),
    ]


def _starvation_sweep(knob: str, settings: list[tuple[str, StarvationConfig | None]]) -> list[Variant]:
    """Gittins, static LTR and MLFQ under each starvation setting, labelled `<family>-<knob><tag>`."""
    out = []
    for tag, starvation in settings:
        out += [Variant(f"gittins-{knob}{tag}", replace(GITTINS, starvation=starvation), "pred"),
                Variant(f"ltr-{knob}{tag}", PolicyConfig(name="ltr", starvation=starvation), "pred"),
                Variant(f"mlfq-{knob}{tag}", PolicyConfig(name="mlfq", starvation=starvation), "none")]
    return out


def frontier_variants() -> list[Variant]:
    return _starvation_sweep("t", [("off" if th is None else str(th),
                                    None if th is None else StarvationConfig(threshold=th))
                                   for th in (100, 200, 400, 800, None)])


def aged_share_variants() -> list[Variant]:
    """Each policy at the default threshold, with at most `aged_share` of the seats held by aged requests."""
    return _starvation_sweep("a", [(f"{share:g}", StarvationConfig(aged_share=share)) for share in AGED_SHARES])


_WORKLOADS: dict[tuple[float, bool], Workload] = {}


def _workload(tau: float | None) -> Workload:
    key = (tau or 0.0, tau is None)
    if key not in _WORKLOADS:
        _WORKLOADS[key] = Workload(tau or 0.5, 0, use_predictor=tau is None)
    return _WORKLOADS[key]


def measure(job: tuple[str, Variant, int, float | None]) -> dict:
    """One run; `tau` None = shipped predictor scores, else noise-model scores at that tau."""
    section, variant, seed, tau = job
    wl = _workload(tau)
    policy = variant.policy
    if policy.name == "gittins" and wl.distribution is not None:
        policy = replace(policy, length_distribution=wl.distribution)
    requests = wl.sample(N, RATE, seed, variant.scores)
    res = simulate(requests, PROFILE, ClusterConfig(1, "least_work", policy), seed=seed, record_shapes=True)
    recs = res.records
    out = np.array([r.output_len for r in recs])
    ptl = np.array([r.per_token_latency for r in recs])
    ttft = np.array([r.ttft for r in recs])
    lat = np.array([r.latency for r in recs])
    p50, p90 = np.percentile(wl.output, [50, 90])
    short, long = out < p50, out >= p90
    medium = ~short & ~long
    pre = np.array([r.preemptions for r in recs])
    shapes = res.shapes
    durations = np.array([PROFILE.step.step_time(s.prefill_tokens, s.decode_seqs, s.kv_tokens) for s in shapes])
    prefill = np.array([s.prefill_tokens for s in shapes])
    prompt_tokens = sum(r.prompt_len for r in recs)
    return {
        "section": section, "policy": variant.label, "seed": seed, "tau": tau,
        "mean_per_token_latency": float(ptl.mean()),
        "short_mean_per_token_latency": float(ptl[short].mean()),
        "medium_mean_per_token_latency": float(ptl[medium].mean()),
        "long_mean_per_token_latency": float(ptl[long].mean()),
        "short_share_of_per_token_sum": float(ptl[short].sum() / ptl.sum()),
        "mean_ttft": float(ttft.mean()), "short_mean_ttft": float(ttft[short].mean()),
        "medium_mean_ttft": float(ttft[medium].mean()),
        "long_mean_ttft": float(ttft[long].mean()), "p99_ttft": float(np.percentile(ttft, 99)),
        "long_p99_latency": float(np.percentile(lat[long], 99)), "p99_latency": float(np.percentile(lat, 99)),
        "throughput_tok_s": float(out.sum() / res.makespan), "makespan": res.makespan,
        "rank_preemptions": res.rank_preemptions, "kv_preemptions": res.kv_preemptions,
        "promotions": res.promotions,
        "short_preempted_share": float((pre[short] > 0).mean()), "long_preempted_share": float((pre[long] > 0).mean()),
        # Prefill tokens beyond each prompt once: recompute after eviction (net of prefix-cache reuse).
        "recompute_tokens": int(prefill.sum() - prompt_tokens),
        "steps": len(shapes), "mean_step_s": float(durations.mean()),
        "mean_seqs_per_step": float(np.mean([s.num_seqs for s in shapes])),
        "mean_prefill_tokens_per_step": float(prefill.mean()),
        "prefill_share_of_step_time": float(PROFILE.step.b * prefill.sum() / durations.sum()),
        "max_idle_steps": int(max(r.max_idle_steps for r in recs)),
    }


def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval over seeds."""
    a = np.asarray(values, dtype=float)
    half = float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")
    return {"mean": float(a.mean()), "lo": float(a.mean() - half), "hi": float(a.mean() + half),
            "min": float(a.min()), "max": float(a.max()), "n": len(a)}


def summarize(rows: list[dict]) -> dict:
    """Per policy: FCFS / policy gain per seed (same seed, same scores) and every metric's interval."""
    fcfs = {(r["seed"], r["tau"]): r["mean_per_token_latency"] for r in rows if r["policy"] == "fcfs"}
    out = {}
    for label in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == label]
        gains = [fcfs[(r["seed"], r["tau"])] / r["mean_per_token_latency"] for r in mine if (r["seed"], r["tau"]) in fcfs]
        metrics = {k: interval([r[k] for r in mine]) for k in mine[0]
                   if isinstance(mine[0][k], (int, float)) and k not in ("seed", "tau")}
        out[label] = {"gain_over_fcfs": interval(gains) if gains else None,
                      "gain_per_seed": gains, **metrics}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10, help="arrival seeds for the seeds/diagnosis sections")
    ap.add_argument("--aside-seeds", type=int, default=3,
                    help="arrival seeds for the ablations and the tau and frontier sections")
    ap.add_argument("--frontier-seeds", type=int, default=None,
                    help="arrival seeds for the frontier and aged_share sections (default: --aside-seeds)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--taus", type=float, nargs="+", default=[0.3, 0.45, 0.6, 0.75, 0.9])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "sim_gittins.json")
    args = ap.parse_args()
    started = time.time()
    jobs: list[tuple[str, Variant, int, float | None]] = []
    fcfs = main_variants()[0]
    if "seeds" in args.sections or "diagnosis" in args.sections:
        jobs += [("seeds", v, s, None) for v in main_variants() for s in range(args.seeds)]
    aside = range(args.aside_seeds)
    if "diagnosis" in args.sections:
        jobs += [("diagnosis", v, s, None) for v in ablations() for s in aside]
    if "tau" in args.sections:
        tau_variants = [fcfs, *(v for v in main_variants() if v.label in ("ltr", "gittins", "oracle-sjf"))]
        jobs += [("tau", v, s, tau) for tau in args.taus for v in tau_variants for s in aside]
    frontier_seeds = range(args.frontier_seeds or args.aside_seeds)
    if "frontier" in args.sections:
        jobs += [("frontier", v, s, None) for v in [fcfs, *frontier_variants()] for s in frontier_seeds]
    if "aged_share" in args.sections:
        jobs += [("aged_share", v, s, None) for v in [fcfs, *aged_share_variants()] for s in frontier_seeds]
    with Pool(args.workers) as pool:
        rows = []
        for row in pool.imap_unordered(measure, jobs):
            rows.append(row)
            print(f"{len(rows)}/{len(jobs)} {row['section']} {row['policy']} seed {row['seed']} tau {row['tau']}: "
                  f"{row['mean_per_token_latency']:.4f} s/tok", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: (SECTIONS.index(r["section"]), r["policy"], r["tau"] or 0, r["seed"]))
    report: dict = {"sections": {}}
    main_rows = [r for r in rows if r["section"] == "seeds"]
    if main_rows:
        summary = summarize(main_rows)
        report["sections"]["seeds"] = {"summary": summary, "rows": main_rows}
        g = summary["gittins"]["gain_per_seed"]
        best_other = [max(summary[p]["gain_per_seed"][i] for p in ("mlfq", "priority", "ltr")) for i in range(len(g))]
        oracle = summary["oracle-sjf"]["gain_over_fcfs"]["mean"]
        report["targets"] = {
            "gittins_gain": summary["gittins"]["gain_over_fcfs"],
            "gittins_at_least_2.6x": summary["gittins"]["gain_over_fcfs"]["mean"] >= 2.6,
            "gittins_above_mlfq_priority_ltr_every_seed": all(a > b for a, b in zip(g, best_other)),
            "seeds_won": int(sum(a > b for a, b in zip(g, best_other))),
            "share_of_oracle_gain": summary["gittins"]["gain_over_fcfs"]["mean"] / oracle,
            "share_of_oracle_gain_above_1x": (summary["gittins"]["gain_over_fcfs"]["mean"] - 1) / (oracle - 1),
        }
    if "diagnosis" in args.sections:
        diag_rows = [r for r in rows if r["section"] == "diagnosis"]
        report["sections"]["diagnosis"] = {"summary": summarize(main_rows + diag_rows), "rows": diag_rows}
    for name in ("tau", "frontier", "aged_share"):
        sec = [r for r in rows if r["section"] == name]
        if sec:
            report["sections"][name] = {"summary": {f"{tau}": summarize([r for r in sec if r["tau"] == tau])
                                                    for tau in dict.fromkeys(r["tau"] for r in sec)}
                                        if name == "tau" else summarize(sec), "rows": sec}
    report.update({
        "command": "python " + shlex.join([sys.argv[0].split("/work/main/")[-1], *sys.argv[1:]]),
        "machine": f"simulated {PROFILE.name}; simulator ran on {platform.machine()}, {os.cpu_count()} CPU cores "
                   "shared with other jobs",
        "profile": PROFILE.to_json(), "rate": RATE, "requests_per_run": N, "max_model_len": MAX_MODEL_LEN,
        "score_source": _workload(None).source, "tau_realized": _workload(None).tau,
        "gittins_config": GITTINS.to_mapping(), "wall_s": time.time() - started,
        "notes": ("gain = FCFS / policy mean per-token latency on the same seed; intervals are 95% t-intervals "
                  "over seeds; short = output below the test split's median, long = at or above its p90, medium "
                  "between"),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report.get("targets", {}), indent=1))
    print(args.out)
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["sections"]
    fig, axes = plt.subplots(2, 2, figsize=(15, 11))
    axes = axes.ravel()
    ax = axes[0]
    if "seeds" in s:
        summary = s["seeds"]["summary"]
        labels = [label for label in summary if label != "fcfs"]
        means = [summary[label]["gain_over_fcfs"]["mean"] for label in labels]
        errs = [[m - summary[label]["gain_over_fcfs"]["lo"] for m, label in zip(means, labels)],
                [summary[label]["gain_over_fcfs"]["hi"] - m for m, label in zip(means, labels)]]
        ax.bar(labels, means, yerr=errs, capsize=4, color=["tab:red" if label == "gittins" else "tab:blue"
                                                            for label in labels])
        for i, label in enumerate(labels):
            ax.scatter([i] * len(summary[label]["gain_per_seed"]), summary[label]["gain_per_seed"], s=8, c="k")
        ax.axhline(2.6, ls="--", c="gray", label="target 2.6x")
        ax.set(ylabel="FCFS / policy mean per-token latency",
               title=f"{report['rate']:g} req/s, {summary['fcfs']['mean_per_token_latency']['n']} seeds (95% CI)")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=8)
    ax = axes[1]
    if "tau" not in s:
        ax.axis("off")
    else:
        for label in ("ltr", "gittins", "oracle-sjf"):
            pts = sorted((float(t), v[label]["gain_over_fcfs"]["mean"]) for t, v in s["tau"]["summary"].items()
                         if label in v)
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xlabel="noise-model target Kendall tau", ylabel="FCFS / policy mean per-token latency",
               title="Gain vs predictor quality")
        ax.legend(fontsize=8)
    for ax, name, tag, knob in ((axes[2], "frontier", "-t", "starvation threshold"),
                                (axes[3], "aged_share", "-a", "aged share of the seats")):
        if name not in s:
            ax.axis("off")
            continue
        summary = s[name]["summary"]
        for family in ("gittins", "ltr", "mlfq"):
            pts = [(summary[k]["mean_per_token_latency"]["mean"], summary[k]["long_p99_latency"]["mean"],
                    k.split(tag)[-1]) for k in summary if k.startswith(family + tag)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=family)
            for x, y, label in pts:
                ax.annotate(label, (x, y), fontsize=7)
        f = summary["fcfs"]
        ax.scatter([f["mean_per_token_latency"]["mean"]], [f["long_p99_latency"]["mean"]], marker="x", c="k",
                   label="fcfs")
        ax.set(xlabel="mean per-token latency (s/token)", ylabel="long-request p99 latency (s)",
               title=f"Mean against tail over the {knob} (labels)")
        ax.legend(fontsize=8)
    fig.suptitle(report["command"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
