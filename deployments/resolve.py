"""`ltr resolve-config CONFIG.yaml`: what every engine replica of a Serve config will run, on any machine.

A GPU config is usually written on a laptop and first run on the cluster; this shows, without a GPU,
without vLLM's engine and without starting Ray, the exact keyword arguments each engine replica passes to
vLLM (`EngineSpec.vllm_kwargs`, the function the replicas call), the scheduler class it gets, and its
resources and environment.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: Stand in for the per-replica temp files the rank scheduler dumps its counters to and reads late scores from.
STATS_PATH_PLACEHOLDER = "<replica temp dir>/scheduler_stats.json"
SCORE_UPDATES_PLACEHOLDER = "<replica temp dir>/score_updates.tsv"
SERVING_IMPORT_PATH = "deployments.app:build_app"


def resolve_serve_config(path: Path) -> dict[str, Any]:
    """{"applications": {app: {"LLMEngine": {...}}}} for every serving application of the config."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import ENGINE_DEPLOYMENT, AppArgs
    from ltr.scheduling.engine import resolved_async_scheduling

    schema = ServeDeploySchema.model_validate(yaml.safe_load(Path(path).read_text()))
    resolved: dict[str, Any] = {}
    for app in schema.applications:
        if app.import_path != SERVING_IMPORT_PATH:
            continue
        args = AppArgs(**(app.args or {}))
        if args.ingress.get("engine_app"):
            continue   # an extra ingress: its engines belong to another application
        spec = args.engine_spec(args.model_path(prepare=False))
        override = next((d for d in app.deployments if d.name == ENGINE_DEPLOYMENT), None)
        replicas = args.num_engine_replicas
        if override is not None and isinstance(override.num_replicas, int):
            replicas = override.num_replicas
        kwargs = spec.vllm_kwargs(STATS_PATH_PLACEHOLDER, SCORE_UPDATES_PLACEHOLDER)
        resolved[app.name] = {ENGINE_DEPLOYMENT: {
            "num_replicas": replicas,
            "platform": spec.platform,
            "num_gpus": args.engine_num_gpus,
            "num_cpus": args.engine_num_cpus,
            "env": args.replica_env(),
            "scheduler_class": spec.scheduler_class(),
            # What vLLM settles for the settings that differ by platform (absent kwargs take its defaults), and
            # how long a replica gathers a stream's events (`deployments.streaming`).
            "resolved": {"dtype": kwargs.get("dtype", "auto"),
                         "async_scheduling": resolved_async_scheduling(kwargs, spec.platform),
                         "stream_batch_ms": spec.stream_batch_s * 1000},
            "vllm_kwargs": kwargs,
        }}
    return {"config": str(path), "applications": resolved}


def _resolve_config(args: argparse.Namespace) -> int:
    if not args.config.is_file():
        raise FileNotFoundError(f"no such config file: {args.config}")
    print(json.dumps(resolve_serve_config(args.config), indent=2, sort_keys=True))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resolve-config", help="print, as JSON, what each engine replica of a Serve config runs")
    p.add_argument("config", type=Path, help="a Serve config YAML (e.g. deployments/serve_config_gpu.yaml)")
    p.set_defaults(func=_resolve_config)
