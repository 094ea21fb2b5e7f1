"""The Serve config YAMLs and cluster.yaml pass Ray's own validators and our typed app arguments."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import pytest
import yaml
from ray.serve.deployment import Application
from ray.serve.schema import ServeDeploySchema

from deployments.app import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, AppArgs, PredictorArgs

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [ROOT / "deployments" / "serve_config_cpu.yaml", ROOT / "deployments" / "serve_config_gpu.yaml"]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_config_passes_ray_schema_and_app_args(path: Path) -> None:
    schema = ServeDeploySchema.model_validate(_load(path))
    apps = {app.name: app for app in schema.applications}
    assert set(apps) == {"ltr", "ltr-predictor"}
    assert apps["ltr-predictor"].route_prefix is None and apps["ltr"].route_prefix == "/"
    serving = AppArgs(**apps["ltr"].args)
    PredictorArgs(**apps["ltr-predictor"].args)
    assert serving.ingress.get("predictor_app") == "ltr-predictor"
    serving.policy_config()
    overridden = {d.name for d in apps["ltr"].deployments}
    assert overridden <= {ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT}
    engine_override = next(d for d in apps["ltr"].deployments if d.name == ENGINE_DEPLOYMENT)
    assert engine_override.num_replicas == serving.num_engine_replicas
    if path.name.endswith("gpu.yaml"):
        assert serving.engine_num_gpus == 1 and serving.model.startswith("/")
    else:
        assert serving.engine_num_gpus == 0 and 0 < serving.engine_num_cpus < 1
        assert serving.num_engine_replicas == 2 and serving.model == "smollm2"
        assert serving.engine_env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


def test_cpu_config_import_paths_build_applications() -> None:
    for app in ServeDeploySchema.model_validate(_load(CONFIGS[0])).applications:
        module, attr = app.import_path.split(":")
        built = getattr(importlib.import_module(module), attr)(app.args)
        assert isinstance(built, Application)


def test_bad_app_args_are_rejected() -> None:
    with pytest.raises(ValueError):
        AppArgs(router="round_robin")
    with pytest.raises(ValueError):
        AppArgs(unknown_field=1)
    with pytest.raises(ValueError):
        AppArgs(policy={"name": "sjf"}).policy_config()


def test_cluster_yaml_passes_autoscaler_validator() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(ROOT / "cluster.yaml")
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    workers = [t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers)
    assert raw["provider"]["type"] == "aws"
    broken = copy.deepcopy(raw)
    broken["head_node_type"] = "missing"
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))
