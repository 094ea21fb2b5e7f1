"""Scheduling policies side by side inside real vLLM V1 (SmolLM2-135M, CPU).

The same ShareGPT test-split requests (prompt text; the true answer length, scaled by
1/`--length-scale` and capped, as `max_tokens` with `ignore_eos`, so every policy generates exactly
the same work and relative lengths are kept) are replayed for every policy:

- load points: Poisson arrivals at each `--rates` value (requests/s) and a burst (all at t=0);
- policies: fcfs (vLLM default), priority (vLLM's policy="priority", score quantized to int), mlfq,
  ltr (predictor scores, static rank: aged requests keep their seat, capped aged share, preemption
  patience), ltr-paper (predictor scores, the paper's aging rule 200/10 with immediate rank preemption),
  ltr-nostarve (aging off), gittins (the project's default policy: the Gittins index over the shipped
  length distribution, scaled and capped as the trace's answers are), oracle (SJF: the true capped
  length as the score, aging off);
- synthetic data generation (`--sdg-requests`): a separate, larger burst with its own output cap,
  cut off at `--budget-s`; completions over time for fcfs / ltr / oracle.

Reported per policy and load: mean/p90 per-token latency (e2e latency / output tokens, as in the
paper), mean/p90/p99 e2e latency for short and long requests (split at the trace's median output
length), TTFT, output-token throughput, and (adapter policies) the scheduler's time per step vs the
model step. Writes benchmarks/results/scheduler_bench.json + .png with the command inside.

Engines run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and requests are injected at their
wall-clock arrival times between engine steps: on a shared 2-core machine the multiprocess engine
core busy-polls its worker and takes a core from the model. The four adapter policies share one
engine (`RankScheduler.set_policy` between runs); fcfs and priority each get vLLM's own scheduler.

    python benchmarks/scheduler_bench.py --num-requests 64 --rates 0.5 2 --output-cap 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ltr.scheduling.engine import (  # noqa: E402
    CPU_MAX_MODEL_LEN,
    engine_kwargs,
    platform_policy,
    priority_for,
    scored_sampling_params,
)
from ltr.scheduling.policy import PAPER_RULE, PolicyConfig, StarvationConfig  # noqa: E402
from ltr.sim.workload import poisson_arrivals  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("fcfs", "priority", "mlfq", "ltr", "ltr-paper", "ltr-nostarve", "gittins", "oracle")
SDG_POLICIES = ("fcfs", "ltr", "gittins", "oracle")
#: `gittins` at a `--gittins-prefill-weight` value runs as `gittins-pw<weight>`.
GITTINS_WEIGHT_LABEL = "gittins-pw"


@dataclass(frozen=True)
class BenchRequest:
    conv_id: str
    prompt: str
    prompt_len: int
    output_len: int  # scaled and capped; used as max_tokens with ignore_eos
    score: float | None  # the ranking score for ltr/priority (predictor or stand-in)


@dataclass
class Outcome:
    conv_id: str
    output_len: int
    arrival: float
    first_token: float
    finish: float
    tokens: int


def load_requests(n: int, output_cap: int, max_prompt: int, seed: int, scale: float) -> list[BenchRequest]:
    """A seeded sample of the test split (prompts up to `max_prompt` tokens), scores filled later."""
    from ltr.data import load_pairs, split_pairs

    test = [p for p in split_pairs(load_pairs()).test if p.prompt_len <= max_prompt and p.output_len > 0]
    rng = random.Random(seed)
    picked = rng.sample(test, n)
    return [BenchRequest(p.conv_id, p.prompt, p.prompt_len,
                         min(max(1, round(p.output_len / scale)), output_cap), None) for p in picked]


def score_requests(requests: list[BenchRequest], source: str, seed: int) -> tuple[list[BenchRequest], dict]:
    """Attach ranking scores: the shipped predictor, or a labelled noisy-oracle stand-in."""
    from ltr.predictor.evaluate import kendall_tau

    true = [r.output_len for r in requests]
    if source == "predictor":
        from ltr.predictor import load_shipped_predictor

        predictor = load_shipped_predictor()
        start = time.perf_counter()
        scores = [float(s) for s in predictor.score([r.prompt for r in requests])]
        info = {"source": "trained predictor (ltr/artifacts/predictor)",
                "scoring_s": time.perf_counter() - start}
    elif source == "noisy-oracle":
        rng = np.random.default_rng(seed)
        scores = [float(math.log1p(n) + rng.normal(0.0, 1.0)) for n in true]
        info = {"source": "STAND-IN: log(1+true length) + N(0, 1) noise, not the trained predictor"}
    else:
        raise ValueError(f"unknown score source {source!r}")
    info["kendall_tau_vs_true_capped_length"] = float(kendall_tau(scores, true))
    scored = [BenchRequest(r.conv_id, r.prompt, r.prompt_len, r.output_len, s) for r, s in zip(requests, scores)]
    return scored, info


def scaled_distribution(scale: float, cap: int) -> str:
    """The shipped length distribution for this trace's answers (cut to 1/scale, capped), as a JSON path."""
    from ltr.scheduling.length_distribution import load_distribution

    path = Path(tempfile.gettempdir()) / f"ltr-bench-length-distribution-scale{scale:g}-cap{cap}.json"
    path.write_text(json.dumps(load_distribution().scaled(scale, cap).to_mapping()))
    return str(path)


def expand_gittins_weights(names: list[str], weights: list[float] | None) -> list[str]:
    """`gittins` once per prefill weight (`gittins-pw<W>`) when weights are given."""
    if not weights:
        return names
    return [label for n in names for label in
            ([f"{GITTINS_WEIGHT_LABEL}{w:g}" for w in weights] if n == "gittins" else [n])]


def policy_setup(name: str, scores: list[float], aged_share: float | None = None,
                 patience: int | None = None, distribution: str | None = None) -> tuple[PolicyConfig, str]:
    """(PolicyConfig, which score each request carries) for a benchmark policy name.

    `aged_share` and `patience` override the default starvation share and preemption patience (`ltr` only);
    `distribution` is the Gittins policy's length distribution (None: the shipped one); `gittins-pw<W>` runs it
    at prefill weight W, plain `gittins` at the CPU default (`CPU_POLICY_DEFAULTS`).
    """
    if name == "fcfs":
        return PolicyConfig(name="fcfs"), "none"
    if name == "priority":
        # Spread the trace's scores over ~16 integer levels (vLLM priority is an int).
        lo, hi = np.percentile(scores, [5, 95])
        return PolicyConfig(name="priority", priority_levels_per_unit=float(16.0 / max(hi - lo, 1e-6))), "predicted"
    if name == "mlfq":
        return PolicyConfig(name="mlfq", starvation=None), "none"
    if name == "ltr":
        policy = PolicyConfig(name="ltr")
        if aged_share is not None:
            policy = replace(policy, starvation=StarvationConfig(aged_share=aged_share))
        if patience is not None:
            policy = replace(policy, preemption_patience=patience)
        return policy, "predicted"
    if name == "ltr-paper":
        return PAPER_RULE, "predicted"
    if name == "ltr-nostarve":
        return PolicyConfig(name="ltr", starvation=None), "predicted"
    if name.startswith("gittins"):
        # What a CPU deployment runs (these engines are CPU ones): the CPU prefill weight unless one is given.
        policy = platform_policy({"name": "gittins", "length_distribution": distribution}, "cpu")
        if name.startswith(GITTINS_WEIGHT_LABEL):
            policy = replace(policy, gittins_prefill_weight=float(name.removeprefix(GITTINS_WEIGHT_LABEL)))
        return policy, "predicted"
    if name == "oracle":
        return PolicyConfig(name="ltr", starvation=None), "true"
    raise ValueError(f"unknown policy {name!r}; choose from {POLICIES}")


def replay(llm: Any, requests: list[BenchRequest], offsets: list[float], policy: PolicyConfig,
           score_kind: str, tag: str, horizon: float | None = None) -> tuple[list[Outcome], float]:
    """Inject each request at its wall-clock offset between engine steps; time first token/finish.

    With `horizon` (seconds) the replay stops there: unfinished requests are aborted and left out.
    """
    engine = llm.llm_engine
    order = sorted(range(len(requests)), key=offsets.__getitem__)
    arrival: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    index: dict[str, int] = {}
    nxt = 0
    start = time.perf_counter()
    while len(done) < len(requests):
        now = time.perf_counter() - start
        if horizon is not None and now > horizon:
            engine.abort_request([r for r in arrival if r not in done])
            while engine.has_unfinished_requests():
                engine.step()
            break
        while nxt < len(order) and offsets[order[nxt]] <= now:
            i = order[nxt]
            req = requests[i]
            score = {"none": None, "predicted": req.score, "true": float(req.output_len)}[score_kind]
            params = scored_sampling_params(score, max_tokens=req.output_len, ignore_eos=True, temperature=0.0)
            rid = f"{tag}-{i}"
            engine.add_request(rid, req.prompt, params, priority=priority_for(policy, req.score))
            arrival[rid], index[rid] = time.perf_counter() - start, i
            nxt += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, offsets[order[nxt]] - (time.perf_counter() - start)))
            continue
        for out in engine.step():
            t = time.perf_counter() - start
            if out.outputs and out.outputs[0].token_ids:
                first.setdefault(out.request_id, t)
            if out.finished:
                done[out.request_id] = (t, len(out.outputs[0].token_ids))
    makespan = time.perf_counter() - start
    outcomes = [Outcome(requests[index[r]].conv_id, requests[index[r]].output_len, arrival[r],
                        first.get(r, done[r][0]), done[r][0], done[r][1]) for r in arrival if r in done]
    return outcomes, makespan


def summarize(outcomes: list[Outcome], makespan: float, split_len: int) -> dict:
    e2e = np.array([o.finish - o.arrival for o in outcomes])
    per_token = np.array([(o.finish - o.arrival) / max(o.tokens, 1) for o in outcomes])
    ttft = np.array([o.first_token - o.arrival for o in outcomes])
    short = np.array([o.output_len <= split_len for o in outcomes])

    def stats(values: np.ndarray) -> dict:
        if values.size == 0:
            return {}
        return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
                "p90": float(np.percentile(values, 90)), "p99": float(np.percentile(values, 99))}

    result = {
        "requests": len(outcomes),
        "incomplete": sum(o.tokens != o.output_len for o in outcomes),
        "output_tokens": int(sum(o.tokens for o in outcomes)),
        "makespan_s": makespan,
        "throughput_tok_s": sum(o.tokens for o in outcomes) / makespan,
        "per_token_latency_s": stats(per_token),
        "e2e_s": stats(e2e),
        "e2e_short_s": stats(e2e[short]),
        "e2e_long_s": stats(e2e[~short]),
        "ttft_s": stats(ttft),
    }
    return result


def run_sdg(llm: Any, name: str, policy: PolicyConfig, score_kind: str, sdg: list[BenchRequest],
            budget_s: float) -> dict:
    """Synthetic data generation: the whole `sdg` set at t=0, cut off at `budget_s`; completion times."""
    outcomes, _ = replay(llm, sdg, [0.0] * len(sdg), policy, score_kind, f"{name}-sdg", horizon=budget_s)
    finish = sorted(o.finish for o in outcomes if o.tokens == o.output_len)
    return {"requests": len(sdg), "budget_s": budget_s, "completion_times_s": finish,
            "completions_within_budget": sum(t <= budget_s for t in finish),
            "tokens_of_completed": int(sum(o.tokens for o in outcomes if o.tokens == o.output_len))}


def run_policies(names: list[str], requests: list[BenchRequest], loads: list[tuple[str, list[float]]],
                 args: argparse.Namespace, split_len: int, sdg: list[BenchRequest]) -> dict:
    """fcfs and priority on vLLM's scheduler; adapter policies on one shared RankScheduler engine."""
    from vllm import LLM

    scores = [r.score for r in requests if r.score is not None]
    distribution = (scaled_distribution(args.length_scale, args.output_cap)
                    if any(n.startswith("gittins") for n in names) else None)
    common = {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
              "enforce_eager": not args.compile, "disable_log_stats": True}
    groups = [[n] for n in names if n in ("fcfs", "priority")]
    adapter = [n for n in names if n not in ("fcfs", "priority")]
    if adapter:
        groups.append(adapter)
    results: dict = {}
    for group in groups:
        first_policy, _ = policy_setup(group[0], scores, args.aged_share, args.preemption_patience, distribution)
        t0 = time.perf_counter()
        llm = LLM(**engine_kwargs(args.model, first_policy, **common))
        startup = time.perf_counter() - t0
        print(f"[{'/'.join(group)}] engine started in {startup:.1f}s", flush=True)
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        for name in group:
            policy, score_kind = policy_setup(name, scores, args.aged_share, args.preemption_patience, distribution)
            if hasattr(scheduler, "set_policy"):
                scheduler.set_policy(policy)
            warm = [BenchRequest("warmup", "Hello", 1, 4, None)] * 2
            replay(llm, warm, [0.0, 0.0], policy, "none", f"{name}-warm")
            if hasattr(scheduler, "set_policy"):
                scheduler.set_policy(policy)  # counters from the measured loads only
            report: dict = {"policy": policy.to_mapping(), "score": score_kind,
                            "scheduler_cls": type(scheduler).__name__, "engine_start_s": startup, "loads": {}}
            for load_name, offsets in loads:
                outcomes, makespan = replay(llm, requests, offsets, policy, score_kind, f"{name}-{load_name}")
                report["loads"][load_name] = summarize(outcomes, makespan, split_len)
                pt = report["loads"][load_name]["per_token_latency_s"]["mean"]
                print(f"[{name}] {load_name}: mean per-token latency {pt:.3f}s, makespan {makespan:.1f}s",
                      flush=True)
            if hasattr(scheduler, "stats"):
                sched = scheduler.stats()
                if sched.get("model_ms_per_step"):
                    sched["adapter_overhead_fraction_of_model_step"] = (
                        sched["adapter_ms_per_step"] / sched["model_ms_per_step"])
                    sched["schedule_fraction_of_model_step"] = (
                        sched["schedule_ms_per_step"] / sched["model_ms_per_step"])
                report["scheduler"] = sched
            if sdg and name in SDG_POLICIES:
                if hasattr(scheduler, "set_policy"):
                    scheduler.set_policy(policy)   # the loads' counters are in report['scheduler']
                report["sdg"] = run_sdg(llm, name, policy, score_kind, sdg, args.budget_s)
                print(f"[{name}] sdg: {report['sdg']['completions_within_budget']} completions in "
                      f"{args.budget_s:g}s", flush=True)
            results[name] = report
        del llm, scheduler
        import gc

        gc.collect()
    return results


def targets(results: dict, rate_names: list[str]) -> dict:
    """The issue's targets, computed from the measured numbers (met or not)."""
    def ld(policy: str, load: str) -> dict:
        return results.get(policy, {}).get("loads", {}).get(load, {})

    heavy = rate_names[-1] if rate_names else "burst"
    out: dict = {}
    for load in [heavy, "burst"]:
        f, l, o = ld("fcfs", load), ld("ltr", load), ld("oracle", load)
        if not (f and l):
            continue
        ratio = f["per_token_latency_s"]["mean"] / l["per_token_latency_s"]["mean"]
        out[f"{load}: fcfs/ltr mean per-token latency (>= 3)"] = {"value": ratio, "met": ratio >= 3}
        if o:
            r = l["per_token_latency_s"]["mean"] / o["per_token_latency_s"]["mean"]
            out[f"{load}: ltr/oracle mean per-token latency (<= 1.2)"] = {"value": r, "met": r <= 1.2}
        if l["e2e_long_s"] and f["e2e_long_s"]:
            r = l["e2e_long_s"]["p99"] / f["e2e_long_s"]["p99"]
            out[f"{load}: ltr/fcfs long-request p99 e2e (<= 1.5)"] = {"value": r, "met": r <= 1.5}
        r = l["throughput_tok_s"] / f["throughput_tok_s"]
        out[f"{load}: ltr/fcfs throughput (>= 0.97)"] = {"value": r, "met": r >= 0.97}
    f, l = results.get("fcfs", {}).get("sdg"), results.get("ltr", {}).get("sdg")
    if f and l:
        budget = f["budget_s"]
        for share in (0.25, 0.5, 1.0):
            b = share * budget
            nf = sum(t <= b for t in f["completion_times_s"])
            nl = sum(t <= b for t in l["completion_times_s"])
            r = nl / max(nf, 1)
            out[f"synthetic data generation: ltr/fcfs completions within {b:g} s (>= 6.5)"] = {
                "value": r, "met": nf > 0 and r >= 6.5, "fcfs": nf, "ltr": nl}
    # Issue 14: the Gittins default as a ratio to each reference, (reference, metric, statistic, at most).
    gittins_checks = (("oracle", "per_token_latency_s", "mean", 1.2), ("priority", "per_token_latency_s", "mean", 1.0),
                      ("priority", "e2e_long_s", "p99", 1.0))
    for label, load in ((p, load) for p in results if p.startswith("gittins") for load in [heavy, "burst"]):
        f, g, o = ld("fcfs", load), ld(label, load), ld("oracle", load)
        if not (f and g):
            continue
        for other, metric, stat, limit in gittins_checks:
            ref = ld(other, load)
            if ref and ref[metric] and g[metric]:
                r = g[metric][stat] / ref[metric][stat]
                out[f"{load}: {label}/{other} {metric} {stat} (<= {limit:g})"] = {"value": r, "met": r <= limit}
        if o:
            gain, oracle_gain = (f["per_token_latency_s"]["mean"] / d["per_token_latency_s"]["mean"] for d in (g, o))
            out[f"{load}: fcfs/{label} mean per-token latency (>= 3 where oracle >= 3.6)"] = {
                "value": gain, "oracle": oracle_gain, "met": gain >= 3 or oracle_gain < 3.6}
        r = g["throughput_tok_s"] / f["throughput_tok_s"]
        out[f"{load}: {label}/fcfs throughput (>= 0.97)"] = {"value": r, "met": r >= 0.97}
    sched = results.get("ltr", {}).get("scheduler", {})
    if "adapter_overhead_fraction_of_model_step" in sched:
        r = sched["adapter_overhead_fraction_of_model_step"]
        out["ltr adapter time / model step time (<= 0.02)"] = {"value": r, "met": r <= 0.02}
    return out


def plot(results: dict, load_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    width = 0.8 / max(len(policies), 1)
    x = np.arange(len(load_names))
    for k, p in enumerate(policies):
        loads = results[p]["loads"]
        axes[0].bar(x + k * width, [loads[l]["per_token_latency_s"]["mean"] for l in load_names], width, label=p)
        axes[1].bar(x + k * width, [loads[l]["e2e_long_s"].get("p99", 0) for l in load_names], width, label=p)
    for ax, title in zip(axes[:2], ["mean per-token latency (s/token)", "long requests: p99 e2e latency (s)"]):
        ax.set_xticks(x + width * (len(policies) - 1) / 2, load_names)
        ax.set_title(title)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    for p in policies:
        sdg = results[p].get("sdg")
        if sdg:
            times = sdg["completion_times_s"]
            axes[2].step([0.0, *times], range(len(times) + 1), where="post", label=p)
    axes[2].set_title("synthetic data generation: completions over time")
    axes[2].set_xlabel("seconds since the burst")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(Path.home() / ".cache/ltr-serve/models/SmolLM2-135M-Instruct"))
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--length-scale", type=float, default=1.0,
                        help="max_tokens = round(true output length / scale), then capped")
    parser.add_argument("--output-cap", type=int, default=256, help="cap on max_tokens after scaling")
    parser.add_argument("--max-prompt", type=int, default=1024, help="skip test prompts longer than this")
    parser.add_argument("--rates", type=float, nargs="*", default=[0.5, 2.0], help="Poisson rates, req/s")
    parser.add_argument("--no-burst", action="store_true")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--scores", choices=["predictor", "noisy-oracle"], default="predictor")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=CPU_MAX_MODEL_LEN)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (minutes of warm-up per engine on a busy 2-core box)")
    parser.add_argument("--budget-s", type=float, default=30.0, help="synthetic-data-generation time budget")
    parser.add_argument("--sdg-requests", type=int, default=200,
                        help="synthetic data generation burst size (0 = skip); a separate test-split sample")
    parser.add_argument("--sdg-output-cap", type=int, default=256, help="max_tokens cap for the SDG burst")
    parser.add_argument("--sdg-length-scale", type=float, default=1.0)
    parser.add_argument("--aged-share", type=float, default=None,
                        help="the ltr policy's starvation aged_share (default: the PolicyConfig default)")
    parser.add_argument("--preemption-patience", type=int, default=None,
                        help="the ltr policy's preemption_patience (default: the PolicyConfig default)")
    parser.add_argument("--gittins-prefill-weight", type=float, nargs="+", default=None,
                        help="the gittins policy's prefill weight (default: the CPU engines' default, "
                             "CPU_POLICY_DEFAULTS); gittins runs once per value, as gittins-pw<W>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="scheduler_bench", help="results/<out>.json and .png")
    args = parser.parse_args()

    requests = load_requests(args.num_requests, args.output_cap, args.max_prompt, args.seed, args.length_scale)
    print(f"loaded {len(requests)} requests", flush=True)
    requests, score_info = score_requests(requests, args.scores, args.seed)
    print(f"scores: {score_info}", flush=True)
    sdg: list[BenchRequest] = []
    sdg_info: dict = {}
    if args.sdg_requests > 0:
        sdg = load_requests(args.sdg_requests, args.sdg_output_cap, args.max_prompt, args.seed + 1,
                            args.sdg_length_scale)
        sdg, sdg_info = score_requests(sdg, args.scores, args.seed + 1)
    split_len = int(np.median([r.output_len for r in requests]))
    rng = np.random.default_rng(args.seed)
    loads: list[tuple[str, list[float]]] = []
    for rate in args.rates:
        loads.append((f"poisson-{rate:g}", list(poisson_arrivals(len(requests), rate, rng))))
    if not args.no_burst:
        loads.append(("burst", [0.0] * len(requests)))

    wall = time.perf_counter()
    names = expand_gittins_weights(args.policies, args.gittins_prefill_weight)
    results = run_policies(names, requests, loads, args, split_len, sdg)

    from ltr.sim.calibrate import machine_description

    load_names = [n for n, _ in loads]
    report = {
        "command": " ".join(["python", "benchmarks/scheduler_bench.py", *sys.argv[1:]]),
        "parameters": vars(args),
        "machine": machine_description(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "wall_s": time.perf_counter() - wall,
        "trace": {"source": "ShareGPT test split (ltr.data split_pairs(load_pairs()).test)",
                  "requests": len(requests), "output_cap": args.output_cap,
                  "length_scale": args.length_scale,
                  "max_prompt_tokens": args.max_prompt,
                  "short_long_split_output_len": split_len,
                  "mean_output_len": float(np.mean([r.output_len for r in requests])),
                  "mean_prompt_len": float(np.mean([r.prompt_len for r in requests]))},
        "scores": score_info,
        "sdg_trace": {"requests": len(sdg), "output_cap": args.sdg_output_cap,
                      "length_scale": args.sdg_length_scale, "budget_s": args.budget_s,
                      "mean_output_len": float(np.mean([r.output_len for r in sdg])) if sdg else None,
                      "scores": sdg_info},
        "notes": ("Policies run one after another on a shared 2-core machine; other jobs' load adds noise "
                  "between policies. Per-token latency = e2e latency / output tokens. Synthetic data "
                  "generation = a separate burst of sdg_requests, cut off at budget_s. "
                  "Engines in-process, requests injected at wall-clock arrival times between steps; "
                  "model step time = wall time between the end of schedule() and update_from_output()."),
        "results": results,
        "targets": targets(results, [n for n in load_names if n.startswith("poisson")]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2))
    plot(results, load_names, RESULTS / f"{args.out}.png")
    print(json.dumps(report["targets"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
