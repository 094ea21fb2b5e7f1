"""Start the whole service on this machine (CPU): a private local Ray, Serve on a chosen port.

    python -m deployments.local [--port 8000] [--replicas 2] [--policy ltr] [--router least_work]

It never joins a Ray cluster that happens to be running (explicit `address="local"` and its own temp
dir), builds the served model once (`ltr.models.prepare_model`), prints the URL with curl and `openai`
examples, and blocks until Ctrl-C, then shuts Serve and Ray down.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

APP_NAME = "ltr"
PREDICTOR_APP_NAME = "ltr-predictor"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deployments.local", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--model", default="smollm2", help="HF model folder, or 'smollm2' (default)")
    parser.add_argument("--replicas", type=int, default=2, help="engine replicas (default 2)")
    parser.add_argument("--engine-cpus", type=float, default=0.5, help="Ray CPUs per engine replica")
    parser.add_argument("--policy", default="ltr", choices=["ltr", "fcfs", "priority", "mlfq"])
    parser.add_argument("--router", default="least_work", choices=["least_work", "pow2"])
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="engine batch seats (default: ltr.scheduling.engine.CPU_ENGINE_DEFAULTS)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length (default: ltr.scheduling.engine.CPU_MAX_MODEL_LEN)")
    parser.add_argument("--compile", action="store_true",
                        help="let vLLM torch.compile the model (faster steps, minutes more startup on CPU)")
    parser.add_argument("--no-predictor", action="store_true", help="serve without the predictor (FCFS)")
    parser.add_argument("--api-key-env", default=None,
                        help="environment variable holding an API key clients must send as Bearer token")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--temp-dir", default=None, help="Ray temp dir (default: a fresh one under /tmp)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    if args.replicas < 1:
        parser.error("--replicas must be >= 1")
    if args.api_key_env and not os.environ.get(args.api_key_env):
        parser.error(f"--api-key-env {args.api_key_env}: that environment variable is empty")
    return args


def app_args(args: argparse.Namespace) -> dict:
    """The `build_app` args for these command-line options."""
    ingress: dict = {"predictor_app": None if args.no_predictor else PREDICTOR_APP_NAME}
    ingress_env: dict[str, str] = {}
    if args.api_key_env:
        ingress["api_key_env"] = args.api_key_env
        ingress_env[args.api_key_env] = os.environ[args.api_key_env]
    return {"model": args.model, "policy": {"name": args.policy}, "router": args.router,
            "num_engine_replicas": args.replicas, "engine_num_cpus": args.engine_cpus,
            "engine_kwargs": {"enforce_eager": not args.compile,
                              **{key: value for key, value in (("max_num_seqs", args.max_num_seqs),
                                                               ("max_model_len", args.max_model_len))
                                 if value is not None}},
            "ingress": ingress, "ingress_env": ingress_env}


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import ray
    from ray import serve

    from deployments.app import build_app, build_predictor_app
    from ltr.models import prepare_model

    model = str(prepare_model()) if args.model == "smollm2" else args.model
    temp_dir = args.temp_dir or tempfile.mkdtemp(prefix="ltr-ray-")
    ray.init(address="local", _temp_dir=str(Path(temp_dir).resolve()), include_dashboard=False,
             num_cpus=args.num_cpus, logging_level="WARNING")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # While starting, a signal must break out of serve.run (which waits for every replica, forever if
        # one can never be scheduled) so that Serve and Ray are still shut down below.
        signal.signal(sig, _interrupt)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        if not args.no_predictor:
            serve.run(build_predictor_app(), name=PREDICTOR_APP_NAME, route_prefix=None)
        config = app_args(args)
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
        time.sleep(0.5)


if __name__ == "__main__":
    main()
