"""Pure scheduling policy core, shared by the vLLM scheduler adapter and the simulator.

Nothing here imports vLLM or Ray. A policy turns per-request state into a sort key (lower is served
first), keeps starvation/aging state up to date once per engine iteration, and picks which running
requests to evict when better-ranked waiting requests cannot get a seat. The caller `track`s each request
when it enters the engine, reports every step with `observe_step`, and `forget`s a request when it leaves;
per step the policy then costs O(scheduled), not O(queued), which matters with thousands waiting.

Score convention (the whole project): higher score = longer predicted output; requests are served in
ascending score order, ties broken by arrival. A request without a usable score is ordered by arrival
ahead of ranked work, so a predictor outage degrades to FCFS instead of starving anyone. A request whose
score is still on its way (`RankState.score_pending`) is ordered by arrival *behind* all other work: it
takes a seat nobody else wants, and never one a ranked request is waiting for.
"""

from __future__ import annotations

import bisect
import heapq
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import chain, count, islice, takewhile
from typing import Any, Literal

from ltr.scheduling.length_distribution import LengthDistribution, load_distribution

PolicyName = Literal["fcfs", "priority", "mlfq", "ltr", "gittins"]
POLICY_NAMES: tuple[PolicyName, ...] = ("fcfs", "priority", "mlfq", "ltr", "gittins")

SortKey = tuple[float, ...]
#: First element of a sort key whose request's score is on its way: behind promoted (0) and other (1) work.
SCORE_PENDING_TIER = 2.0


def usable_score(score: float | None) -> float | None:
    """A finite float score, or None when the score is missing, NaN or infinite."""
    if score is None:
        return None
    try:
        value = float(score)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass(slots=True)
class RankState:
    """What the policy knows about one request; owned by the adapter or the simulator.

    Slotted: the adapter reads hundreds of these per step right after the model step has evicted them from
    the CPU caches, and a slotted object is fewer cache lines to fetch.
    """

    request_id: str
    arrival: float
    score: float | None = None
    prompt_len: int = 0
    served_tokens: int = 0
    #: Output tokens generated so far (not prompt or recompute tokens), as the caller reports them.
    generated: int = 0
    #: `generated` count at which a policy with moving keys (`moves_keys`) re-keys this request.
    next_boundary: float = math.inf
    #: The policy step at which the current run of unscheduled iterations began (`SchedulingPolicy.waited`).
    wait_start: int = 0
    promoted_left: int = 0
    #: Set at the first promotion and kept (see StarvationConfig).
    aged: bool = False
    #: Its score is on its way (sent ahead of the predictor's answer): it waits behind all other work until
    #: the caller clears this, when the score lands or the wait for it is given up.
    score_pending: bool = False
    #: (policy, key while promoted, key otherwise), filled by a policy whose rank key is static.
    key_cache: tuple[Any, SortKey, SortKey] | None = field(default=None, repr=False, compare=False)

    @property
    def promoted(self) -> bool:
        return self.promoted_left > 0


@dataclass(frozen=True)
class StarvationConfig:
    """Aging rule: `threshold` unscheduled iterations in a row earn `quantum` promoted iterations.

    A promoted request becomes *aged*. With `keep_seat` it is never rank-preempted afterwards, and it is
    the last out-of-KV victim (the running batch holds aged requests ahead of the others, so an engine that
    evicts from the end of the batch takes every non-aged request first), so the service its promotion
    started is not thrown away (evict + recompute) when the quantum ends. At most
    `aged_share` of the batch's seats (at least one) are held by aged requests at a time, so under
    overload aging serves the longest-waiting requests steadily instead of handing the whole batch
    back to FCFS order. The paper's rule is `keep_seat=False, aged_share=None` (no cap).
    """

    #: 400 from the mean-vs-tail frontier (benchmarks/sim_gittins.py): for the Gittins default it keeps 98% of
    #: the no-aging gain (200: 82%) with the lowest long-request p99 of the sweep.
    threshold: int = 400
    quantum: int = 10
    #: 0.1 from the same frontier over the share (`aged_share` section): at paper scale it gains 3% on the
    #: mean over 0.25 at the same long-request p99; more aged seats hand the batch back to arrival order.
    aged_share: float | None = 0.1
    keep_seat: bool = True

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ValueError(f"starvation threshold must be >= 1, got {self.threshold}")
        if self.quantum < 1:
            raise ValueError(f"starvation quantum must be >= 1, got {self.quantum}")
        if self.aged_share is not None and (isinstance(self.aged_share, bool) or not 0 < self.aged_share <= 1):
            raise ValueError(f"starvation aged_share must be in (0, 1] or null, got {self.aged_share!r}")

    def max_aged(self, max_num_seqs: int | None) -> float:
        """Aged requests allowed in flight at once for a batch of `max_num_seqs` seats."""
        if self.aged_share is None or max_num_seqs is None:
            return math.inf
        return max(1, math.floor(self.aged_share * max_num_seqs))


@dataclass
class PolicyStats:
    """Counters a policy accumulates; the adapter exposes them as metrics."""

    promotions: int = 0
    rank_preemptions: int = 0
    steps: int = 0


class SchedulingPolicy(ABC):
    """Orders requests and keeps per-iteration state; subclasses differ only in the key."""

    name: PolicyName
    #: Whether a better-ranked waiting request may evict a running one.
    preempts_running: bool = False
    #: Whether `rank_key` reads only what is fixed at arrival (score, arrival); its keys are then cached
    #: on the RankState, since sorting thousands of waiting requests every step is the adapter's main cost.
    static_rank_key: bool = True
    #: Whether the (cached) rank key moves with the output tokens generated: it changes only when
    #: `generated` reaches `next_boundary`, and `observe_step` then lists the request in `last_moved`.
    moves_keys: bool = False

    def __init__(self, starvation: StarvationConfig | None = None, preemption_patience: int = 0,
                 max_num_seqs: int | None = None) -> None:
        self.starvation = starvation
        self.preemption_patience = preemption_patience
        self.max_aged = starvation.max_aged(max_num_seqs) if starvation else math.inf
        self.stats = PolicyStats()
        #: Requests promoted by the latest `observe_step`, and those whose promotion ran out in it: the
        #: only requests whose sort keys that step changed, when the rank key is static.
        self.last_promoted: list[RankState] = []
        self.last_expired: list[RankState] = []
        #: Requests whose rank key the latest `observe_step` moved (generated tokens crossed a boundary).
        self.last_moved: list[RankState] = []
        self._held: dict[str, RankState] = {}
        self._aged_held = 0
        # Aging reads only the longest waiters: one heap per class (not aged, aged) of entries
        # (wait_start, arrival, seq, state). A request that runs only moves its `wait_start`; its entry goes
        # stale and is pushed again when it reaches the top, so a step costs O(scheduled), not O(held).
        # `_live_entry` maps each held request to the seq of its one live entry.
        self._wait_heaps: tuple[list[tuple[int, float, int, RankState]], ...] = ([], [])
        self._live_entry: dict[str, int] = {}
        self._entry_seq = count()

    @abstractmethod
    def rank_key(self, state: RankState) -> SortKey:
        """The policy's own order, before starvation promotion."""

    def key_horizon(self, state: RankState) -> float:
        """The `generated` count at which this request's rank key changes next (policies that move keys)."""
        return math.inf

    def sort_key(self, state: RankState) -> SortKey:
        if state.score_pending:
            return (SCORE_PENDING_TIER, state.arrival)
        if not self.static_rank_key:
            return (0.0 if state.promoted_left > 0 else 1.0, *self.rank_key(state), state.arrival)
        cache = state.key_cache
        if cache is None or cache[0] is not self:
            rank = self.rank_key(state)
            cache = state.key_cache = (self, (0.0, *rank, state.arrival), (1.0, *rank, state.arrival))
            if self.moves_keys:
                state.next_boundary = self.key_horizon(state)
        return cache[1] if state.promoted_left > 0 else cache[2]

    def order(self, states: Iterable[RankState]) -> list[RankState]:
        return sorted(states, key=self.sort_key)

    def keeps_seat(self, state: RankState) -> bool:
        """Whether the starvation rule protects this request's seat (rank and out-of-KV preemption)."""
        return state.aged and self.starvation is not None and self.starvation.keep_seat

    def running_key(self, state: RankState) -> SortKey:
        """Order of the running batch, best first: seat-keeping aged requests ahead of the rest, each part
        by `sort_key`. Engines evict from the end of the batch when KV runs out, so this key is what makes
        an aged request the last out-of-KV victim, not only exempt from rank preemption."""
        return (0.0 if self.keeps_seat(state) else 1.0, *self.sort_key(state))

    # -- the requests an engine holds --------------------------------------------------------------

    def track(self, state: RankState) -> None:
        """Start accounting a request that entered the engine; its wait starts now."""
        self._held[state.request_id] = state
        self._aged_held += state.aged
        state.wait_start = self.stats.steps
        if self.moves_keys:
            state.next_boundary = self.key_horizon(state)
        self._push_wait(state)

    def forget(self, request_id: str) -> None:
        """Stop accounting a request that left the engine (finished or aborted); unknown ids are ignored."""
        state = self._held.pop(request_id, None)
        if state is not None:
            self._aged_held -= state.aged
            self._live_entry.pop(request_id, None)

    def waited(self, state: RankState) -> int:
        """Iterations in a row the request has gone unscheduled (since it arrived, ran or was promoted)."""
        return self.stats.steps - state.wait_start

    def _push_wait(self, state: RankState) -> None:
        if self.starvation is None:
            return   # nothing ages: waits are still kept on the state, for preemption patience
        seq = next(self._entry_seq)
        self._live_entry[state.request_id] = seq
        heapq.heappush(self._wait_heaps[state.aged], (state.wait_start, state.arrival, seq, state))

    def _due(self, aged: bool, due_start: int, limit: float) -> list[RankState]:
        """Pop up to `limit` held requests of one class whose wait began at `due_start` or earlier, longest
        wait first, equal waits by arrival."""
        heap, due = self._wait_heaps[aged], []
        while heap and len(due) < limit and heap[0][0] <= due_start:
            wait_start, _, seq, state = heapq.heappop(heap)
            if self._live_entry.get(state.request_id) != seq:
                continue   # the request left the engine
            if state.wait_start != wait_start:
                self._push_wait(state)   # it ran since this entry was pushed
            else:
                due.append(state)
        return due

    def observe_step(self, scheduled: Mapping[str, int], generated: Mapping[str, int] | None = None) -> None:
        """Account one iteration. `scheduled` maps request id -> tokens scheduled for it this step;
        `generated` (needed when `moves_keys`) maps request id -> output tokens generated so far.

        Costs O(scheduled + promoted), not O(held): a scheduled request only gets its wait restarted, and
        aging pops only the longest waiters. At most `aged_share` of the seats go to aged requests; the
        longest waiters age first, equal waits in arrival order.
        """
        moved: list[RankState] = []
        outputs = generated if self.moves_keys else None
        steps = self.stats.steps = self.stats.steps + 1
        held, expired = self._held, []
        for request_id, tokens in scheduled.items():
            state = held.get(request_id)
            if state is None:
                continue
            if outputs is not None:
                output = outputs.get(request_id)
                if output is not None:
                    state.generated = output
                    if output >= state.next_boundary:
                        state.key_cache = None
                        state.next_boundary = self.key_horizon(state)
                        moved.append(state)
            if tokens <= 0:
                continue
            state.served_tokens += tokens
            state.wait_start = steps
            if state.promoted_left > 0:
                state.promoted_left -= 1
                if state.promoted_left == 0:
                    expired.append(state)
        self.last_moved = moved
        self.last_expired = expired
        self.last_promoted = []
        if self.starvation is None:
            return
        due_start = steps - self.starvation.threshold   # waited >= threshold from here back
        # Aged requests are promoted again freely (those still promoted wait on); new ones only into the
        # room left under the cap.
        aged_due = self._due(True, due_start, math.inf)
        for state in aged_due:
            if state.promoted_left > 0:
                self._push_wait(state)
        fresh = self._due(False, due_start, max(self.max_aged - self._aged_held, 0))
        self.last_promoted = [s for s in aged_due if s.promoted_left <= 0] + fresh
        for state in fresh:
            state.aged = True
            self._aged_held += 1
        for state in self.last_promoted:
            state.promoted_left = self.starvation.quantum
            state.wait_start = steps
            self._push_wait(state)
        self.stats.promotions += len(self.last_promoted)

    def preemption_victims(
        self,
        waiting: Iterable[RankState],
        running_worst_first: Iterable[RankState],
        free_seats: int,
        max_victims: int,
    ) -> list[RankState]:
        """Running requests to evict so better-ranked waiting ones can run this step.

        `waiting` must come in this policy's order (as `order()` returns it) and `running_worst_first` in
        the reverse order. Both are read lazily, only as far as candidates and victims are needed, so a
        caller may pass generators over a long queue and a full batch. `free_seats` is how many waiting
        requests fit without evicting anyone (batch slots and KV blocks, as the caller measures them).
        The worst running request is evicted for each waiting request beyond that which strictly
        outranks it and has waited `preemption_patience` iterations (promoted ones need not wait), at
        most `max_victims` per step. Aged requests are not victims when the starvation rule keeps their
        seat. Patience matters because eviction is recompute: a seat usually frees within a few
        iterations, and re-prefilling the victim costs every request in the batch.
        """
        if not self.preempts_running or max_victims <= 0:
            return []
        worst_first = (s for s in running_worst_first if not self.keeps_seat(s))
        worst = next(worst_first, None)
        if worst is None:
            return []
        # Waiting requests come best first: once one does not outrank the worst victim, none after it does.
        worst_key = self.sort_key(worst)
        outranking = takewhile(lambda s: self.sort_key(s) < worst_key, islice(waiting, max(free_seats, 0), None))
        blocked = (s for s in outranking if s.promoted or self.waited(s) >= self.preemption_patience)
        victims: list[RankState] = []
        for candidate, victim in zip(blocked, chain((worst,), worst_first)):
            if len(victims) >= max_victims or self.sort_key(candidate) >= self.sort_key(victim):
                break
            victims.append(victim)
        self.stats.rank_preemptions += len(victims)
        return victims


def admissible_count(needs: Iterable[tuple[int, int]], seats: int, free_blocks: int) -> int:
    """How many waiting requests, taken best-ranked first, the engine admits now without evicting anyone.

    Each request takes a seat and needs `required` free KV blocks to be admitted, of which admission then
    takes `taken` (vLLM checks that a whole prompt fits but allocates only its first chunk). The first
    request that does not fit stops admission, as in vLLM. `needs` is read lazily, at most `seats` items.
    The one rule behind rank preemption's "free seats", for the vLLM adapter and the simulator alike.
    """
    fits = 0
    if seats <= 0:
        return fits
    for required, taken in needs:
        if required > free_blocks:
            break
        free_blocks -= taken
        fits += 1
        if fits >= seats:
            break
    return fits


class FCFSPolicy(SchedulingPolicy):
    """Arrival order: vLLM's default."""

    name: PolicyName = "fcfs"

    def rank_key(self, state: RankState) -> SortKey:
        return ()


#: vLLM priority of an unscored request under "priority": below any score's (vLLM priorities are ints).
UNSCORED_PRIORITY = -(2**62)


class PriorityPolicy(SchedulingPolicy):
    """vLLM's `policy="priority"` fed the predicted score quantized to an integer; no rank preemption."""

    name: PolicyName = "priority"

    def __init__(self, levels_per_unit: float = 1.0) -> None:
        super().__init__(starvation=None)
        self.levels_per_unit = levels_per_unit

    def priority_of(self, score: float | None) -> int:
        """The integer priority vLLM gets for a score (lower runs first). A missing score gets
        `UNSCORED_PRIORITY`, below every quantized score, so it is served ahead of ranked work in arrival
        order, as the score convention says; vLLM breaks equal priorities by arrival."""
        value = usable_score(score)
        if value is None:
            return UNSCORED_PRIORITY
        return max(int(math.floor(value * self.levels_per_unit)), UNSCORED_PRIORITY + 1)

    def rank_key(self, state: RankState) -> SortKey:
        return (float(self.priority_of(state.score)),)


class MLFQPolicy(SchedulingPolicy):
    """FastServe-like multi-level feedback queue over served tokens, with optional skip-join.

    Level i holds a request for `base_quantum * 2**i` tokens before demoting it. Skip-join starts a
    request at the first level whose quantum covers its prompt, so long prefills don't block level 0.
    """

    name: PolicyName = "mlfq"
    preempts_running = True
    static_rank_key = False

    def __init__(self, base_quantum: int = 32, num_levels: int = 8, skip_join: bool = True,
                 starvation: StarvationConfig | None = None, preemption_patience: int = 0,
                 max_num_seqs: int | None = None) -> None:
        super().__init__(starvation, preemption_patience, max_num_seqs)
        if base_quantum < 1 or num_levels < 1:
            raise ValueError("MLFQ needs base_quantum >= 1 and num_levels >= 1")
        self.base_quantum = base_quantum
        self.num_levels = num_levels
        self.skip_join = skip_join

    def level(self, state: RankState) -> int:
        start = 0
        if self.skip_join:
            while start < self.num_levels - 1 and self.base_quantum * 2**start < state.prompt_len:
                start += 1
        level, budget = start, self.base_quantum * 2**start
        served = state.served_tokens
        while level < self.num_levels - 1 and served >= budget:
            served -= budget
            level += 1
            budget *= 2
        return level

    def rank_key(self, state: RankState) -> SortKey:
        return (float(self.level(state)),)


class RankPolicy(SchedulingPolicy):
    """Learning-to-rank order: ascending predicted score, unscored requests first in arrival order.

    With oracle scores (true output lengths) this is shortest-job-first.
    """

    name: PolicyName = "ltr"
    preempts_running = True

    def rank_key(self, state: RankState) -> SortKey:
        value = usable_score(state.score)
        return (0.0, 0.0) if value is None else (1.0, value)


class GittinsPolicy(SchedulingPolicy):
    """Gittins index over the request's calibrated length distribution, given the tokens it has generated.

    The score picks a bin of the distribution shipped with the predictor (`LengthDistribution`); the key
    is 1 / Gittins index (`gittins_remaining`), evaluated at the largest of the bin's quantiles the request
    has passed. So a key changes only when the request's output reaches its next quantile (a few dozen
    points at most), and a request that outlives its predicted length loses priority to fresh work instead of
    holding its place as under a static rank. Unscored requests keep the score convention (arrival
    order, ahead of ranked work). With `per_token` the index weighs completions by 1 / size, as mean
    per-token latency does.
    """

    name: PolicyName = "gittins"
    preempts_running = True
    moves_keys = True

    def __init__(self, distribution: LengthDistribution, per_token: bool = True, prefill_weight: float = 0.0,
                 starvation: StarvationConfig | None = None, preemption_patience: int = 0,
                 max_num_seqs: int | None = None) -> None:
        super().__init__(starvation, preemption_patience, max_num_seqs)
        self.distribution = distribution
        self.per_token = per_token
        self.prefill_weight = prefill_weight
        #: Per bin: its boundaries and the key before the first and after each one.
        self._tables = [(bounds, tuple(distribution.effective_remaining(b, a, per_token) for a in (0.0, *bounds)))
                        for b, bounds in ((b, distribution.boundaries(b)) for b in range(len(distribution.bins)))]

    def _table(self, state: RankState) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        value = usable_score(state.score)
        return None if value is None else self._tables[self.distribution.bin_of(value)]

    def rank_key(self, state: RankState) -> SortKey:
        table = self._table(state)
        if table is None:
            return (0.0, 0.0)
        if state.generated == 0 and self.prefill_weight > 0:
            # Before its first token a request still owes its prefill, work that comes first whatever
            # its output length; once it has produced a token that work is spent.
            return (1.0, self.distribution.effective_remaining(
                self.distribution.bin_of(usable_score(state.score)), 0.0, self.per_token,
                self.prefill_weight * state.prompt_len))
        bounds, keys = table
        return (1.0, keys[bisect.bisect_right(bounds, state.generated)])

    def key_horizon(self, state: RankState) -> float:
        table = self._table(state)
        if table is None:
            return math.inf
        bounds = table[0]
        if state.generated == 0 and self.prefill_weight > 0:
            return 1.0
        passed = bisect.bisect_right(bounds, state.generated)
        return bounds[passed] if passed < len(bounds) else math.inf


@dataclass(frozen=True)
class PolicyConfig:
    """Typed, validated choice of policy; built once at the edge (CLI, vLLM additional_config)."""

    name: PolicyName = "gittins"
    starvation: StarvationConfig | None = field(default_factory=StarvationConfig)
    max_preemptions_per_step: int = 4
    mlfq_base_quantum: int = 32
    mlfq_skip_join: bool = True
    priority_levels_per_unit: float = 1.0
    preemption_patience: int = 100
    #: Gittins: weigh completions by 1 / size (mean per-token latency) rather than 1 (mean latency).
    gittins_per_token: bool = True
    #: Gittins: work of one prompt token still to prefill, in output tokens (0: prompts are free). A prompt
    #: token costs about as much step time as a decode token, and a queued prefill delays every running
    #: request; 2 is the best of 0-4 in benchmarks/sim_gittins.py (A100 profile). CPU engines run 0
    #: (`ltr.scheduling.engine.CPU_POLICY_DEFAULTS`, measured on the CPU engine).
    gittins_prefill_weight: float = 2.0
    #: Gittins: a length distribution JSON (`ltr.predictor.length_distribution`); None: the shipped one.
    length_distribution: str | None = None

    def __post_init__(self) -> None:
        if self.name not in POLICY_NAMES:
            raise ValueError(f"unknown scheduling policy {self.name!r}; choose one of {', '.join(POLICY_NAMES)}")
        if self.max_preemptions_per_step < 0:
            raise ValueError("max_preemptions_per_step must be >= 0")
        if self.preemption_patience < 0:
            raise ValueError("preemption_patience must be >= 0")
        if self.mlfq_base_quantum < 1:
            raise ValueError("mlfq_base_quantum must be >= 1")
        if not (math.isfinite(self.gittins_prefill_weight) and self.gittins_prefill_weight >= 0):
            raise ValueError("gittins_prefill_weight must be a finite number >= 0")

    @property
    def runs_rank_scheduler(self) -> bool:
        """Whether engines run the adapter (gittins, ltr, mlfq); fcfs and priority run vLLM's own scheduler."""
        return self.name in ("ltr", "mlfq", "gittins")

    @property
    def reranks_by_late_scores(self) -> bool:
        """Whether engines order by the score and re-rank a request when its score lands after it (gittins,
        ltr): vLLM's priority queue fixes a request's place at arrival, fcfs and mlfq ignore the score."""
        return self.name in ("ltr", "gittins")

    _FIELDS = ("name", "starvation", "max_preemptions_per_step", "preemption_patience", "mlfq_base_quantum",
               "mlfq_skip_join", "priority_levels_per_unit", "gittins_per_token", "gittins_prefill_weight",
               "length_distribution")

    def to_mapping(self) -> dict[str, Any]:
        """Plain JSON-able dict (what travels in vLLM's `additional_config`)."""
        starvation = None if self.starvation is None else {
            "threshold": self.starvation.threshold, "quantum": self.starvation.quantum,
            "aged_share": self.starvation.aged_share, "keep_seat": self.starvation.keep_seat}
        return {"name": self.name, "starvation": starvation,
                "max_preemptions_per_step": self.max_preemptions_per_step,
                "preemption_patience": self.preemption_patience,
                "mlfq_base_quantum": self.mlfq_base_quantum, "mlfq_skip_join": self.mlfq_skip_join,
                "priority_levels_per_unit": self.priority_levels_per_unit,
                "gittins_per_token": self.gittins_per_token, "gittins_prefill_weight": self.gittins_prefill_weight,
                "length_distribution": self.length_distribution}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PolicyConfig:
        """Validate a plain dict (inverse of `to_mapping`); unknown keys or wrong types raise ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"policy config must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls._FIELDS))
        if unknown:
            raise ValueError(f"unknown policy config key(s) {unknown}; allowed: {list(cls._FIELDS)}")
        kwargs: dict[str, Any] = {}
        if "name" in data:
            kwargs["name"] = data["name"]
        if "starvation" in data:
            raw = data["starvation"]
            if raw is None or raw is False:
                kwargs["starvation"] = None
            elif isinstance(raw, Mapping):
                allowed = ["threshold", "quantum", "aged_share", "keep_seat"]
                extra = sorted(set(raw) - set(allowed))
                if extra:
                    raise ValueError(f"unknown starvation key(s) {extra}; allowed: {allowed}")
                values: dict[str, Any] = {k: _strict_int(f"starvation.{k}", raw[k])
                                          for k in ("threshold", "quantum") if k in raw}
                if raw.get("aged_share") is not None:
                    values["aged_share"] = _number("starvation.aged_share", raw["aged_share"])
                elif "aged_share" in raw:
                    values["aged_share"] = None
                if "keep_seat" in raw:
                    values["keep_seat"] = _strict_bool("starvation.keep_seat", raw["keep_seat"])
                kwargs["starvation"] = StarvationConfig(**values)
            else:
                raise ValueError("starvation must be null or a mapping with keys threshold (int), "
                                 "quantum (int), aged_share (float or null), keep_seat (bool)")
        for key in ("max_preemptions_per_step", "preemption_patience", "mlfq_base_quantum"):
            if key in data:
                kwargs[key] = _strict_int(key, data[key])
        for key in ("mlfq_skip_join", "gittins_per_token"):
            if key in data:
                kwargs[key] = _strict_bool(key, data[key])
        if data.get("length_distribution") is not None:
            if not isinstance(data["length_distribution"], str):
                raise ValueError(f"length_distribution must be a path string, got {data['length_distribution']!r}")
            kwargs["length_distribution"] = data["length_distribution"]
        if "gittins_prefill_weight" in data:
            kwargs["gittins_prefill_weight"] = _number("gittins_prefill_weight", data["gittins_prefill_weight"])
        if "priority_levels_per_unit" in data:
            value = _number("priority_levels_per_unit", data["priority_levels_per_unit"])
            if not value > 0:
                raise ValueError("priority_levels_per_unit must be a positive number")
            kwargs["priority_levels_per_unit"] = value
        return cls(**kwargs)

    def build(self, max_num_seqs: int | None = None) -> SchedulingPolicy:
        """The policy object; `max_num_seqs` (the engine's batch seats) sizes the aged-seat cap."""
        if self.name == "fcfs":
            return FCFSPolicy()
        if self.name == "priority":
            return PriorityPolicy(self.priority_levels_per_unit)
        if self.name == "mlfq":
            return MLFQPolicy(self.mlfq_base_quantum, skip_join=self.mlfq_skip_join,
                              starvation=self.starvation, preemption_patience=self.preemption_patience,
                              max_num_seqs=max_num_seqs)
        if self.name == "gittins":
            return GittinsPolicy(load_distribution(self.length_distribution), self.gittins_per_token,
                                 self.gittins_prefill_weight,
                                 starvation=self.starvation, preemption_patience=self.preemption_patience,
                                 max_num_seqs=max_num_seqs)
        return RankPolicy(starvation=self.starvation, preemption_patience=self.preemption_patience,
                          max_num_seqs=max_num_seqs)


#: The paper's aging rule, kept for comparison: promoted for the quantum, then evictable again; no cap on
#: aged requests; rank preemption as soon as a better-ranked request is blocked.
PAPER_RULE = PolicyConfig(name="ltr", starvation=StarvationConfig(200, 10, aged_share=None, keep_seat=False),
                          preemption_patience=0)


def _strict_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be a bool, got {value!r}")
    return value


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)


def _strict_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value
