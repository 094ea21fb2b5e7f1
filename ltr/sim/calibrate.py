"""Fit the simulator's step-time model to the real vLLM engine on this machine.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so every `LLMEngine.step()` can be timed
and the scheduler's own output read back: each sample is the *real* shape vLLM scheduled (prefill
tokens, sequences that sample, context tokens) and the step's wall time. A handful of batch shapes —
single long prefills, batched prefills, decode batches of 1..32 sequences at short and long contexts —
is enough for a 4-coefficient non-negative least-squares fit. The machine is shared, so each distinct
shape keeps its fastest step over its repeats (the least-disturbed measurement).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

from ltr.sim.profile import EngineLimits, HardwareProfile, StepTimeModel

logger = logging.getLogger(__name__)

#: Engine overrides shared by calibration and the fidelity check: the simulator does not model prefix
#: caching, so it is off; the token budget is explicit, and the simulated engine takes it and whether prefills
#: are chunked from the measured engine, so both sides split (or hold back) prompts the same way.
CPU_ENGINE_OVERRIDES: dict[str, Any] = {
    "enable_prefix_caching": False,
    "max_num_batched_tokens": 2048,
    "max_num_seqs": 32,
    "seed": 0,
}

#: (sequences, prompt tokens, output tokens) per calibration batch.
DEFAULT_SHAPES: tuple[tuple[int, int, int], ...] = (
    (1, 64, 10), (4, 64, 8), (16, 64, 6), (32, 64, 5),
    (8, 600, 5), (1, 256, 1), (1, 1024, 1), (4, 400, 1),
)


@dataclass(frozen=True)
class StepSample:
    prefill_tokens: int
    decode_seqs: int
    kv_tokens: int
    seconds: float


def cpu_engine_env() -> None:
    """Environment every vLLM CPU engine in this project needs on a shared 2-core box."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def fit_step_model(samples: Sequence[StepSample]) -> tuple[StepTimeModel, dict[str, float]]:
    """Non-negative least squares on [1, prefill, decode_seqs, kv]; returns the model and fit quality."""
    if len(samples) < 4:
        raise ValueError(f"need at least 4 step samples to fit 4 coefficients, got {len(samples)}")
    x = np.array([[1.0, s.prefill_tokens, s.decode_seqs, s.kv_tokens] for s in samples])
    y = np.array([s.seconds for s in samples])
    # Scale columns so NNLS treats them evenly; weight by 1/y so short decode steps count as much as
    # long prefills (relative error is what latency predictions inherit).
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
    w = 1.0 / np.maximum(y, 1e-6)
    coef, _ = nnls((x / scale) * w[:, None], y * w)
    coef = coef / scale
    model = StepTimeModel(a=float(coef[0]), b=float(coef[1]), c=float(coef[2]), d=float(coef[3]))
    pred = x @ coef
    rel = np.abs(pred - y) / y
    ss_res = float(((pred - y) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    return model, {"r2": 1.0 - ss_res / ss_tot, "mean_abs_rel_error": float(rel.mean()),
                   "median_abs_rel_error": float(np.median(rel)), "samples": len(samples)}


class _ShapeRecorder:
    """Wraps the live scheduler's `schedule()` to read back what each step scheduled."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.last: tuple[int, int, int] | None = None
        self._inner = scheduler.schedule
        scheduler.schedule = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = self._inner(*args, **kwargs)
        prefill = sampled = kv = 0
        for rid, num_new in output.num_scheduled_tokens.items():
            request = self.scheduler.requests[rid]
            end = request.num_computed_tokens          # already advanced by schedule()
            kv += end
            if end >= request.num_tokens:
                sampled += 1
            if not (num_new == 1 and request.num_output_tokens > 0 and end >= request.num_tokens):
                prefill += num_new
        self.last = (prefill, sampled, kv)
        return output


def start_engine(model: str | Path, policy_name: str = "fcfs") -> tuple[Any, dict]:
    """An in-process vLLM LLM with the project's engine plumbing (ltr.scheduling.engine)."""
    cpu_engine_env()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    from ltr.scheduling.engine import engine_kwargs
    from ltr.scheduling.policy import PolicyConfig

    kwargs = engine_kwargs(str(model), PolicyConfig(name=policy_name), **CPU_ENGINE_OVERRIDES)
    return LLM(**kwargs), kwargs


def measure_engine(model: str | Path, shapes: Sequence[tuple[int, int, int]] = DEFAULT_SHAPES,
                   repeats: int = 1, seed: int = 0, llm: Any = None,
                   kwargs: dict | None = None) -> tuple[list[StepSample], EngineLimits, dict]:
    """Run the calibration batches on a real in-process vLLM engine; returns samples and its limits."""
    from vllm import SamplingParams

    if llm is None:
        llm, kwargs = start_engine(model)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    recorder = _ShapeRecorder(scheduler)
    limits = EngineLimits(
        max_num_seqs=scheduler.max_num_running_reqs,
        max_num_batched_tokens=scheduler.scheduler_config.max_num_batched_tokens,
        num_kv_blocks=scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1,
        block_size=scheduler.block_size,
        long_prefill_token_threshold=int(scheduler.scheduler_config.long_prefill_token_threshold or 0),
        chunked_prefill=bool(scheduler.scheduler_config.enable_chunked_prefill))
    vocab = llm.get_tokenizer().vocab_size
    rng = np.random.default_rng(seed)
    # (shape, phase, sample count) -> steps; the machine is shared, so each group keeps its *fastest*
    # step (the least-disturbed measurement of that shape) and repeats give it more chances.
    groups: dict[tuple[int, int, int, str], list[StepSample]] = {}
    counter = 0
    batches = [(2, 128, 4)] + [shape for _ in range(repeats) for shape in shapes]   # first = warm-up
    for batch_index, (k, plen, olen) in enumerate(batches):
        for _ in range(k):
            ids = rng.integers(100, vocab - 100, size=plen).tolist()
            params = SamplingParams(max_tokens=olen, ignore_eos=True, temperature=0.0)
            engine.add_request(f"cal{counter}", {"prompt_token_ids": ids}, params)
            counter += 1
        step_in_batch = 0
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - start
            if recorder.last is not None and batch_index > 0:
                prefill, sampled, kv = recorder.last
                phase = "decode" if prefill == 0 else f"prefill{step_in_batch}"
                groups.setdefault((k, plen, sampled, phase), []).append(StepSample(prefill, sampled, kv, elapsed))
                logger.info("step shape %s took %.4f s", recorder.last, elapsed)
            recorder.last = None
            step_in_batch += 1
    samples = []
    for steps in groups.values():
        fastest = min(steps, key=lambda s: s.seconds)
        kv = int(np.median([s.kv_tokens for s in steps]))
        samples.append(StepSample(fastest.prefill_tokens, fastest.decode_seqs, kv, fastest.seconds))
    scheduler.schedule = recorder._inner
    info = {"engine_kwargs": {k: v for k, v in (kwargs or {}).items() if k != "additional_config"},
            "vllm_cpu_kvcache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
            "machine": machine_description(), "load_average_after": list(os.getloadavg())}
    return samples, limits, info


def machine_description() -> str:
    return (f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU cores shared with other "
            f"jobs, {platform.system()} {platform.release()}").replace("  ", " ")


def calibrate(model: str | Path, output: Path, shapes: Sequence[tuple[int, int, int]] = DEFAULT_SHAPES,
              repeats: int = 2, command: str = "", llm: Any = None, kwargs: dict | None = None) -> HardwareProfile:
    """Measure, fit, save; returns the fitted profile."""
    samples, limits, info = measure_engine(model, shapes, repeats, llm=llm, kwargs=kwargs)
    step, quality = fit_step_model(samples)
    profile = HardwareProfile(
        name="cpu-smollm2-135m-measured", step=step, limits=limits,
        notes={"source": f"MEASURED: {len(samples)} real vLLM steps on this machine, NNLS fit",
               "model": str(model)})
    profile.save(output, extra={
        "command": command, "fit": quality, "shapes": [list(s) for s in shapes], **info,
        "samples": [[s.prefill_tokens, s.decode_seqs, s.kv_tokens, s.seconds] for s in samples],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    logger.info("calibrated %s: %s (R^2 %.3f, mean |rel err| %.1f%%)", output, step, quality["r2"],
                100 * quality["mean_abs_rel_error"])
    return profile
