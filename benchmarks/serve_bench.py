"""End-to-end serving benchmark over HTTP: scheduler policies, routers, and the HTTP+router overhead.

    python benchmarks/serve_bench.py [--num-requests 60 --rate 1.0 --max-tokens 128 ...]

Replays a Poisson-arrival trace of ShareGPT test-split prompts (output length = the real answer's length
÷ --length-scale, capped at --max-tokens, reproduced exactly with `ignore_eos`) against the running Serve
app, once per configuration, all on the same trace:

- `ltr+least_work`: rank scheduler in the engines, least-predicted-work router (the project's design);
- `fcfs+least_work`: vLLM's FCFS scheduler, same router — the scheduler's gain end to end;
- `ltr+pow2`: rank scheduler, Ray Serve's default power-of-two-choices router — the router's gain.

Then the HTTP+router overhead at low load: the first trace requests one at a time through HTTP versus a bare
`AsyncLLM` in this process. Scores come from the predictor application when its artifact is loaded,
else (or with --scores oracle) from the true lengths via the ingress's score-override headers
(recorded in the output). Results: benchmarks/results/serve_bench.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shlex
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# One engine thread per replica: the replicas are then independent 1-core servers on this machine.
# Ray already gives fractional-CPU replicas OMP_NUM_THREADS=1; the direct AsyncLLM baseline needs the
# same, or its OpenMP threads spin against each other on an oversubscribed box (20x slower steps).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [("ltr", "least_work"), ("fcfs", "least_work"), ("ltr", "pow2")]


@dataclass
class TraceRequest:
    conv_id: str
    prompt: str
    prompt_len: int
    output_len: int
    arrival: float


@dataclass
class Result:
    conv_id: str
    output_len: int
    latency: float
    ttft: float
    replica: str
    fallback: str | None
    ok: bool
    error: str | None = None


def build_trace(num: int, rate: float, max_tokens: int, max_prompt_tokens: int, seed: int,
                length_scale: float, min_prompt_tokens: int = 1) -> list[TraceRequest]:
    """ShareGPT test-split prompts, answer lengths ÷ `length_scale` capped at `max_tokens`, Poisson arrivals.

    Scaling keeps the lengths' order; a plain cap would make most requests the same length (ties), and
    there would be nothing for a length ranking to do.
    """
    from ltr.data import load_pairs, split_pairs

    test = [p for p in split_pairs(load_pairs()).test if max(1, min_prompt_tokens) <= p.prompt_len <= max_prompt_tokens]
    rng = random.Random(seed)
    chosen = rng.sample(test, k=min(num, len(test)))
    arrival, trace = 0.0, []
    for pair in chosen:
        arrival += rng.expovariate(rate)
        trace.append(TraceRequest(pair.conv_id, pair.prompt, pair.prompt_len,
                                  max(1, min(round(pair.output_len / length_scale), max_tokens)), arrival))
    return trace


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    lat = sorted(r.latency for r in ok)
    ttft = sorted(r.ttft for r in ok)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(math.ceil(q * len(values))) - 1)] if values else float("nan")

    replicas: dict[str, int] = {}
    for r in ok:
        replicas[r.replica] = replicas.get(r.replica, 0) + 1
    fallbacks: dict[str, int] = {}
    for r in ok:
        key = r.fallback or "none"
        fallbacks[key] = fallbacks.get(key, 0) + 1
    return {
        "requests": len(results), "succeeded": len(ok), "failed": len(results) - len(ok),
        "mean_latency_s": statistics.fmean(lat) if lat else float("nan"), "p90_latency_s": pct(lat, 0.9),
        "mean_ttft_s": statistics.fmean(ttft) if ttft else float("nan"), "p90_ttft_s": pct(ttft, 0.9),
        "mean_latency_per_token_s": statistics.fmean(r.latency / r.output_len for r in ok) if ok else float("nan"),
        "wall_s": wall, "output_tokens": sum(r.output_len for r in ok),
        "requests_per_replica": replicas, "predictor_fallbacks": fallbacks,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


async def one_request(http, model: str, req: TraceRequest, oracle: bool, start: float) -> Result:
    delay = start + req.arrival - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    headers = {}
    if oracle:
        headers = {"x-ltr-score-override": repr(math.log(req.output_len)),
                   "x-ltr-expected-tokens-override": str(req.output_len)}
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "ignore_eos": True,
            "temperature": 0, "stream": True}
    sent = time.perf_counter()
    ttft = None
    try:
        async with http.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Result(req.conv_id, req.output_len, 0.0, 0.0, "", None, False, f"{response.status_code}: {text[:120]}")
            async for line in response.aiter_lines():
                if ttft is None and line.startswith("data: {"):
                    ttft = time.perf_counter() - sent
            return Result(req.conv_id, req.output_len, time.perf_counter() - sent, ttft or 0.0,
                          response.headers.get("x-ltr-replica", ""), response.headers.get("x-ltr-fallback"), True)
    except Exception as exc:  # noqa: BLE001 - a benchmark records failures, it does not stop on them
        return Result(req.conv_id, req.output_len, 0.0, 0.0, "", None, False, f"{type(exc).__name__}: {exc}")


async def replay(url: str, model: str, trace: list[TraceRequest], oracle: bool) -> tuple[list[Result], float]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=httpx.Limits(
            max_connections=1000, max_keepalive_connections=100)) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*[one_request(http, model, r, oracle, start) for r in trace])
        return list(results), time.perf_counter() - start


async def overhead_pairs(url: str, model: str, model_path: str, requests: list[TraceRequest],
                         engine_kwargs: dict) -> tuple[list[float], list[float]]:
    """Each prompt through HTTP (whole Serve path, idle replicas) and on a bare in-process AsyncLLM
    (same engine settings, rank scheduler, no score), alternating so both see the same machine load."""
    import httpx
    from transformers import AutoTokenizer
    from vllm.v1.engine.async_llm import AsyncLLM

    from deployments.engine import engine_config
    from ltr.scheduling.engine import engine_args, scored_sampling_params
    from ltr.scheduling.policy import PolicyConfig

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = engine_config(engine_args(model_path, PolicyConfig(name="ltr"), **engine_kwargs),
                           worker_in_engine_core=True)   # where the service's CPU engines run their model
    llm = AsyncLLM.from_vllm_config(config, disable_log_stats=True)
    http_lat, direct_lat = [], []
    try:
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            for i, (prompt, max_tokens) in enumerate([("Warm up.", 8)] + [(r.prompt, r.output_len) for r in requests]):
                t0 = time.perf_counter()
                r = await http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                              "ignore_eos": True, "temperature": 0})
                r.raise_for_status()
                t1 = time.perf_counter()
                params = scored_sampling_params(None, max_tokens=max_tokens, ignore_eos=True, temperature=0)
                async for _ in llm.generate({"prompt_token_ids": tokenizer(prompt).input_ids}, params, f"direct-{i}"):
                    pass
                t2 = time.perf_counter()
                if i > 0:
                    http_lat.append(t1 - t0)
                    direct_lat.append(t2 - t1)
        return http_lat, direct_lat
    finally:
        llm.shutdown()


async def engine_stats(url: str) -> dict[str, dict]:
    """Each engine replica's scheduler counters (the ingress sweeps every replica in one call)."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        reply = await http.get("/v1/ltr/engine_stats")
    reply.raise_for_status()
    return {replica: {"counters": stats["counters"], "scheduler": stats["scheduler"]}
            for replica, stats in reply.json()["replicas"].items()}


async def sequential(url: str, model: str, prompts: list[str], max_tokens: int) -> list[float]:
    import httpx

    out = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        for prompt in prompts:
            t0 = time.perf_counter()
            r = await http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                          "ignore_eos": True, "temperature": 0})
            r.raise_for_status()
            out.append(time.perf_counter() - t0)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["configs"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (metric, label) in zip(axes[:2], [("latency", "request latency (s)"), ("ttft", "time to first token (s)")]):
        means = [report["configs"][n][f"mean_{metric}_s"] for n in names]
        p90s = [report["configs"][n][f"p90_{metric}_s"] for n in names]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], means, width=0.4, label="mean")
        ax.bar([x + 0.2 for x in xs], p90s, width=0.4, label="p90")
        ax.set_xticks(list(xs), names, rotation=10)
        ax.set_ylabel(label)
        ax.legend()
    overhead = report["overhead"]
    axes[2].bar(["AsyncLLM direct", "HTTP + router + Serve"],
                [overhead["direct_mean_s"], overhead["http_mean_s"]], color=["gray", "tab:blue"])
    axes[2].set_ylabel("mean latency at low load (s)")
    axes[2].set_title(f"overhead {100 * overhead['overhead_fraction']:.1f}%")
    trace = report["trace"]
    fig.suptitle(f"serve_bench: {trace['num_requests']} ShareGPT test prompts, Poisson {trace['rate']}/s, "
                 f"{report['setup']['replicas']} replicas, scores: {report['setup']['score_source']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=60)
    parser.add_argument("--rate", type=float, default=1.6,
                        help="Poisson arrival rate (requests/s); 2 replicas saturate near 1.1")
    parser.add_argument("--max-tokens", type=int, default=128, help="cap on each request's output length")
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-num-seqs", type=int, default=4, help="engine batch size (small: queues form)")
    parser.add_argument("--model", default="smollm2", help="'smollm2' or an HF folder")
    parser.add_argument("--scores", choices=["auto", "predictor", "oracle"], default="auto")
    parser.add_argument("--overhead-requests", type=int, default=8)
    parser.add_argument("--length-scale", type=float, default=4.0,
                        help="output length = true answer length / scale, then capped at --max-tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="Serve HTTP port (0: a free one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_bench.json")
    parser.add_argument("--parts", choices=["all", "overhead"], default="all",
                        help="overhead: rerun only the low-load overhead part, updating an existing --out")
    args = parser.parse_args(argv)
    configs = CONFIGS if args.parts == "all" else CONFIGS[:1]
    started = time.perf_counter()

    import ray
    from ray import serve

    from deployments.app import build_app, build_predictor_app
    from ltr.models import prepare_model
    from ltr.predictor.model import shipped_artifact_dir

    model_path = str(prepare_model()) if args.model == "smollm2" else args.model
    model_name = Path(model_path).name
    trace = build_trace(args.num_requests, args.rate, args.max_tokens, args.max_prompt_tokens, args.seed,
                        args.length_scale)
    predictor_present = (shipped_artifact_dir() / "config.json").is_file()
    oracle = args.scores == "oracle" or (args.scores == "auto" and not predictor_present)
    if args.scores == "predictor" and not predictor_present:
        parser.error("--scores predictor: no shipped predictor artifact")
    engine_kwargs = {"max_num_seqs": args.max_num_seqs, "enforce_eager": True}   # CPU context default
    port = args.port
    if port == 0:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = " ".join(["python", "benchmarks/serve_bench.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    report: dict = {
        "command": " ".join(["python", "benchmarks/serve_bench.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_at_start": os.getloadavg(),
                    "note": "2-core CPU box shared with other jobs; compare configurations side by side only"},
        "setup": {"model": model_name, "replicas": args.replicas, "engine_num_cpus": 0.5, "engine_kwargs": engine_kwargs,
                  "score_source": "oracle (log true length)" if oracle else "predictor deployment",
                  "transport": "HTTP, streaming SSE, ignore_eos with trace lengths"},
        "trace": {"split": "ShareGPT test", "num_requests": len(trace), "rate": args.rate, "seed": args.seed,
                  "max_tokens": args.max_tokens, "length_scale": args.length_scale,
                  "max_prompt_tokens": args.max_prompt_tokens,
                  "mean_output_tokens": statistics.fmean(r.output_len for r in trace),
                  "duration_s": trace[-1].arrival},
        "configs": {},
    }
    temp_dir = tempfile.mkdtemp(prefix="ltr-serve-bench-")
    ray.init(address="local", _temp_dir=temp_dir, include_dashboard=False, num_cpus=2, logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        if not oracle:
            serve.run(build_predictor_app({"num_cpus": 0.25}), name="ltr-predictor", route_prefix=None)
        for policy, router in configs:
            name = f"{policy}+{router}"
            t0 = time.perf_counter()
            serve.run(build_app({
                "model": model_path, "policy": {"name": policy}, "router": router,
                "num_engine_replicas": args.replicas, "engine_num_cpus": 0.5, "engine_kwargs": engine_kwargs,
                "routing_stats_period_s": 0.5,
                "ingress": {"allow_score_override": oracle, "predictor_app": None if oracle else "ltr-predictor",
                            "predictor_timeout_s": 1.0, "max_tokens_cap": max(args.max_tokens, 64)},
            }), name="ltr", route_prefix="/")
            asyncio.run(sequential(url, model_name, ["Warm up.", "Warm up again."], 4))
            deploy_s = time.perf_counter() - t0
            if args.parts == "overhead":
                break
            results, wall = asyncio.run(replay(url, model_name, trace, oracle))
            summary = summarize(results, wall)
            summary["deploy_s"] = deploy_s
            summary["engines"] = asyncio.run(engine_stats(url))
            report["configs"][name] = summary
            print(f"{name}: mean {summary['mean_latency_s']:.2f}s p90 {summary['p90_latency_s']:.2f}s "
                  f"ttft {summary['mean_ttft_s']:.2f}s ok {summary['succeeded']}/{summary['requests']} "
                  f"per replica {summary['requests_per_replica']} ({wall:.0f}s)", flush=True)
        # Low load through the whole path, on the last deployed app (both replicas idle).
        sample = trace[:args.overhead_requests]
        http_lat, direct_lat = asyncio.run(overhead_pairs(url, model_name, model_path, sample, engine_kwargs))
    finally:
        serve.shutdown()
        ray.shutdown()
    http_mean, direct_mean = statistics.fmean(http_lat), statistics.fmean(direct_lat)
    report["overhead"] = {"requests": len(sample), "output_tokens": [r.output_len for r in sample],
                          "http_mean_s": http_mean, "direct_mean_s": direct_mean,
                          "overhead_fraction": (http_mean - direct_mean) / direct_mean,
                          "http_latencies_s": http_lat, "direct_latencies_s": direct_lat,
                          "note": "one request at a time, HTTP and direct alternating per prompt, each with its "
                                  "trace output length; direct = bare AsyncLLM in the benchmark process, same "
                                  "engine settings"}
    if args.parts == "overhead":
        previous = json.loads(args.out.read_text())
        previous["overhead"] = report["overhead"]
        previous["overhead"]["command"] = command
        previous["overhead"]["load_avg_at_end"] = os.getloadavg()
        report = previous
    c = report["configs"]
    ltr, fcfs, pow2 = c["ltr+least_work"], c["fcfs+least_work"], c["ltr+pow2"]
    report["ratios"] = {
        "fcfs_over_ltr_mean_latency": fcfs["mean_latency_s"] / ltr["mean_latency_s"],
        "fcfs_over_ltr_p90_latency": fcfs["p90_latency_s"] / ltr["p90_latency_s"],
        "fcfs_over_ltr_mean_ttft": fcfs["mean_ttft_s"] / ltr["mean_ttft_s"],
        "pow2_over_least_work_mean_latency": pow2["mean_latency_s"] / ltr["mean_latency_s"],
        "pow2_over_least_work_p90_latency": pow2["p90_latency_s"] / ltr["p90_latency_s"],
        "fcfs_over_ltr_mean_per_token_latency": fcfs["mean_latency_per_token_s"] / ltr["mean_latency_per_token_s"],
        "pow2_over_least_work_mean_per_token_latency": pow2["mean_latency_per_token_s"] / ltr["mean_latency_per_token_s"],
        "http_router_overhead_fraction": report["overhead"]["overhead_fraction"],
    }
    report["targets"] = {"overhead_le_10pct": report["ratios"]["http_router_overhead_fraction"] <= 0.10,
                         "least_work_ge_1.2x_over_default_router":
                             report["ratios"]["pow2_over_least_work_mean_latency"] >= 1.2}
    if args.parts == "all":
        report["machine"]["load_avg_at_end"] = os.getloadavg()
        report["total_wall_s"] = time.perf_counter() - started
    else:
        report["overhead"]["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report["ratios"], indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
