"""Bounded load and fault harness for the Serve app (issue 6): loopback only, stops by itself.

    python benchmarks/fault_harness.py [--clients 200] [--load-s 20] [--disconnects 100] [--no-kill]

Starts a private local Ray + Serve (own temp dir, loopback port), the serving app with 2 engine
replicas of the tiny random Llama (or --model), then runs three phases and shuts everything down:

1. load: `--clients` concurrent closed-loop clients (half streaming) for `--load-s` seconds; every
   response is checked complete (all tokens, one finish reason, SSE ending in [DONE]) and unique;
   a request is *lost* when it gets no well-formed answer or error within `--request-timeout-s`.
2. disconnects: `--disconnects` streaming clients hang up after their first chunk; the engines must
   report no running/waiting requests and idle KV cache afterwards (engine debug stats).
3. kill: under streaming load, one engine replica's actor is killed (`ray.kill`); its in-flight
   clients must get a clear error (SSE error event or a 5xx error object), nothing may hang, the
   other replica's requests complete, Serve restarts the replica and traffic reaches the new one.

Writes benchmarks/results/fault_harness.json (+ .png) with counts, latency percentiles, the command
and the machine. Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
APP = "fault"


@dataclass
class Outcome:
    """One request as the client saw it."""

    index: int
    phase: str
    stream: bool
    sent: float
    done: float | None = None
    status: int | None = None
    #: ok | clear_error | lost (no well-formed answer or error in time) | aborted_by_client
    kind: str = "lost"
    request_id: str | None = None
    replica: str | None = None
    completion_tokens: int | None = None
    ttft: float | None = None
    error: str | None = None


@dataclass
class PhaseReport:
    name: str
    counts: dict[str, int] = field(default_factory=dict)
    latency_s: dict[str, float] = field(default_factory=dict)
    ttft_s: dict[str, float] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": round(ordered[-1], 4),
            "mean": round(sum(ordered) / len(ordered), 4)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine() -> dict[str, Any]:
    import psutil
    import ray
    import torch
    import vllm

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()], "ray": ray.__version__,
            "vllm": vllm.__version__, "torch": torch.__version__,
            "note": "shared 2-core CPU machine (other jobs running); no GPU"}


# ---- one request ---------------------------------------------------------------------------------------

async def request(http: httpx.AsyncClient, outcome: Outcome, max_tokens: int, timeout_s: float,
                  drop_after_first: bool = False) -> Outcome:
    """Send one completion and classify what came back (never raises)."""
    body = {"model": MODEL_NAME, "prompt": f"Request {outcome.phase} {outcome.index}: tell me",
            "max_tokens": max_tokens, "ignore_eos": True, "stream": outcome.stream}
    if outcome.stream:
        body["stream_options"] = {"include_usage": True}
    try:
        async with asyncio.timeout(timeout_s):
            if outcome.stream:
                await _stream(http, outcome, body, max_tokens, drop_after_first)
            else:
                response = await http.post("/v1/completions", json=body)
                outcome.status = response.status_code
                outcome.replica = response.headers.get("x-ltr-replica")
                _classify_json(outcome, response, max_tokens)
    except TimeoutError:
        outcome.kind, outcome.error = "lost", f"no answer within {timeout_s}s"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as exc:
        outcome.kind, outcome.error = "lost", f"{type(exc).__name__}: {exc}"[:200]
    outcome.done = time.monotonic()
    return outcome


def _classify_json(outcome: Outcome, response: httpx.Response, max_tokens: int) -> None:
    data = response.json()
    if response.status_code == 200:
        outcome.request_id = data["id"]
        outcome.completion_tokens = data["usage"]["completion_tokens"]
        complete = (outcome.completion_tokens == max_tokens and data["choices"][0]["finish_reason"] == "length")
        outcome.kind = "ok" if complete else "lost"
        if not complete:
            outcome.error = f"incomplete: {outcome.completion_tokens} tokens"
    elif isinstance(data.get("error"), dict) and {"message", "type", "param", "code"} <= set(data["error"]):
        outcome.kind, outcome.error = "clear_error", f"{response.status_code} {data['error']['code']}"
    else:
        outcome.kind, outcome.error = "lost", f"{response.status_code} without an error object"


async def _stream(http: httpx.AsyncClient, outcome: Outcome, body: dict, max_tokens: int,
                  drop_after_first: bool) -> None:
    async with http.stream("POST", "/v1/completions", json=body) as response:
        outcome.status = response.status_code
        outcome.replica = response.headers.get("x-ltr-replica")
        if response.status_code != 200:
            await response.aread()
            _classify_json(outcome, response, max_tokens)
            return
        finishes, ids, usage, done, error = [], set(), None, False, None
        async for line in response.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                error = event["error"]
                continue
            if outcome.ttft is None:
                outcome.ttft = time.monotonic() - outcome.sent
                if drop_after_first:
                    outcome.kind = "aborted_by_client"
                    return
            ids.add(event["id"])
            finishes += [c["finish_reason"] for c in event["choices"] if c["finish_reason"]]
            usage = event.get("usage", usage)
    outcome.request_id = next(iter(ids)) if len(ids) == 1 else None
    outcome.completion_tokens = usage["completion_tokens"] if usage else None
    if error is not None and done:
        outcome.kind, outcome.error = "clear_error", f"stream error {error.get('code')}"
    elif done and len(ids) == 1 and finishes == ["length"] and outcome.completion_tokens == max_tokens:
        outcome.kind = "ok"
    else:
        outcome.kind = "lost"
        outcome.error = f"malformed stream: done={done} ids={len(ids)} finishes={finishes} usage={usage}"


MODEL_NAME = "tiny-llama"


async def engine_stats(url: str) -> dict[str, dict]:
    """Debug stats of every engine replica (one sweep by the ingress); {} while the route errors."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        try:
            reply = await http.get("/v1/ltr/engine_stats")
        except httpx.HTTPError:
            return {}
    return reply.json()["replicas"] if reply.status_code == 200 else {}


def summarize(name: str, outcomes: list[Outcome]) -> PhaseReport:
    kinds = Counter(o.kind for o in outcomes)
    ids = Counter(o.request_id for o in outcomes if o.request_id)
    report = PhaseReport(name)
    report.counts = {"sent": len(outcomes), "succeeded": kinds["ok"], "failed_with_clear_error": kinds["clear_error"],
                     "aborted_by_client": kinds["aborted_by_client"], "lost": kinds["lost"],
                     "duplicated": sum(n - 1 for n in ids.values() if n > 1)}
    report.latency_s = percentiles([o.done - o.sent for o in outcomes if o.kind == "ok" and o.done])
    report.ttft_s = percentiles([o.ttft for o in outcomes if o.ttft is not None and o.kind == "ok"])
    errors = Counter(o.error for o in outcomes if o.error)
    report.details["errors"] = dict(errors.most_common(8))
    return report


# ---- phases --------------------------------------------------------------------------------------------

async def load_phase(url: str, clients: int, duration_s: float, timeout_s: float, rng: random.Random
                     ) -> tuple[PhaseReport, list[Outcome]]:
    outcomes: list[Outcome] = []
    stop_at = time.monotonic() + duration_s

    async def client(http: httpx.AsyncClient, c: int) -> None:
        while time.monotonic() < stop_at:
            outcome = Outcome(len(outcomes), "load", stream=rng.random() < 0.5, sent=time.monotonic())
            outcomes.append(outcome)
            await request(http, outcome, rng.randint(4, 16), timeout_s)

    async with httpx.AsyncClient(base_url=url, timeout=None,
                                 limits=httpx.Limits(max_connections=clients + 8)) as http:
        await asyncio.gather(*[client(http, c) for c in range(clients)])
    report = summarize("load", outcomes)
    ok = sorted(o.done - o.sent for o in outcomes if o.kind == "ok" and o.done)
    report.details.update(clients=clients, duration_s=duration_s, request_timeout_s=timeout_s,
                          latency_quantiles=[round(ok[min(len(ok) - 1, i * len(ok) // 100)], 3) for i in range(101)]
                          if ok else [])
    c = report.counts
    report.checks = {"lost == 0": c["lost"] == 0, "duplicated == 0": c["duplicated"] == 0,
                     "all succeeded": c["succeeded"] == c["sent"]}
    return report, outcomes


def idle(stats: dict[str, dict]) -> bool:
    return len(stats) == 2 and all(
        s["in_flight"] == 0 and s["engine_core"].get("running") == 0 and s["engine_core"].get("waiting") == 0
        and s["engine_core"].get("kv_cache_usage") == 0.0 for s in stats.values())


async def disconnect_phase(url: str, clients: int, timeout_s: float) -> tuple[PhaseReport, list[Outcome]]:
    before = await engine_stats(url)
    outcomes = [Outcome(i, "disconnect", stream=True, sent=time.monotonic()) for i in range(clients)]
    async with httpx.AsyncClient(base_url=url, timeout=None,
                                 limits=httpx.Limits(max_connections=clients + 8)) as http:
        await asyncio.gather(*[request(http, o, 64, timeout_s, drop_after_first=True) for o in outcomes])
    dropped_at = time.monotonic()
    after = await engine_stats(url)
    while not idle(after) and time.monotonic() - dropped_at < 120:
        await asyncio.sleep(0.5)
        after = await engine_stats(url)
    report = summarize("disconnect", outcomes)
    aborted = sum(after[r]["counters"]["aborted"] - before.get(r, {}).get("counters", {}).get("aborted", 0)
                  for r in after)
    report.details.update(clients=clients, seconds_to_idle=round(time.monotonic() - dropped_at, 2),
                          engine_aborted=aborted,
                          engine_after={r: {"in_flight": s["in_flight"], **s["engine_core"]} for r, s in after.items()})
    report.checks = {"every client got a first chunk": report.counts["aborted_by_client"] == clients,
                     "engines idle (no running/waiting, KV 0)": idle(after)}
    return report, outcomes


def replica_actor(replica_id: str) -> Any:
    import ray
    from ray.util import list_named_actors

    for entry in list_named_actors(all_namespaces=True):
        if entry["name"].startswith(f"SERVE_REPLICA::{APP}#LLMEngine#") and entry["name"].endswith(replica_id):
            return ray.get_actor(entry["name"], namespace=entry["namespace"])
    raise LookupError(f"no engine replica actor {replica_id}")


def engine_replicas() -> tuple[str, dict[str, int]]:
    from ray import serve

    status = serve.status().applications[APP].deployments["LLMEngine"]
    return str(status.status), dict(status.replica_states)


async def kill_phase(url: str, clients: int, timeout_s: float, rng: random.Random) -> tuple[PhaseReport, list[Outcome]]:
    import ray

    outcomes: list[Outcome] = []
    killed: dict[str, Any] = {}
    start = time.monotonic()

    async def client(http: httpx.AsyncClient) -> None:
        while "at" not in killed or time.monotonic() - killed["at"] < 5:  # keep load on until 5 s after the kill
            outcome = Outcome(len(outcomes), "kill", stream=rng.random() < 0.7, sent=time.monotonic())
            outcomes.append(outcome)
            await request(http, outcome, 48, timeout_s)

    async def killer() -> None:
        while not any(o.replica for o in outcomes if o.stream):
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        victim = Counter(o.replica for o in outcomes if o.replica and o.done is None).most_common(1)
        victim_id = victim[0][0] if victim else next(o.replica for o in outcomes if o.replica)
        handle = replica_actor(victim_id)
        killed.update(replica=victim_id, in_flight_at_kill=sum(1 for o in outcomes if o.done is None))
        ray.kill(handle, no_restart=True)
        killed["at"] = time.monotonic()

    async with httpx.AsyncClient(base_url=url, timeout=None,
                                 limits=httpx.Limits(max_connections=clients + 8)) as http:
        await asyncio.gather(killer(), *[client(http) for _ in range(clients)])
    # Serve brings a replacement up; traffic must reach it.
    recovered_at = None
    while time.monotonic() - killed["at"] < 300:
        state, replicas = engine_replicas()
        if replicas.get("RUNNING", 0) == 2 and state.endswith("HEALTHY") and not state.endswith("UNHEALTHY"):
            recovered_at = time.monotonic()
            break
        await asyncio.sleep(1.0)
    new_replicas: set[str] = set()
    after: list[Outcome] = []
    if recovered_at is not None:
        async with httpx.AsyncClient(base_url=url, timeout=None) as http:
            for i in range(8):
                batch = [Outcome(1000 + 4 * i + j, "kill-after", stream=False, sent=time.monotonic()) for j in range(4)]
                after += await asyncio.gather(*[request(http, o, 8, timeout_s) for o in batch])
                new_replicas = {o.replica for o in after if o.replica} - {killed["replica"]}
                if len(new_replicas) == 2:
                    break
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        ingress_stats = (await http.get("/v1/ltr/stats")).json()
    report = summarize("kill", outcomes)
    report.details["ingress_retried_before_output"] = ingress_stats["requests"].get("retried_before_output", 0)
    on_victim = [o for o in outcomes if o.replica == killed["replica"] and o.sent < killed["at"]]
    on_others = [o for o in outcomes if o.replica and o.replica != killed["replica"] and o.done
                 and o.sent < killed["at"]]
    report.details.update(
        clients=clients, killed_replica=killed["replica"], in_flight_at_kill=killed["in_flight_at_kill"],
        kill_after_s=round(killed["at"] - start, 2),
        victim_requests=dict(Counter(o.kind for o in on_victim)),
        other_replica_requests=dict(Counter(o.kind for o in on_others)),
        seconds_to_replacement=None if recovered_at is None else round(recovered_at - killed["at"], 1),
        after_recovery=dict(Counter(o.kind for o in after)), replicas_serving_after=sorted(new_replicas),
        timeline=[{"t": round(o.sent - start, 3), "latency": round((o.done or o.sent) - o.sent, 3), "kind": o.kind,
                   "victim": o.replica == killed["replica"]} for o in outcomes])
    report.checks = {
        "lost == 0": report.counts["lost"] == 0,
        "duplicated == 0": report.counts["duplicated"] == 0,
        "victim's in-flight requests: ok or clear error": all(o.kind in ("ok", "clear_error") for o in on_victim),
        "other replica's requests complete": bool(on_others) and all(o.kind == "ok" for o in on_others),
        "replica replaced": recovered_at is not None,
        "traffic reaches the replacement": len(new_replicas) == 2 and all(o.kind == "ok" for o in after),
    }
    return report, outcomes


# ---- app lifecycle, plot, main ---------------------------------------------------------------------------

def start_app(args: argparse.Namespace, port: int) -> None:
    import ray
    from ray import serve

    from deployments.app import build_app

    ray.init(address="local", _temp_dir=tempfile.mkdtemp(prefix="ltr-fault-"), include_dashboard=False,
             num_cpus=args.num_cpus, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({
        "model": args.model, "served_model_name": MODEL_NAME, "num_engine_replicas": 2, "engine_num_cpus": 0.5,
        "policy": {"name": args.policy}, "routing_stats_period_s": 0.5,
        "engine_kwargs": {"max_num_seqs": args.max_num_seqs, "max_model_len": 512, "enforce_eager": True},
        "ingress": {"predictor_app": None, "max_tokens_cap": 128},
    }), name=APP, route_prefix="/")


def plot(result: dict[str, Any], path: Path) -> None:
    """Latency CDF under load, outcome shares per phase, and the kill timeline (from the JSON alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = {p["name"]: p for p in result["phases"]}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    load = phases.get("load")
    if load and load["details"].get("latency_quantiles"):
        quantiles = load["details"]["latency_quantiles"]
        axes[0].plot(quantiles, [i / (len(quantiles) - 1) for i in range(len(quantiles))])
        axes[0].set(xlabel="latency (s)", ylabel="fraction of requests",
                    title=f"load: {load['details']['clients']} clients, {load['counts']['sent']} requests")
    keys = [("succeeded", "tab:blue"), ("failed_with_clear_error", "tab:orange"),
            ("aborted_by_client", "tab:green"), ("lost", "tab:red")]
    names = list(phases)
    bottom = [0.0] * len(names)
    for key, color in keys:
        shares = [100 * phases[n]["counts"].get(key, 0) / max(phases[n]["counts"]["sent"], 1) for n in names]
        axes[1].bar(names, shares, bottom=bottom, label=key, color=color)
        bottom = [b + v for b, v in zip(bottom, shares)]
    for x, name in enumerate(names):
        c = phases[name]["counts"]
        axes[1].annotate(f"sent {c['sent']}: ok {c['succeeded']}, err {c['failed_with_clear_error']},\n"
                         f"dropped {c['aborted_by_client']}, lost {c['lost']}, dup {c['duplicated']}",
                         (x, 101), ha="center", va="bottom", fontsize=7)
    axes[1].set(title="outcomes per phase", ylabel="% of requests sent", ylim=(0, 118))
    axes[1].legend(fontsize=7, loc="lower right")
    kill = phases.get("kill")
    if kill is not None:
        colors = {"ok": "tab:green", "clear_error": "tab:orange", "lost": "tab:red"}
        for point in kill["details"]["timeline"]:
            axes[2].scatter(point["t"], point["latency"], s=30 if point["victim"] else 10,
                            c=colors.get(point["kind"], "gray"), marker="x" if point["victim"] else "o")
        axes[2].axvline(kill["details"]["kill_after_s"], color="k", linestyle="--",
                        label=f"replica killed (replaced after {kill['details']['seconds_to_replacement']} s)")
        axes[2].set(xlabel="request sent at (s)", ylabel="latency (s)",
                    title="kill: green ok, orange clear error, red lost; x = killed replica")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--load-s", type=float, default=20.0, help="seconds the load clients keep sending")
    parser.add_argument("--disconnects", type=int, default=100)
    parser.add_argument("--kill-clients", type=int, default=24)
    parser.add_argument("--no-kill", action="store_true")
    parser.add_argument("--request-timeout-s", type=float, default=180.0)
    parser.add_argument("--model", default=None, help="HF folder (default: the tiny random Llama)")
    parser.add_argument("--policy", default="ltr", choices=["ltr", "fcfs"])
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "fault_harness.json")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.disconnects < 0 or args.load_s <= 0 or args.kill_clients < 1:
        parser.error("--clients/--kill-clients must be >= 1, --disconnects >= 0, --load-s > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from ltr.models import build_tiny_llama, cache_dir

    if args.model is None:
        args.model = str(build_tiny_llama(cache_dir() / "models" / "tiny-llama"))
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])
    info = machine()
    port = free_port()
    rng = random.Random(args.seed)
    reports: list[PhaseReport] = []
    started = time.monotonic()
    import ray
    from ray import serve

    try:
        start_app(args, port)
        startup_s = time.monotonic() - started
        url = f"http://127.0.0.1:{port}"
        print(f"app up in {startup_s:.0f}s at {url}", flush=True)
        phases = [("load", lambda: load_phase(url, args.clients, args.load_s, args.request_timeout_s, rng))]
        if args.disconnects:
            phases.append(("disconnect", lambda: disconnect_phase(url, args.disconnects, args.request_timeout_s)))
        if not args.no_kill:
            phases.append(("kill", lambda: kill_phase(url, args.kill_clients, args.request_timeout_s, rng)))
        for name, phase in phases:
            t0 = time.monotonic()
            report, _ = asyncio.run(phase())
            report.details["phase_s"] = round(time.monotonic() - t0, 1)
            reports.append(report)
            print(json.dumps({"phase": name, "counts": report.counts, "latency_s": report.latency_s,
                              "checks": report.checks}), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    passed = all(all(r.checks.values()) for r in reports)
    result = {"command": command, "machine": info, "config": {k: str(v) if isinstance(v, Path) else v
                                                               for k, v in vars(args).items()},
              "startup_s": round(startup_s, 1), "total_s": round(time.monotonic() - started, 1),
              "passed": passed, "phases": [asdict(r) for r in reports]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}; passed={passed}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
