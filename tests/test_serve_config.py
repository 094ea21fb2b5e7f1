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
from deployments.streaming import STREAM_BATCH_S

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
    overridden = {d.name for d in apps["ltr"].deployments}
    assert overridden <= {ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT}
    engine_override = next(d for d in apps["ltr"].deployments if d.name == ENGINE_DEPLOYMENT)
    assert engine_override.num_replicas == serving.num_engine_replicas
    if path.name.endswith("gpu.yaml"):
        assert serving.engine_num_gpus == 1 and serving.model.startswith("/")
    else:
        assert serving.engine_num_gpus == 0 and serving.model == "smollm2"
        assert serving.engine_env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


def test_cpu_config_is_the_layout_the_local_default_fits_to_2_cores() -> None:
    """`serve run deployments/serve_config_cpu.yaml` serves as `bash scripts/serve.sh` does on a 2-core box."""
    from deployments.local import engine_cpu_budget, parse_args, predictor_args
    from deployments.machine import fit_to_machine

    apps = {app["name"]: app["args"] for app in _load(CONFIGS[0])["applications"]}
    layout = fit_to_machine(2, 24, engine_cpu_budget(parse_args([]), 2))
    serving = AppArgs(**apps["ltr"])
    assert (serving.num_engine_replicas, serving.engine_num_cpus, serving.engine_nice, serving.engine_worker_in_core,
            serving.engine_kwargs["max_num_seqs"]) == \
        (layout.replicas, layout.num_cpus, layout.nice, layout.worker_in_core, layout.max_num_seqs)
    assert layout.engine_env().items() <= serving.engine_env.items()
    assert {key: apps["ltr-predictor"][key] for key in ("num_replicas", "threads", "num_cpus")} == \
        predictor_args(layout)


def test_cpu_config_import_paths_build_applications() -> None:
    for app in ServeDeploySchema.model_validate(_load(CONFIGS[0])).applications:
        module, attr = app.import_path.split(":")
        built = getattr(importlib.import_module(module), attr)(app.args)
        assert isinstance(built, Application)


def test_serving_options_reach_each_replica_as_vllm_serve_flags() -> None:
    """The serving-layer options become the flags `vllm serve` takes, and the output cap vLLM's own."""
    args = AppArgs(model="/m", served_model_name="m", enable_auto_tool_choice=True, tool_call_parser="hermes",
                   ingress={"max_tokens_cap": 77})
    spec = args.engine_spec("/m")
    assert spec.serving.cli_args("/m") == ["--model", "/m", "--served-model-name", "m", "--enable-auto-tool-choice",
                                           "--tool-call-parser", "hermes"]
    kwargs = spec.vllm_kwargs()
    assert kwargs["served_model_name"] == "m" and kwargs["override_generation_config"] == {"max_new_tokens": 77}
    assert "disable_log_stats" not in kwargs   # vLLM's default: stats on, its Prometheus metrics filled
    gpu = AppArgs(**next(a for a in _load(CONFIGS[1])["applications"] if a["name"] == "ltr")["args"])
    assert gpu.tool_call_parser == "llama3_json" and gpu.enable_auto_tool_choice
    with pytest.raises(ValueError, match="needs tool_call_parser"):
        AppArgs(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="unknown tool_call_parser"):
        AppArgs(tool_call_parser="no-such-parser")


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


def _resolve(path: Path) -> dict:
    """`ltr resolve-config` as a user runs it (a fresh process: no Ray, no engine, no GPU)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "ltr.cli", "resolve-config", str(path)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["applications"]["ltr"][ENGINE_DEPLOYMENT]


def test_resolve_config_gpu_engines_take_vllm_defaults_and_the_async_rank_scheduler() -> None:
    configured = AppArgs(**next(a for a in _load(CONFIGS[1])["applications"] if a["name"] == "ltr")["args"])
    engine = _resolve(CONFIGS[1])
    kwargs = engine["vllm_kwargs"]
    assert engine["platform"] == "gpu" and engine["num_gpus"] == 1 and engine["num_replicas"] == 4
    assert "dtype" not in kwargs and engine["resolved"]["dtype"] == "auto"   # no CPU float32 workaround
    assert "async_scheduling" not in kwargs and engine["resolved"]["async_scheduling"] is True
    assert engine["scheduler_class"] == "ltr.scheduling.vllm_scheduler.AsyncRankScheduler"
    assert kwargs["scheduler_cls"] == "ltr.scheduling.vllm_scheduler.RankScheduler"
    assert kwargs["max_num_seqs"] == 256
    assert kwargs["max_model_len"] == configured.engine_kwargs["max_model_len"] == 8192
    assert not any(key.startswith("VLLM_CPU") for key in engine["env"])
    assert kwargs["additional_config"]["ltr"]["policy"]["name"] == "gittins"
    assert engine["resolved"]["stream_batch_ms"] == 50.0   # Ray Serve LLM's stream batching interval


def test_resolve_config_cpu_engines_get_the_cpu_workarounds() -> None:
    engine = _resolve(CONFIGS[0])
    kwargs = engine["vllm_kwargs"]
    assert engine["platform"] == "cpu" and engine["num_replicas"] == 1
    assert kwargs["dtype"] == "float32" and kwargs["async_scheduling"] is False
    assert engine["scheduler_class"] == "ltr.scheduling.vllm_scheduler.RankScheduler"
    assert kwargs["max_num_seqs"] == 32 and kwargs["max_model_len"] == 2048
    assert engine["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and engine["env"]["OMP_NUM_THREADS"] == "2"
    assert engine["resolved"]["stream_batch_ms"] == STREAM_BATCH_S["cpu"] * 1000


def test_engine_spec_by_platform_and_async_rule() -> None:
    from ltr.scheduling.engine import CPU_ENGINE_DEFAULTS, CPU_POLICY_DEFAULTS, resolved_async_scheduling
    from ltr.scheduling.policy import PolicyConfig

    gpu = AppArgs(model="/m", engine_num_gpus=1, engine_kwargs={"max_model_len": 4096}).engine_spec("/m")
    assert not set(CPU_ENGINE_DEFAULTS) & set(gpu.vllm_kwargs()) - {"max_model_len"}
    assert gpu.max_model_len() == 4096 and gpu.scheduler_class().endswith("AsyncRankScheduler")
    cpu = AppArgs(model="/m").engine_spec("/m")
    assert cpu.vllm_kwargs()["dtype"] == "float32" and cpu.max_model_len() == CPU_ENGINE_DEFAULTS["max_model_len"]
    assert resolved_async_scheduling({"async_scheduling": False}, "gpu") is False
    assert resolved_async_scheduling({"pipeline_parallel_size": 2}, "gpu") is False
    assert resolved_async_scheduling({"speculative_config": {"method": "ngram"}}, "gpu") is False
    assert resolved_async_scheduling({"speculative_config": {"method": "eagle3"}}, "gpu") is True
    assert resolved_async_scheduling({"async_scheduling": True}, "cpu") is False
    # The Gittins prefill weight by platform (CPU_POLICY_DEFAULTS); a configured value wins on either.
    assert gpu.policy.gittins_prefill_weight == PolicyConfig().gittins_prefill_weight == 2.0
    assert cpu.policy.gittins_prefill_weight == CPU_POLICY_DEFAULTS["gittins_prefill_weight"] == 0.0
    assert cpu.vllm_kwargs()["additional_config"]["ltr"]["policy"]["gittins_prefill_weight"] == 0.0
    for gpus in (0, 1):
        set_weight = AppArgs(model="/m", engine_num_gpus=gpus, policy={"name": "gittins", "gittins_prefill_weight": 1.0})
        assert set_weight.engine_spec("/m").policy.gittins_prefill_weight == 1.0
    fcfs = AppArgs(model="/m", engine_num_gpus=1, policy={"name": "fcfs"}).engine_spec("/m")
    assert fcfs.scheduler_class() == "vllm.v1.core.sched.async_scheduler.AsyncScheduler"
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        AppArgs(policy={"name": "lifo"})


def test_resolve_config_names_a_missing_file() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "ltr.cli", "resolve-config", "nope.yaml"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "no such config file: nope.yaml" in done.stderr


def test_predictor_runtime_settings_are_checked_when_the_app_is_built() -> None:
    """A bad predictor runtime fails at `serve deploy` time with the setting named, not in a replica."""
    from deployments.app import build_predictor_app
    from deployments.predictor import PredictorSettings

    with pytest.raises(ValueError, match="runtime must be onnx or torch"):
        build_predictor_app({"settings": {"runtime": "tensorrt"}})
    with pytest.raises(ValueError, match="int8 is torch's dynamic quantization"):
        build_predictor_app({"settings": {"int8": True, "runtime": "onnx"}})
    assert isinstance(build_predictor_app({"settings": {"int8": True}}), Application)
    assert PredictorSettings().forward_runtime == "onnx" and PredictorSettings(int8=True).forward_runtime == "torch"
