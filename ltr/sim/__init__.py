"""Discrete-event simulator of continuous batching on many vLLM replicas, driven by the shared policy core."""

from ltr.sim.cluster import ClusterConfig, RequestRecord, SimResult, simulate, summarize
from ltr.sim.profile import EngineLimits, HardwareProfile, StepTimeModel, a100_llama3_8b, load_profile
from ltr.sim.replica import Replica, SimSeq, StepShape
from ltr.sim.workload import (
    SimRequest,
    build_requests,
    expected_tokens_from_scores,
    noisy_scores,
    poisson_arrivals,
    with_scores,
)

__all__ = [
    "ClusterConfig", "EngineLimits", "HardwareProfile", "Replica", "RequestRecord", "SimRequest", "SimResult",
    "SimSeq", "StepShape", "StepTimeModel", "a100_llama3_8b", "build_requests", "expected_tokens_from_scores",
    "load_profile", "noisy_scores", "poisson_arrivals", "simulate", "summarize", "with_scores",
]
