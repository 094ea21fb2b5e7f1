"""Start the whole service on this machine (CPU): a private local Ray, Serve on a chosen port.

    python -m deployments.local [--port 8000] [--policy gittins] [--router least_work] [--replicas N ...]

Engine replicas, threads and seats fit the machine (`deployments.machine.fit_to_machine`, printed at
start); `--replicas`, `--engine-threads`, `--engine-cpus` and `--max-num-seqs` override it. It never joins a
Ray cluster that happens to be running (explicit `address="local"` and its own temp dir), builds the served model once (`ltr.models.prepare_model`), prints the URL with curl and `openai`
examples, and blocks until Ctrl-C, then shuts Serve and Ray down.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from deployments.machine import EngineLayout, fit_to_machine
from ltr.scheduling.engine import platform_policy
from ltr.scheduling.policy import POLICY_NAMES, PolicyConfig

APP_NAME = "ltr"
PREDICTOR_APP_NAME = "ltr-predictor"
#: How HTTP reaches the ingress: `serve_env`.
HTTP_FRONTS = ("haproxy", "proxy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deployments.local", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--model", default="smollm2", help="HF model folder, or 'smollm2' (default)")
    parser.add_argument("--replicas", type=int, default=None, help="engine replicas (default: fit to the machine)")
    parser.add_argument("--engine-threads", type=int, default=None,
                        help="OpenMP threads per engine replica (default: fit to the machine)")
    parser.add_argument("--engine-cpus", type=float, default=None,
                        help="Ray CPUs per engine replica (default: the engines' share of --num-cpus)")
    parser.add_argument("--engine-nice", type=int, default=None,
                        help="nice levels (0-19) the engines' vLLM processes run below the rest of the service "
                             "(default: fit to the machine)")
    parser.add_argument("--engine-spin-wait", action=argparse.BooleanOptionalAction, default=None,
                        help="whether a multi-thread engine's OpenMP threads spin between parallel regions, as plain "
                             "vLLM's worker does, or sleep (OMP_WAIT_POLICY=PASSIVE) (default: fit to the machine)")
    parser.add_argument("--engine-worker-process", action="store_false", dest="engine_worker_in_core", default=None,
                        help="run each engine's model in a worker process of its own, as vLLM-CPU does (default: "
                             "inside vLLM's engine-core process, which then does not spin waiting for it)")
    parser.add_argument("--predictor-replicas", type=int, default=None,
                        help="predictor replicas, sharing the predictor's Ray CPUs (default: fit to the machine)")
    parser.add_argument("--predictor-threads", type=int, default=None,
                        help="torch threads per predictor replica (default: fit to the machine)")
    parser.add_argument("--stream-batch-ms", type=float, default=None,
                        help="milliseconds an engine gathers a streamed answer's events into one message to the "
                             "ingress (default: the platform's, deployments.streaming.STREAM_BATCH_S; 0: none)")
    parser.add_argument("--http-front", choices=HTTP_FRONTS, default="haproxy",
                        help="haproxy (default): Ray Serve's high-throughput mode, HAProxy on the port, the ingress "
                             "replica serving HTTP itself and gRPC between replicas; proxy: Serve's Python proxy "
                             "and Ray actor calls (benchmarks/README.md, 'Ray Serve's high-throughput mode')")
    parser.add_argument("--policy", default=PolicyConfig().name, choices=POLICY_NAMES,
                        help="scheduling policy (default: the PolicyConfig default; 'ltr' = static rank)")
    parser.add_argument("--router", default="least_work", choices=["least_work", "pow2"])
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="engine batch seats per replica (default: fit to the machine)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length (default: ltr.scheduling.engine.CPU_MAX_MODEL_LEN)")
    parser.add_argument("--chunked-prefill", action="store_true",
                        help="split long prompts across steps as vLLM does by default (off on CPU: a seeded request "
                             "prefilled in chunks kills a vLLM-CPU 0.32 engine; README, 'Seeded requests on CPU')")
    parser.add_argument("--compile", action="store_true",
                        help="let vLLM torch.compile the model (faster steps, minutes more startup on CPU)")
    parser.add_argument("--no-predictor", action="store_true", help="serve without the predictor (FCFS)")
    parser.add_argument("--wait-for-score", action="store_true",
                        help="send each request to its engine only once the predictor has scored it (or timed "
                             "out), instead of at once with its score following (IngressSettings.send_before_score)")
    parser.add_argument("--api-key-env", default=None,
                        help="environment variable holding an API key clients must send as Bearer token")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--temp-dir", default=None, help="Ray temp dir (default: a fresh one under /tmp)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    for name in ("replicas", "engine_threads", "max_num_seqs", "num_cpus"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.engine_cpus is not None and args.engine_cpus < 0:
        parser.error("--engine-cpus must be >= 0")
    if args.stream_batch_ms is not None and args.stream_batch_ms < 0:
        parser.error(f"--stream-batch-ms must be >= 0, got {args.stream_batch_ms:g}")
    for flag in ("predictor_replicas", "predictor_threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.engine_nice is not None and not 0 <= args.engine_nice <= 19:
        parser.error(f"--engine-nice must be in 0..19, got {args.engine_nice}")
    if args.api_key_env and not os.environ.get(args.api_key_env):
        parser.error(f"--api-key-env {args.api_key_env}: that environment variable is empty")
    return args


def engine_cpu_budget(args: argparse.Namespace, ray_cpus: float) -> float:
    """Ray CPUs left to the engines: the local Ray's, less the ingress's and (when deployed) the predictor's."""
    from deployments.app import AppArgs, PredictorArgs

    reserved = AppArgs.model_fields["ingress_num_cpus"].default
    if not args.no_predictor:
        reserved += PredictorArgs.model_fields["num_cpus"].default
    if ray_cpus - reserved <= 0:
        raise SystemExit(f"--num-cpus {ray_cpus:g} leaves no CPU for the engines (ingress and predictor take "
                         f"{reserved:g})")
    return ray_cpus - reserved


def engine_layout(args: argparse.Namespace, cpus: int, memory_gib: float, ray_cpus: float) -> EngineLayout:
    """The machine's layout (`fit_to_machine`) under the command line's overrides."""
    budget = engine_cpu_budget(args, ray_cpus)
    layout = fit_to_machine(cpus, memory_gib, budget).override(
        replicas=args.replicas, threads=args.engine_threads, num_cpus=args.engine_cpus,
        max_num_seqs=args.max_num_seqs, nice=args.engine_nice, spin_wait=args.engine_spin_wait,
        worker_in_core=args.engine_worker_in_core,
        predictor_replicas=args.predictor_replicas, predictor_threads=args.predictor_threads,
        engine_cpu_budget=budget)
    if layout.replicas * layout.num_cpus > budget + 1e-9:
        # Ray would never place the last replicas, and serve.run would wait for them forever.
        raise SystemExit(f"{layout.replicas} engines x {layout.num_cpus:g} Ray CPUs do not fit the {budget:g} "
                         "the engines have (--num-cpus less ingress and predictor)")
    return layout


#: Serve's controller loop every 0.5 s (Ray: 0.1) and its replicas' metric flushes every 1 s (Ray: 0.1):
#: the idle service took 0.24-0.32 cores of this 2-core box with Ray's values, 0.19-0.24 with these (the
#: controller alone 0.05-0.06 → 0.02-0.03; `benchmarks/idle_cpu.py`): a core it burns is one the engines lack.
QUIET_SERVE_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}


def serve_env(front: str, state_dir: str) -> dict[str, str]:
    """Environment the local Ray's processes need for `front`, with `QUIET_SERVE_ENV` (read by Ray Serve at
    import, so it is set before Ray starts). HAProxy's files go to `state_dir`, not Ray's shared
    /tmp/haproxy-serve, so two services on one machine stay apart; stopping an ingress replica waits 1 s, not 30, for a load balancer
    to let go of it (only this machine's HAProxy, which health-checks it, holds it)."""
    if front == "proxy":
        return dict(QUIET_SERVE_ENV)
    return {**QUIET_SERVE_ENV, "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{state_dir}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{state_dir}/admin.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state_dir,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{state_dir}/server-state",
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{state_dir}/metrics.sock",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def app_args(args: argparse.Namespace, layout: EngineLayout) -> dict:
    """The `build_app` args for these command-line options and engine layout."""
    ingress: dict = {"predictor_app": None if args.no_predictor else PREDICTOR_APP_NAME,
                     "send_before_score": not args.wait_for_score}
    ingress_env: dict[str, str] = {}
    if args.api_key_env:
        ingress["api_key_env"] = args.api_key_env
        ingress_env[args.api_key_env] = os.environ[args.api_key_env]
    return {"model": args.model, "policy": {"name": args.policy}, "router": args.router,
            "num_engine_replicas": layout.replicas, "engine_num_cpus": layout.num_cpus,
            "engine_env": layout.engine_env(), "engine_nice": layout.nice,
            "engine_worker_in_core": layout.worker_in_core,
            **({"stream_batch_ms": args.stream_batch_ms} if args.stream_batch_ms is not None else {}),
            "engine_kwargs": {"enforce_eager": not args.compile, "max_num_seqs": layout.max_num_seqs,
                              **({"max_model_len": args.max_model_len} if args.max_model_len is not None else {}),
                              **({"enable_chunked_prefill": True} if args.chunked_prefill else {})},
            "ingress": ingress, "ingress_env": ingress_env}


def predictor_args(layout: EngineLayout) -> dict:
    """The `build_predictor_app` args: the layout's replicas and threads, splitting the predictor's Ray CPUs
    (what `engine_cpu_budget` reserved for it) evenly."""
    from deployments.app import PredictorArgs

    total = PredictorArgs.model_fields["num_cpus"].default
    return {"num_replicas": layout.predictor_replicas, "threads": layout.predictor_threads,
            "num_cpus": round(total / layout.predictor_replicas, 3)}


def policy_line(name: str) -> str:
    """What the engines will schedule by, as printed at start."""
    policy = platform_policy({"name": name}, "cpu")
    weight = f", prefill weight {policy.gittins_prefill_weight:g} (CPU)" if policy.name == "gittins" else ""
    return f"scheduling policy: {policy.name}{weight}"


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def stop_haproxy(state_dir: str, grace_s: float = 5.0) -> list[int]:
    """Stop the HAProxy processes configured in this service's `state_dir` (the pids stopped).

    Serve's HAProxyManager actor starts HAProxy in a process group of its own and stops it on a clean
    shutdown; when the actor dies first (a SIGTERM to the whole process group of `deployments.local`, which
    takes Ray's raylet down with it), HAProxy outlives the service and keeps the port. Only a process whose
    command line names a file in `state_dir`, this service's private dir, is ours to stop."""
    import psutil

    ours = []
    for process in psutil.process_iter(["cmdline"]):
        if any(arg.startswith(f"{state_dir}/") for arg in process.info["cmdline"] or ()):
            ours.append(process)
    for process in ours:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(ours, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    return [process.pid for process in ours]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import ray
    from ray import serve

    import psutil
    from vllm.utils.torch_utils import available_cpu_count

    from deployments.app import build_app, build_predictor_app
    from ltr.models import prepare_model

    cpus = available_cpu_count()
    ray_cpus = args.num_cpus or cpus
    layout = engine_layout(args, cpus, psutil.virtual_memory().total / 2**30, ray_cpus)
    print(layout.describe(), flush=True)
    print(policy_line(args.policy), flush=True)
    model = str(prepare_model()) if args.model == "smollm2" else args.model
    temp_dir = args.temp_dir or tempfile.mkdtemp(prefix="ltr-ray-")
    # HAProxy's sockets sit under this dir and a 56-character node id, and may not pass 97 characters.
    haproxy_dir = tempfile.mkdtemp(prefix="ltrhap-", dir="/tmp") if args.http_front == "haproxy" else None
    for name, value in serve_env(args.http_front, haproxy_dir or "").items():
        os.environ.setdefault(name, value)   # an explicit setting in the environment wins
    print(f"HTTP front: {args.http_front}" + (f" (state in {haproxy_dir})" if haproxy_dir else ""), flush=True)
    # Ray would start every worker at nice 15 (`worker_niceness`); here the engines yield instead (layout.nice)
    # and the predictor, the ingress and Serve's proxy keep normal priority.
    ray.init(address="local", _temp_dir=str(Path(temp_dir).resolve()), include_dashboard=False,
             num_cpus=ray_cpus, logging_level="WARNING", _system_config={"worker_niceness": 0})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # While starting, a signal must break out of serve.run (which waits for every replica, forever if
        # one can never be scheduled) so that Serve and Ray are still shut down below.
        signal.signal(sig, _interrupt)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        if not args.no_predictor:
            serve.run(build_predictor_app(predictor_args(layout)), name=PREDICTOR_APP_NAME,
                      route_prefix=None)
        config = app_args(args, layout)
        config["model"] = model
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        url = f"http://{args.host}:{args.port}"
        auth = f' -H "Authorization: Bearer ${args.api_key_env}"' if args.api_key_env else ""
        print(f"\nltr-serve is up at {url}  (OpenAI API under {url}/v1; Ctrl-C stops it)\n", flush=True)
        print("curl example:\n"
              f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
              "    -d '{\"model\": \"SmolLM2-135M-Instruct\", \"max_tokens\": 64, "
              "\"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}'\n",
              flush=True)
        key = f"os.environ['{args.api_key_env}']" if args.api_key_env else "'unused'"
        print("openai example:\n"
              f"  python3 -c \"import os, openai; c = openai.OpenAI(base_url='{url}/v1', api_key={key}); "
              "print(c.completions.create(model='SmolLM2-135M-Instruct', prompt='Hello,', "
              "max_tokens=32).choices[0].text)\"\n", flush=True)
        while not stop.is_set():
            stop.wait(1.0)
    except KeyboardInterrupt:
        print("interrupted while starting", flush=True)
    finally:
        print("shutting down...", flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if haproxy_dir:
                stop_haproxy(haproxy_dir)
                shutil.rmtree(haproxy_dir, ignore_errors=True)
        time.sleep(0.5)


if __name__ == "__main__":
    main()
