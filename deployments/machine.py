"""How many engine replicas, threads and seats this machine serves best with (CPU engines).

One rule, `fit_to_machine`, used by `python -m deployments.local` (and so by `bash scripts/serve.sh`); every
field can be overridden from the command line (`EngineLayout.override`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ltr.scheduling.engine import CPU_ENGINE_DEFAULTS

#: Seats (max_num_seqs) per engine thread: the CPU engine default (ltr.scheduling.engine.CPU_ENGINE_DEFAULTS)
#: for each of an engine's threads, so an engine on two cores holds as many requests as two one-thread engines.
SEATS_PER_THREAD = int(CPU_ENGINE_DEFAULTS["max_num_seqs"])
#: OpenMP threads per engine the measurement favours, spinning between parallel regions, with the model inside
#: the engine-core process (benchmarks/README.md, "The model inside the engine core": one engine on both cores
#: against two one-thread engines, through the whole service).
THREADS_PER_ENGINE = 2
#: Memory one CPU engine replica takes, read on this box while serving (RSS, shared pages counted in each): the
#: Serve replica ~1.1 GiB, vLLM's engine core ~0.75, its worker ~2.5 with the 1 GiB KV cache
#: (VLLM_CPU_KVCACHE_SPACE), read when the worker had a process of its own (layout_bench records them per run).
ENGINE_MEMORY_GIB = 4.5
#: How many nice levels the engines' processes run below the rest of the service when they take every core.
#: The predictor, the ingress and Serve's proxy are small, latency-bound tasks on the same cores; at equal
#: priority they queue behind model steps, and the predictor misses its timeout.
ENGINE_NICE = 10
#: Torch threads of each predictor replica where the engines yield to it. Two threads score a big batch 1.7x
#: faster (benchmarks/results/predictor_speed.json), but the service scores one prompt at a time, and with the
#: engines busy on every core one prompt took 2.2-2.5x longer on two threads than on one (a thread waits at
#: each layer for its partner's slice): benchmarks/README.md, "One-thread predictor replicas".
PREDICTOR_THREADS = 1
#: Most predictor replicas (one per core): concurrent prompts are scored side by side, and a live artifact
#: swap (Serve's user_config) reconfigures one replica while the other keeps scoring.
PREDICTOR_REPLICAS = 2


def omp_env(threads: int, spin_wait: bool = False) -> dict[str, str]:
    """Environment of a process with `threads` OpenMP threads. Torch keeps the count an outside OMP_NUM_THREADS
    sets (vLLM too: vllm.utils.torch_utils.set_torch_threads_for_runtime; Ray sets it to an actor's whole CPUs,
    1 below 2). Several threads spin-wait after every parallel region, which starves everything else on the
    cores, so by default they sleep instead (OMP_WAIT_POLICY=PASSIVE; layout_bench offline stage).
    `spin_wait` keeps OpenMP's own active wait, as plain vLLM's worker runs (benchmarks/results/layout_probe)."""
    env = {"OMP_NUM_THREADS": str(threads)}
    if threads > 1 and not spin_wait:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


@dataclass(frozen=True)
class EngineLayout:
    """Engine replicas, OpenMP threads and Ray CPUs per replica, seats per replica, and why."""

    replicas: int
    threads: int
    num_cpus: float
    max_num_seqs: int
    #: Nice adjustment of each engine's vLLM processes (0: the same priority as the rest of the service).
    nice: int
    reason: str
    #: Torch threads of each predictor replica (None: Ray's rule for its CPUs), and how many replicas.
    predictor_threads: int | None = None
    predictor_replicas: int = 1
    #: Whether the engines' OpenMP threads spin between parallel regions (OpenMP's default) instead of sleeping.
    spin_wait: bool = False
    #: Whether each engine's model runs inside vLLM's engine-core process (`AppArgs.engine_worker_in_core`).
    worker_in_core: bool = True

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.threads < 1 or self.max_num_seqs < 1 or self.num_cpus < 0 \
                or not 0 <= self.nice <= 19 or self.predictor_replicas < 1 \
                or (self.predictor_threads is not None and self.predictor_threads < 1):
            raise ValueError(f"invalid engine layout {self}")

    def engine_env(self) -> dict[str, str]:
        """Environment of each engine replica."""
        return omp_env(self.threads, self.spin_wait)

    def override(self, *, replicas: int | None = None, threads: int | None = None, num_cpus: float | None = None,
                 max_num_seqs: int | None = None, nice: int | None = None, spin_wait: bool | None = None,
                 worker_in_core: bool | None = None, predictor_replicas: int | None = None,
                 predictor_threads: int | None = None, engine_cpu_budget: float) -> EngineLayout:
        """This layout with the given fields set (the command line's). A changed replica count re-splits the
        engines' Ray CPUs and threads evenly (at least 1 thread each); changed threads bring their seats."""
        given = {name: value for name, value in (("replicas", replicas), ("threads", threads),
                                                 ("num_cpus", num_cpus), ("max_num_seqs", max_num_seqs),
                                                 ("nice", nice), ("spin_wait", spin_wait),
                                                 ("worker_in_core", worker_in_core),
                                                 ("predictor_replicas", predictor_replicas),
                                                 ("predictor_threads", predictor_threads))
                 if value is not None}
        if not given:
            return self
        layout = replace(self, **given)
        if "replicas" in given:
            share = engine_cpu_budget / layout.replicas
            if "num_cpus" not in given:
                layout = replace(layout, num_cpus=round(share, 3))
            if "threads" not in given:   # the same threads in all, split evenly
                layout = replace(layout, threads=max(1, self.replicas * self.threads // layout.replicas))
        if layout.threads != self.threads and "max_num_seqs" not in given:
            layout = replace(layout, max_num_seqs=SEATS_PER_THREAD * layout.threads)
        flags = ", ".join("--" + {"replicas": "replicas", "threads": "engine-threads", "num_cpus": "engine-cpus",
                                  "max_num_seqs": "max-num-seqs", "nice": "engine-nice",
                                  "spin_wait": "engine-spin-wait", "worker_in_core": "engine-worker-process",
                                  "predictor_replicas": "predictor-replicas",
                                  "predictor_threads": "predictor-threads"}[name] for name in given)
        return replace(layout, reason=f"set by {flags}")

    def describe(self) -> str:
        """The one line `deployments.local` prints at start."""
        return (f"engine layout: {self.replicas} replica{'s' if self.replicas > 1 else ''} x {self.threads} "
                f"thread{'s' if self.threads > 1 else ''} ({self.num_cpus:g} Ray CPUs each), "
                f"{self.max_num_seqs} seats each{f', nice {self.nice}' if self.nice else ''}"
                f"{', OpenMP spin wait' if self.spin_wait and self.threads > 1 else ''}"
                f"{'' if self.worker_in_core else ', model in a worker process'}"
                f"{self._predictor_text()}; {self.reason}")

    def _predictor_text(self) -> str:
        if self.predictor_replicas == 1 and self.predictor_threads is None:
            return ""
        replicas = f"{self.predictor_replicas} x " if self.predictor_replicas > 1 else ""
        threads = self.predictor_threads or "Ray's"
        return f", predictor {replicas}{threads} thread{'s' if threads != 1 else ''}"


def fit_to_machine(cpus: int, memory_gib: float, engine_cpu_budget: float) -> EngineLayout:
    """The engine layout for a machine with `cpus` usable cores and `memory_gib` of memory, whose engines may
    take `engine_cpu_budget` Ray CPUs (the rest is the predictor's and the ingress's).

    From benchmarks/peer_bench.py on this 2-core box, through the whole service against plain vLLM, with each
    engine's model inside its engine-core process (gains = vLLM's latency / ltr-serve's): near saturation
    (3 req/s) one engine of 2 spinning threads and 32 seats gained 0.91-1.35x on per-token latency (every metric
    within 5% or better on 2 of 6 samples), two one-thread engines of 16 seats 0.80-0.91x (TTFT 0.41-0.44x);
    both gained 2.3-4.9x at 6 req/s
    (benchmarks/README.md, "The model inside the engine core"). (Before the model moved into the engine core,
    two one-thread engines beat one two-thread engine: benchmarks/results/layout_bench*.json.) Rule: engines
    of THREADS_PER_ENGINE spinning threads (fewer on fewer cores), one per that many cores (capped by memory at
    ENGINE_MEMORY_GIB each, at least one), SEATS_PER_THREAD seats per thread, the engines' Ray CPUs split
    evenly, and ENGINE_NICE levels below the rest of the service when their threads fill every core, the
    predictor then scoring in up to PREDICTOR_REPLICAS replicas of PREDICTOR_THREADS threads. Measured on 2
    cores only; more cores repeat the choice per pair of cores (not measured).
    """
    if cpus < 1 or memory_gib <= 0 or engine_cpu_budget <= 0:
        raise ValueError(f"cpus, memory and the engine CPU budget must be positive: {cpus}, {memory_gib}, "
                         f"{engine_cpu_budget}")
    threads = min(THREADS_PER_ENGINE, cpus)
    by_cpu = max(1, cpus // threads)
    by_memory = max(1, math.floor(memory_gib / ENGINE_MEMORY_GIB))
    replicas = min(by_cpu, by_memory)
    bound = "memory" if by_memory < by_cpu else "cores"
    yield_cores = replicas * threads >= cpus
    return EngineLayout(replicas=replicas, threads=threads, num_cpus=round(engine_cpu_budget / replicas, 3),
                        max_num_seqs=SEATS_PER_THREAD * threads, nice=ENGINE_NICE if yield_cores else 0,
                        spin_wait=threads > 1,
                        predictor_threads=PREDICTOR_THREADS if yield_cores else None,
                        predictor_replicas=min(cpus, PREDICTOR_REPLICAS) if yield_cores else 1,
                        reason=f"fit to {cpus} CPUs and {memory_gib:.0f} GiB, bound by {bound}: engines of up to "
                               f"{THREADS_PER_ENGINE} spinning threads, the model inside the engine core, measured "
                               "best (benchmarks/results/peer_bench_incore_*.json)")
