"""vLLM V1 scheduler adapter: rank-ordered iteration-level scheduling over the pure policy core.

Plugged in with ``scheduler_cls`` (see ``ltr.scheduling.engine.engine_args``). Rather than copying
vLLM's ``schedule()``, the subclass changes only *order* and *eviction* and lets upstream do the rest
(token budget, chunked prefill, prefix caching, KV allocation, output construction):

1. the waiting queues are ``RankedRequestQueue`` s ordered by the policy's sort key, so upstream admits
   the best-ranked waiting request first (and a request preempted by upstream goes back to its rank,
   not to the front);
2. before each step ``self.running`` is put in order best-first (``policy.running_key``: seat-keeping aged
   requests first), so upstream serves the best-ranked running requests first and its own out-of-KV
   preemption (``self.running.pop()``) evicts the worst-ranked;
3. when better-ranked waiting requests cannot get a seat (batch slots or KV blocks), the worst-ranked
   running ones are preempted first (``policy.preemption_victims``, capped per step); victims are held
   out of the waiting queue for that step so a request is never preempted and resumed in one step;
4. after the step, ``policy.observe_step`` gets the tokens scheduled per request (starvation aging,
   MLFQ demotion) and, for a policy whose keys move with the output (Gittins), the output tokens each
   scheduled request has generated; the running requests it re-keys are moved in the batch at the next
   step, like promoted ones.

The score comes from ``SamplingParams.extra_args["ltr_score"]``; a missing/NaN/inf score means "order
by arrival" (logged once per engine, counted in ``stats()``), never an error.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from dataclasses import dataclass, field, replace
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import RequestQueue, SchedulingPolicy as VllmQueuePolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from ltr.scheduling.engine import ADDITIONAL_CONFIG_KEY, LATE_SCORE_ID_KEY, SCORE_KEY, SCORE_PENDING_KEY
from ltr.scheduling.policy import (
    PolicyConfig,
    RankState,
    SchedulingPolicy,
    SortKey,
    admissible_count,
    usable_score,
)
from ltr.scheduling.score_updates import ScoreUpdate, ScoreUpdateReader
from ltr.scheduling.upstream import check_upstream, missing_request_attributes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterConfig:
    """The ``additional_config["ltr"]`` section: policy plus where/how often to dump counters."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    stats_path: str | None = None
    stats_every: int = 50
    #: Where late scores are appended (``ltr.scheduling.score_updates``); None: scores are final at arrival.
    score_updates_path: str | None = None
    #: The served-traffic log (``ltr.data.served_log.ServedLogConfig`` fields); None: nothing is logged.
    served_log: Mapping[str, Any] | None = None
    #: Rolling ranking quality of finished requests (``ltr.predictor.live_quality.LiveQualityConfig`` fields).
    live_quality: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> AdapterConfig:
        """Parse and validate; every problem is a ValueError naming the offending key."""
        section = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if section is None:
            return cls()
        where = f"additional_config[{ADDITIONAL_CONFIG_KEY!r}]"
        if not isinstance(section, Mapping):
            raise ValueError(f"{where} must be a mapping, got {type(section).__name__}")
        allowed = ("policy", "stats_path", "stats_every", "score_updates_path", "served_log", "live_quality")
        unknown = sorted(set(section) - set(allowed))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
        try:
            policy = PolicyConfig.from_mapping(section.get("policy") or {})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}['policy']: {exc}") from exc
        paths = {}
        for key in ("stats_path", "score_updates_path"):
            value = section.get(key)
            if value is not None and not isinstance(value, str | os.PathLike):
                raise ValueError(f"{where}[{key!r}] must be a path string")
            paths[key] = None if value is None else str(value)
        stats_every = section.get("stats_every", 50)
        if isinstance(stats_every, bool) or not isinstance(stats_every, int) or stats_every < 1:
            raise ValueError(f"{where}['stats_every'] must be an integer >= 1, got {stats_every!r}")
        from ltr.data.served_log import ServedLogConfig
        from ltr.predictor.live_quality import LiveQualityConfig

        served_log, live_quality = section.get("served_log"), section.get("live_quality") or {}
        try:
            ServedLogConfig.from_mapping(served_log)
            if not isinstance(live_quality, Mapping):
                raise ValueError(f"must be a mapping, got {type(live_quality).__name__}")
            LiveQualityConfig(**live_quality)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}['served_log'/'live_quality']: {exc}") from exc
        return cls(policy=policy, stats_every=stats_every, served_log=served_log, live_quality=dict(live_quality),
                   **paths)


class RankedRequestQueue(RequestQueue):
    """Waiting queue kept in the policy's order (lowest sort key first).

    Keys change between steps (aging, MLFQ demotion), so the owner moves the requests whose keys changed
    (``reposition``) or, when many did, calls ``resort()``; insertions in between go to their current rank.
    "Prepend" also inserts by rank: a preempted request resumes where its rank puts it, not ahead of
    better-ranked work. A queued request is found by binary search on the key it was queued under, so
    moving or removing one costs O(log n) key reads instead of a scan over thousands of requests.
    """

    def __init__(self, key: Callable[[Request], SortKey]) -> None:
        self._key = key
        self._items: list[Request] = []
        self._keys: list[SortKey] = []
        self._queued_key: dict[Request, SortKey] = {}

    def resort(self) -> None:
        keys = [self._key(r) for r in self._items]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        self._keys = [keys[i] for i in order]
        self._items = [self._items[i] for i in order]
        self._queued_key = dict(zip(self._items, self._keys))

    def add_request(self, request: Request) -> None:
        key = self._key(request)
        index = bisect.bisect_right(self._keys, key)
        self._keys.insert(index, key)
        self._items.insert(index, request)
        self._queued_key[request] = key

    def pop_request(self) -> Request:
        if not self._items:
            raise IndexError("pop from an empty queue")
        self._keys.pop(0)
        request = self._items.pop(0)
        del self._queued_key[request]
        return request

    def peek_request(self) -> Request:
        if not self._items:
            raise IndexError("peek from an empty queue")
        return self._items[0]

    def prepend_request(self, request: Request) -> None:
        self.add_request(request)

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.add_request(request)

    def reposition(self, request: Request) -> None:
        """Move a queued request to where its current key puts it (no-op if it is not queued)."""
        if request in self._queued_key:
            self.remove_request(request)
            self.add_request(request)

    def remove_request(self, request: Request) -> None:
        key = self._queued_key.pop(request, None)
        if key is None:
            raise ValueError(f"request {request.request_id} is not in the queue")
        index = bisect.bisect_left(self._keys, key)
        while self._items[index] is not request:   # past others queued under an equal key
            index += 1
        del self._items[index]
        del self._keys[index]

    def remove_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            if request in self._queued_key:
                self.remove_request(request)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __contains__(self, request: object) -> bool:
        return request in self._queued_key

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._items))


#: Requests out of place in a queue beyond which one full re-sort is cheaper than moving each of them.
REPOSITION_LIMIT = 32
#: How long a late score for a request the engine does not hold is kept, in case the request is on its way:
#: the replica can write a score before vLLM's serving layer has handed its request to the scheduler.
EARLY_SCORE_TTL_S = 60.0


@dataclass
class AdapterCounters:
    """What the adapter measures on top of the policy's own counters."""

    kv_preemptions: int = 0
    #: Scores that landed while their request, sent ahead of its score, waited for it behind other work.
    followed_scores: int = 0
    #: Scores that landed after their request had been placed without them (at a neutral score), re-ranking it.
    late_scores: int = 0
    #: Requests sent ahead of their score and admitted before it landed: no other work wanted the seat.
    admitted_before_score: int = 0
    #: Requests admitted to the batch while their late score was still on its way: placed by the neutral
    #: score, not their own (the ones whose late score landed while they waited were ranked by it).
    admitted_awaiting_score: int = 0
    unscored_requests: int = 0
    scored_requests: int = 0
    max_waiting: int = 0
    max_running: int = 0
    schedule_s: float = 0.0
    adapter_s: float = 0.0
    model_s: float = 0.0
    model_steps: int = 0


class RankScheduler(Scheduler):
    """vLLM ``Scheduler`` that orders, admits and evicts by a ``SchedulingPolicy``.

    Plug in this one class: it becomes ``AsyncRankScheduler`` when vLLM's *resolved* config has async
    scheduling on (vLLM turns it on by default on GPU and forces it off on CPU, whatever was asked).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> RankScheduler:
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is RankScheduler and vllm_config is not None and vllm_config.scheduler_config.async_scheduling:
            cls = AsyncRankScheduler
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_upstream()
        super().__init__(*args, **kwargs)
        check_upstream(self)
        if self.policy != VllmQueuePolicy.FCFS:
            raise ValueError(
                f"{type(self).__name__} orders requests itself; start the engine with "
                f"scheduling_policy='fcfs' (got {self.policy.value!r}). Use vLLM's own scheduler for "
                "the 'priority' baseline (ltr.scheduling.engine.engine_args does this).")
        self.adapter_config = AdapterConfig.from_additional_config(self.vllm_config.additional_config)
        self.rank_policy: SchedulingPolicy = self.adapter_config.policy.build(self.max_num_active_reqs)
        self.max_preemptions_per_step = self.adapter_config.policy.max_preemptions_per_step
        self.rank_states: dict[str, RankState] = {}
        self.counters = AdapterCounters()
        self._warned_unscored = False
        self._request_checked = False
        self._last_schedule_end: float | None = None
        #: How many requests at the end of ``self.running`` upstream appended (admitted) after the last sort.
        self._unsorted_tail = 0
        #: The running key of each request in the batch, as of the last sort (`_sort_running`).
        self._batch_keys: dict[Request, SortKey] = {}
        self.waiting = RankedRequestQueue(self._sort_key)
        self.kv_holding_waiting = RankedRequestQueue(self._sort_key)
        path = self.adapter_config.score_updates_path
        self._score_updates = ScoreUpdateReader(path) if path else None
        #: Running requests whose score changed since the last sort (late scores).
        self._rescored_running: list[RankState] = []
        #: The caller's id of each request that may get a late score -> vLLM's internal id for it, until its
        #: final update lands or it finishes.
        self._late_score_ids: dict[str, str] = {}
        #: Updates that came before their request (caller's id -> [(when read, update)], oldest first), until
        #: it arrives or `EARLY_SCORE_TTL_S` passes; and those of requests that arrived since the last step.
        self._early_updates: dict[str, list[tuple[float, ScoreUpdate]]] = {}
        self._arrived_updates: list[ScoreUpdate] = []
        from ltr.data.served_log import ServedLogConfig, ServedLogWriter
        from ltr.predictor.live_quality import LiveQualityConfig, LiveRankQuality

        log_config = ServedLogConfig.from_mapping(self.adapter_config.served_log)
        self._served_log = ServedLogWriter(log_config) if log_config else None
        self._live_quality = LiveRankQuality(LiveQualityConfig(**self.adapter_config.live_quality))
        names = self.vllm_config.model_config.served_model_name
        self._model_name = str(names[0] if isinstance(names, list | tuple) else names or
                               self.vllm_config.model_config.model)
        logger.info("rank scheduler: policy %s", self.adapter_config.policy)

    # -- per-request state -------------------------------------------------------------------

    def _state(self, request: Request) -> RankState:
        state = self.rank_states.get(request.request_id)
        if state is None:
            extra = (request.sampling_params.extra_args or {}) if request.sampling_params is not None else {}
            state = RankState(request_id=request.request_id, arrival=request.arrival_time,
                              score=self._score_of(request), prompt_len=request.num_prompt_tokens,
                              score_pending=bool(extra.get(SCORE_PENDING_KEY)) and LATE_SCORE_ID_KEY in extra)
            self.rank_states[request.request_id] = state
            self.rank_policy.track(state)
        return state

    def _score_of(self, request: Request) -> float | None:
        params = request.sampling_params
        raw = (params.extra_args or {}).get(SCORE_KEY) if params is not None else None
        score = usable_score(raw)
        if score is None:
            self.counters.unscored_requests += 1
            if not self._warned_unscored and self.rank_policy.name in ("ltr", "gittins", "priority"):
                self._warned_unscored = True
                logger.warning(
                    "request %s has no usable %r in SamplingParams.extra_args (got %r); it is ordered "
                    "by arrival (FCFS fallback). Further unscored requests are only counted in "
                    "stats()['unscored_requests'].", request.request_id, SCORE_KEY, raw)
        else:
            self.counters.scored_requests += 1
        return score

    def _sort_key(self, request: Request) -> SortKey:
        return self.rank_policy.sort_key(self._state(request))

    def _running_key(self, request: Request) -> SortKey:
        return self.rank_policy.running_key(self._state(request))

    def add_request(self, request: Request) -> None:
        if not self._request_checked:
            missing = missing_request_attributes(request)
            if missing:
                raise RuntimeError(f"vLLM's Request lacks attributes the rank scheduler uses: {missing}")
            self._request_checked = True
        if request.request_id not in self.requests:
            self._state(request)
            late_id = (request.sampling_params.extra_args or {}).get(LATE_SCORE_ID_KEY) \
                if request.sampling_params is not None else None
            if late_id is not None:
                self._late_score_ids[str(late_id)] = request.request_id
                self._arrived_updates += [update for _, update in self._early_updates.pop(str(late_id), ())]
        super().add_request(request)

    # -- the step ----------------------------------------------------------------------------

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        start = time.perf_counter()
        self._prune_states()
        self._apply_late_scores()
        self._reorder_waiting()
        self._sort_running()
        victims = self._rank_preempt(throttle_prefills)
        # Victims sit out this step so no request is preempted and resumed in the same output.
        if victims:
            self.waiting.remove_requests(victims)
        kept = len(self.running)
        before_upstream = time.perf_counter()
        output = super().schedule(throttle_prefills)
        after_upstream = time.perf_counter()
        if self._late_score_ids and output.scheduled_new_reqs:
            awaiting = set(self._late_score_ids.values())
            for new in output.scheduled_new_reqs:
                if new.req_id in awaiting:
                    state = self.rank_states.get(new.req_id)
                    if state is not None and state.score_pending:
                        self.counters.admitted_before_score += 1
                    else:
                        self.counters.admitted_awaiting_score += 1
        for victim in victims:
            self.waiting.add_request(victim)
        kv_preempted = max(len(output.preempted_req_ids or ()) - len(victims), 0)
        self.counters.kv_preemptions += kv_preempted
        # Upstream only pops its out-of-KV victims off the running batch and appends what it admits.
        self._unsorted_tail = len(self.running) - (kept - kv_preempted)
        scheduled = output.num_scheduled_tokens
        generated = None
        if self.rank_policy.moves_keys:
            requests = self.requests
            generated = {rid: requests[rid].num_output_tokens for rid in scheduled if rid in requests}
        self.rank_policy.observe_step(scheduled, generated)
        self.counters.max_waiting = max(self.counters.max_waiting, len(self.waiting))
        self.counters.max_running = max(self.counters.max_running, len(self.running))
        end = time.perf_counter()
        self.counters.adapter_s += (before_upstream - start) + (end - after_upstream)
        self.counters.schedule_s += end - start
        self._last_schedule_end = end
        if self.adapter_config.stats_path and self.rank_policy.stats.steps % self.adapter_config.stats_every == 0:
            self.dump_stats()
        return output

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: ModelRunnerOutput) -> dict:
        if self._last_schedule_end is not None:
            # Sync engine: schedule() -> execute_model() -> update_from_output(), so this gap is the
            # model step. (Under async scheduling it is only an approximation.)
            self.counters.model_s += time.perf_counter() - self._last_schedule_end
            self.counters.model_steps += 1
            self._last_schedule_end = None
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self._dump_if_idle()
        return outputs

    def finish_requests(self, request_ids: str | Iterable[str] | None,
                        finished_status: RequestStatus) -> list[Request]:
        finished = super().finish_requests(request_ids, finished_status)
        self._dump_if_idle()
        return finished

    def _dump_if_idle(self) -> None:
        """An idle engine takes no more steps, so leave its final counters behind, not the last periodic dump."""
        if self.requests:
            return
        if self.adapter_config.stats_path:
            self.dump_stats()
        if self._served_log is not None:
            self._served_log.flush()

    def _free_request(self, request: Request, delay_free_blocks: bool = False) -> Any:
        """Every finished request (stopped, capped or aborted) passes here once: its predicted score against
        the tokens it produced feeds the live ranking quality and, when configured, the served-traffic log."""
        from ltr.data.served_log import record_from_request

        record = record_from_request(request, self._model_name)
        if record.finish_reason != "abort":
            self._live_quality.observe_record(record)
        if self._served_log is not None:
            self._served_log.write(record)
        return super()._free_request(request, delay_free_blocks)

    def _prune_states(self) -> None:
        """Drop the states of requests that left the engine: those finished since the last step (vLLM's
        own set), then, only if any remain, by a full scan."""
        for request_id in self.finished_req_ids:
            if request_id not in self.requests and self.rank_states.pop(request_id, None) is not None:
                self.rank_policy.forget(request_id)
        if len(self.rank_states) > len(self.requests):
            for request_id in [r for r in self.rank_states if r not in self.requests]:
                del self.rank_states[request_id]
                self.rank_policy.forget(request_id)
        if len(self._late_score_ids) > len(self.requests):   # finished before their final update came
            self._late_score_ids = {k: v for k, v in self._late_score_ids.items() if v in self.requests}

    def _apply_late_scores(self) -> None:
        """Re-rank requests whose predicted score arrived after they entered the engine: a waiting one moves
        to its new place in the queue, a running one to its new place in the batch at this step's sort.

        A request sent ahead of its score leaves the back of the queue with its first update: its own score,
        or a release without one (its own is late) that leaves it at the neutral score it came with. A
        score's `extra_args` (what the served-traffic log records of the predictor's answer) join the
        request's. An update can come before its request (the replica writes it while vLLM's serving layer is
        still preparing the request): it is kept and applied when the request arrives."""
        if self._score_updates is None:
            return
        now = time.monotonic()
        while self._early_updates:   # oldest first (dict order): forget those whose request never came
            late_id, kept = next(iter(self._early_updates.items()))
            if now - kept[0][0] < EARLY_SCORE_TTL_S:
                break
            del self._early_updates[late_id]
        updates = self._score_updates.read()
        if self._arrived_updates:   # read before their request arrived; it has now
            updates, self._arrived_updates = [*self._arrived_updates, *updates], []
        for update in updates:
            request_id = self._late_score_ids.get(update.request_id)
            if request_id is None:   # finished already, or not here yet: kept a while for the latter
                self._early_updates.setdefault(update.request_id, []).append((now, update))
                continue
            if update.final:
                del self._late_score_ids[update.request_id]
            request, state = self.requests.get(request_id), self.rank_states.get(request_id)
            score = usable_score(update.score)
            if request is None or state is None or (score is None and not state.score_pending):
                continue   # finished already, or not a usable score: keep the placement it has
            queue = next((q for q in (self.waiting, self.kv_holding_waiting) if request in q), None)
            if queue is not None:
                queue.remove_request(request)   # found under the key it was queued with
            if score is not None and update.final:
                if state.score_pending:
                    self.counters.followed_scores += 1
                else:
                    self.counters.late_scores += 1
            state.score_pending, state.key_cache = False, None
            if score is not None:
                state.score = score
                if request.sampling_params is not None:   # what the served-traffic log records of the request
                    request.sampling_params.extra_args = {**(request.sampling_params.extra_args or {}),
                                                          **update.extra_args, SCORE_KEY: score}
            if queue is not None:
                queue.add_request(request)
            elif request.status == RequestStatus.RUNNING:
                self._rescored_running.append(state)

    def _reorder_waiting(self) -> None:
        """Bring the waiting queues up to date with keys changed by the last step.

        A waiting request's key changes only when it is promoted: everything else a key reads (score,
        arrival, served and generated tokens) changes only while a request runs (keys move only for
        scheduled requests), and a request re-enters the queue with its key of that moment. So only the
        promoted requests move; re-sorting thousands of waiting requests every step would cost more than
        the model step.
        """
        promoted = self.rank_policy.last_promoted
        if len(promoted) > REPOSITION_LIMIT:
            self.waiting.resort()
            self.kv_holding_waiting.resort()
            return
        for state in promoted:
            request = self.requests.get(state.request_id)
            if request is not None:
                for queue in (self.waiting, self.kv_holding_waiting):
                    queue.reposition(request)

    def _sort_running(self) -> None:
        """Put the running batch in key order, best first, reading each key from a per-batch cache.

        Computing a key costs ~1 µs right after a model step (cold caches), which with hundreds of seats
        was the adapter's largest cost, yet few keys change between steps: those of the requests upstream
        appended (admitted) since the last sort, and those the policy promoted, whose promotion ran out or
        whose key moved with their output (``last_moved``), plus late scores. Only those are computed; the
        sort itself then reads the cache (a dict lookup in C per request) over a nearly sorted list.
        """
        running, policy, keys = self.running, self.rank_policy, self._batch_keys
        tail = min(max(self._unsorted_tail, 0), len(running))
        self._unsorted_tail = 0
        changed = policy.last_promoted + policy.last_expired + policy.last_moved + self._rescored_running
        self._rescored_running = []
        if len(keys) > 2 * len(running) + 64:   # forget requests that left the batch
            keys = self._batch_keys = {r: keys[r] for r in running if r in keys}
        if not policy.static_rank_key:
            fresh: Iterable[Request] = running
        else:
            # Upstream sets RUNNING exactly when it appends to the batch (and changes it when removing).
            rekeyed = (self.requests.get(state.request_id) for state in changed)
            fresh = dict.fromkeys([*running[len(running) - tail:],
                                   *(r for r in rekeyed if r is not None and r.status == RequestStatus.RUNNING),
                                   *(r for r in running if r not in keys)])
        for request in fresh:
            keys[request] = self._running_key(request)
        running.sort(key=keys.__getitem__)

    def _admission_blocks(self, request: Request) -> tuple[int, int]:
        """(free KV blocks upstream requires to admit `request` now, blocks admitting it takes).

        As vLLM's ``allocate_slots`` counts them: prefix-cache hits already held by others cost nothing,
        a chunked prompt takes only its first chunk, and with ``scheduler_reserve_full_isl`` (vLLM's
        default) the whole prompt must fit; the watermark is kept free on top.
        """
        manager = self.kv_cache_manager
        coordinator = manager.coordinator
        hit_blocks = manager.empty_kv_cache_blocks.blocks
        computed = request.num_computed_tokens
        if computed == 0 and manager.prefix_cache_lookup_enabled(request):
            hit_blocks, computed, _ = coordinator.find_longest_cache_hit(
                request.block_hashes, request.num_tokens - 1)
        full = min(request.num_tokens, self.max_model_len)
        first_chunk_end = full
        if self.scheduler_config.enable_chunked_prefill:
            first_chunk_end = min(full, computed + self.max_num_scheduled_tokens)
        prefill_end = max(request.num_prompt_tokens, request.num_tokens - 1)

        def blocks(num_tokens: int, admission: bool) -> int:
            return coordinator.get_num_blocks_to_allocate(
                request_id=request.request_id, num_tokens=num_tokens, new_computed_blocks=hit_blocks,
                num_encoder_tokens=0, total_computed_tokens=computed, num_local_computed_tokens=computed,
                num_tokens_main_model=num_tokens, apply_admission_cap=admission, prefill_end=prefill_end)

        taken = blocks(first_chunk_end, False)
        required = blocks(full, True) if self.scheduler_reserve_full_isl else taken
        return required + manager.watermark_blocks, taken

    def _admissible_now(self, request: Request) -> bool:
        """Whether upstream's waiting loop would try to admit `request` this step rather than skip it."""
        if self._is_blocked_waiting_status(request.status):
            return False   # grammar compiling, remote KV in flight, streaming input awaited
        return not (request.num_stale_output_tokens and not request.drop_stale_output)

    def _free_seats(self, candidates: list[Request]) -> int:
        """How many of `candidates` (admissible waiting requests, best-ranked first) fit now without
        evicting anyone: ``policy.admissible_count`` over upstream's seats and KV accounting. Requests
        in ``kv_holding_waiting`` are served first by upstream, so they take seats and blocks first."""
        seats = self.max_num_active_reqs - len(self.running) - self.num_waiting_for_streaming_input
        ahead = [self._admission_blocks(r) for r in self.kv_holding_waiting if self._admissible_now(r)]
        free_blocks = self.kv_cache_manager.block_pool.get_num_free_blocks()
        holding = admissible_count(ahead, seats, free_blocks)
        if holding < len(ahead):
            return 0   # upstream stops at the first request that does not fit
        free_blocks -= sum(taken for _, taken in ahead)
        return admissible_count((self._admission_blocks(r) for r in candidates), seats - holding, free_blocks)

    def _rank_preempt(self, throttle_prefills: bool) -> list[Request]:
        """Evict the worst-ranked running requests that better-ranked waiting ones are blocked by.

        Only when upstream would admit from the waiting queue this step: not while paused (new requests
        or all) and not on a throttled step (DP prefill balancing may defer every prefill). Waiting
        requests upstream would skip (``_admissible_now``) are not candidates.
        """
        if (not self.rank_policy.preempts_running or self.max_preemptions_per_step <= 0
                or not self.waiting or not self.running or throttle_prefills
                or self.pause_state != PauseState.UNPAUSED):
            return []
        # Candidates beyond the free seats plus the preemption cap cannot matter this step.
        limit = max(self.max_num_active_reqs - len(self.running), 0) + self.max_preemptions_per_step
        candidates = list(islice((r for r in self.waiting if self._admissible_now(r)), limit))
        if not candidates:
            return []
        # self.running is sorted best-first at the top of the step, so reversed it is worst-first.
        preemptible = (self.rank_states[r.request_id] for r in reversed(self.running)
                       if self._request_blocks_can_be_freed(r))
        victims = self.rank_policy.preemption_victims(
            (self._state(r) for r in candidates), preemptible, self._free_seats(candidates),
            self.max_preemptions_per_step)
        if not victims:
            return []
        now = time.monotonic()
        by_id = {r.request_id: r for r in self.running}
        evicted = [by_id[v.request_id] for v in victims]
        for request in evicted:
            self.running.remove(request)
            self._preempt_request(request, now, drop_stale_output=self.requires_kv_delivery)
        return evicted

    def set_policy(self, config: PolicyConfig) -> None:
        """Swap the policy of an idle engine (benchmark phases, tests); counters restart."""
        if self.requests:
            raise RuntimeError(f"cannot change the scheduling policy with {len(self.requests)} "
                               "request(s) in flight")
        if not isinstance(config, PolicyConfig):
            raise TypeError(f"set_policy expects a PolicyConfig, got {type(config).__name__}")
        self.adapter_config = replace(self.adapter_config, policy=config)
        self.rank_policy = config.build(self.max_num_active_reqs)
        self.max_preemptions_per_step = config.max_preemptions_per_step
        self.rank_states.clear()
        self._batch_keys.clear()
        self.counters = AdapterCounters()
        self._warned_unscored = False

    # -- counters ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters for metrics and benchmarks (plain JSON-able dict)."""
        c, p = self.counters, self.rank_policy.stats
        steps = max(p.steps, 1)
        return {
            "policy": self.adapter_config.policy.to_mapping(),
            "steps": p.steps,
            "promotions": p.promotions,
            "rank_preemptions": p.rank_preemptions,
            "kv_preemptions": c.kv_preemptions,
            "followed_scores": c.followed_scores,
            "late_scores": c.late_scores,
            "admitted_before_score": c.admitted_before_score,
            "admitted_awaiting_score": c.admitted_awaiting_score,
            "live_quality": self._live_quality.snapshot(),
            "scored_requests": c.scored_requests,
            "unscored_requests": c.unscored_requests,
            "waiting": len(self.waiting) + len(self.kv_holding_waiting),
            "running": len(self.running),
            "max_waiting": c.max_waiting,
            "max_running": c.max_running,
            "schedule_s_total": c.schedule_s,
            "adapter_s_total": c.adapter_s,
            "model_s_total": c.model_s,
            "schedule_ms_per_step": 1e3 * c.schedule_s / steps,
            "adapter_ms_per_step": 1e3 * c.adapter_s / steps,
            "model_ms_per_step": 1e3 * c.model_s / max(c.model_steps, 1),
        }

    def dump_stats(self) -> None:
        """Write stats() to ``stats_path`` atomically (the engine core may live in another process)."""
        path = self.adapter_config.stats_path
        if not path:
            return
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as handle:
            json.dump(self.stats(), handle)
        os.replace(tmp, path)

    def shutdown(self) -> None:
        self.dump_stats()
        if self._served_log is not None:
            self._served_log.close()
        super().shutdown()


class AsyncRankScheduler(RankScheduler, AsyncScheduler):
    """The same ordering for engines with async scheduling (GPU default)."""
