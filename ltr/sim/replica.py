"""One simulated vLLM replica: iteration-level continuous batching driven by the shared policy core.

Each `step()` mirrors vLLM V1's scheduler as the LTR adapter (ltr/scheduling/vllm_scheduler.py) shapes it:

1. rank preemption — if the policy preempts (LTR, MLFQ), `policy.preemption_victims()` picks running
   requests that better-ranked waiting ones should replace; they go back to waiting (recompute) and,
   as in the adapter, sit out the rest of this step;
2. running requests, best-ranked first, get their next tokens (a decode token, or the next prefill
   chunk under the token budget); when KV blocks run out the *worst-ranked* running request is
   preempted (vLLM's out-of-KV path, which the adapter points at the worst rank);
3. if step 2 preempted nobody, waiting requests are admitted best-ranked first while `max_num_seqs`,
   the token budget (`max_num_batched_tokens`; a prompt that does not fit is chunked, or with chunked prefill
   off waits) and free KV blocks allow;
4. the step takes `StepTimeModel.step_time(shape)` seconds; sequences whose computed tokens reach their
   length sample one token; `policy.observe_step()` updates served tokens and starvation state.

Preemption is by recompute, as in vLLM V1: the victim keeps its generated tokens, drops its KV blocks and
later re-prefills prompt + generated tokens. With prefix caching (vLLM's default) freed blocks join the tail of
a FIFO free-block queue, the victim's last block first, and keep their contents until allocation pops them
from the head; on re-admission the victim's surviving full-block prefix is reused and only the rest is
recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ltr.scheduling.policy import PolicyConfig, RankState, SchedulingPolicy, admissible_count
from ltr.sim.profile import HardwareProfile
from ltr.sim.workload import SimRequest


@dataclass(eq=False)
class SimSeq:
    """Engine-side state of one request inside a replica."""

    req: SimRequest
    state: RankState
    replica: int
    generated: int = 0
    computed: int = 0
    blocks: int = 0
    first_token: float | None = None
    finish: float | None = None
    preemptions: int = 0
    #: Step index of the last step this request was scheduled in (or arrived before).
    last_step: int = -1
    #: Longest run of consecutive steps this request sat unscheduled while in the replica.
    max_idle_steps: int = 0
    scheduled_tokens: int = 0
    #: Where this request's blocks went in the free-block queue when it was last preempted:
    #: (queue tail position before the push, blocks pushed, full blocks among them).
    evicted_at: tuple[int, int, int] | None = None

    @property
    def num_tokens(self) -> int:
        return self.req.prompt_len + self.generated


@dataclass
class StepShape:
    """What one step computed; the step-time model's inputs."""

    prefill_tokens: int = 0
    decode_seqs: int = 0
    kv_tokens: int = 0
    num_seqs: int = 0


@dataclass
class ReplicaStats:
    steps: int = 0
    busy_time: float = 0.0
    kv_preemptions: int = 0
    rank_preemptions: int = 0
    max_waiting: int = 0
    shapes: list[StepShape] = field(default_factory=list)


class Replica:
    """Continuous batching on one engine; the cluster loop calls `step()` whenever the replica is free."""

    def __init__(self, index: int, profile: HardwareProfile, policy_config: PolicyConfig,
                 record_shapes: bool = False) -> None:
        self.index = index
        self.profile = profile
        self.limits = profile.limits
        self.policy: SchedulingPolicy = policy_config.build(profile.limits.max_num_seqs)
        self.max_victims = policy_config.max_preemptions_per_step
        self.waiting: dict[str, SimSeq] = {}
        self.running: dict[str, SimSeq] = {}
        self.free_blocks = self.limits.num_kv_blocks
        self.stats = ReplicaStats()
        self.record_shapes = record_shapes
        self.outstanding_work = 0.0
        # Free-block queue positions: blocks ever pushed to its tail / ever popped from its head.
        self._pushed = self.limits.num_kv_blocks
        self._popped = 0

    # -- queue -------------------------------------------------------------------------------------
    def add(self, seq: SimSeq) -> None:
        blocks = self._blocks_for(seq.num_tokens)
        if blocks > self.limits.num_kv_blocks:
            raise ValueError(f"request {seq.req.request_id} needs {blocks} KV blocks for its prompt; "
                             f"the replica has {self.limits.num_kv_blocks}")
        seq.last_step = self.stats.steps - 1
        self.waiting[seq.req.request_id] = seq
        self.policy.track(seq.state)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def queue_len(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- helpers -----------------------------------------------------------------------------------
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.limits.block_size)

    def _ordered(self, seqs: dict[str, SimSeq]) -> list[SimSeq]:
        return [seqs[s.request_id] for s in self.policy.order(s.state for s in seqs.values())]

    def _ordered_running(self) -> list[SimSeq]:
        """The running batch best first by the policy's `running_key`, as the adapter keeps vLLM's."""
        return sorted(self.running.values(), key=lambda seq: self.policy.running_key(seq.state))

    def _allocate(self, seq: SimSeq, blocks: int) -> None:
        self.free_blocks -= blocks
        self._popped += blocks
        seq.blocks += blocks

    def _release(self, seq: SimSeq) -> None:
        self.free_blocks += seq.blocks
        self._pushed += seq.blocks
        seq.blocks = 0

    def _preempt(self, seq: SimSeq) -> None:
        del self.running[seq.req.request_id]
        seq.evicted_at = (self._pushed, seq.blocks, seq.computed // self.limits.block_size)
        self._release(seq)
        seq.computed = 0
        seq.preemptions += 1
        self.waiting[seq.req.request_id] = seq

    def _cached_prefix_blocks(self, seq: SimSeq) -> int:
        """Full blocks of an evicted request that allocation has not reached yet (reusable on re-admission)."""
        if seq.evicted_at is None or not self.limits.prefix_caching:
            return 0
        tail, pushed, full = seq.evicted_at
        # Pushed last-block-first, so prefix block k sits at queue position tail + pushed - 1 - k.
        alive = min(full, max(0, tail + pushed - self._popped))
        # vLLM always recomputes at least the last token.
        return min(alive, (seq.num_tokens - 1) // self.limits.block_size)

    def _chunk(self, seq: SimSeq, token_budget: int, multiple: bool) -> int:
        num_new = seq.num_tokens - seq.computed
        threshold = self.limits.long_prefill_token_threshold
        if multiple and 0 < threshold < num_new:
            num_new = threshold
        if num_new > token_budget and not self.limits.chunked_prefill:
            return 0
        return min(num_new, token_budget)

    def _free_seats(self, ordered_waiting: list[SimSeq]) -> int:
        """Best-ranked waiting requests that fit now without evicting anyone (`admissible_count`).

        The simulated engine needs, and takes, blocks for a request's tokens + 1.
        """
        needs = ((blocks, blocks) for blocks in (self._blocks_for(seq.num_tokens + 1) for seq in ordered_waiting))
        return admissible_count(needs, self.limits.max_num_seqs - len(self.running), self.free_blocks)

    # -- one iteration -----------------------------------------------------------------------------
    def step(self, now: float) -> tuple[float, list[SimSeq]]:
        """Run one engine iteration starting at `now`; returns (end time, requests finished in it)."""
        limits = self.limits
        step_index = self.stats.steps
        present = [*self.waiting.values(), *self.running.values()]
        multiple = len(present) > 1
        self.stats.max_waiting = max(self.stats.max_waiting, len(self.waiting))

        # 1. rank preemption (the policy decides; FCFS/priority never preempt for rank)
        ordered_waiting: list[SimSeq] | None = None
        sitting_out: set[str] = set()
        if self.policy.preempts_running and self.max_victims > 0 and self.waiting and self.running:
            ordered_waiting = self._ordered(self.waiting)
            free_seats = self._free_seats(ordered_waiting)
            if free_seats < len(ordered_waiting):
                victims = self.policy.preemption_victims(
                    [s.state for s in ordered_waiting],
                    [seq.state for seq in reversed(self._ordered_running())],
                    free_seats, self.max_victims)
                for state in victims:
                    self._preempt(self.running[state.request_id])
                    sitting_out.add(state.request_id)   # as in the adapter: no evict + resume in one step
                if victims:
                    self.stats.rank_preemptions += len(victims)
                    ordered_waiting = None

        # 2. running requests, best-ranked first; out of KV -> evict the worst-ranked
        token_budget = limits.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        run_list = self._ordered_running()
        kv_preempted = False
        i = 0
        while i < len(run_list) and token_budget > 0:
            seq = run_list[i]
            num_new = self._chunk(seq, token_budget, multiple)
            need = self._blocks_for(seq.computed + num_new) - seq.blocks
            evicted_self = False
            while need > self.free_blocks:
                victim = run_list.pop()
                self._preempt(victim)
                self.stats.kv_preemptions += 1
                kv_preempted = True
                if victim is seq:
                    evicted_self = True
                    break
            if evicted_self:
                break
            self._allocate(seq, need)
            scheduled[seq.req.request_id] = num_new
            token_budget -= num_new
            i += 1

        # 3. admit waiting requests, best-ranked first (vLLM skips this after an out-of-KV preemption)
        if not kv_preempted and self.waiting and token_budget > 0 and len(self.running) < limits.max_num_seqs:
            if ordered_waiting is None:
                ordered_waiting = self._ordered(self.waiting)
            for seq in ordered_waiting:
                if token_budget <= 0 or len(self.running) >= limits.max_num_seqs:
                    break
                if seq.req.request_id in sitting_out:
                    continue
                cached = self._cached_prefix_blocks(seq)
                seq.computed = cached * limits.block_size
                num_new = self._chunk(seq, token_budget, multiple)
                need = self._blocks_for(seq.computed + num_new) - cached
                if num_new == 0 or cached + need > self.free_blocks:
                    seq.computed = 0
                    break
                del self.waiting[seq.req.request_id]
                self.running[seq.req.request_id] = seq
                seq.evicted_at = None
                self.free_blocks -= cached   # reused in place: not popped from the queue head
                seq.blocks = cached
                self._allocate(seq, need)
                scheduled[seq.req.request_id] = num_new
                token_budget -= num_new

        if not scheduled:
            raise RuntimeError(f"replica {self.index}: nothing schedulable at t={now:.3f} "
                               f"({len(self.waiting)} waiting, {len(self.running)} running)")

        # 4. step time from the step's shape, then apply it
        shape = StepShape(num_seqs=len(scheduled))
        by_id = self.running
        for rid, num_new in scheduled.items():
            seq = by_id[rid]
            end = seq.computed + num_new
            shape.kv_tokens += end
            if end == seq.num_tokens:
                shape.decode_seqs += 1
            if not (num_new == 1 and seq.generated > 0 and seq.computed == seq.num_tokens - 1):
                shape.prefill_tokens += num_new
        duration = self.profile.step.step_time(shape.prefill_tokens, shape.decode_seqs, shape.kv_tokens)
        t_end = now + duration

        finished: list[SimSeq] = []
        for rid, num_new in scheduled.items():
            seq = by_id[rid]
            idle = step_index - seq.last_step - 1
            if idle > seq.max_idle_steps:
                seq.max_idle_steps = idle
            seq.last_step = step_index
            seq.scheduled_tokens += num_new
            seq.computed += num_new
            if seq.computed == seq.num_tokens:
                seq.generated += 1
                if seq.first_token is None:
                    seq.first_token = t_end
                if seq.generated >= seq.req.output_len:
                    seq.finish = t_end
                    finished.append(seq)
        generated = {rid: by_id[rid].generated for rid in scheduled} if self.policy.moves_keys else None
        for seq in finished:
            del self.running[seq.req.request_id]
            self._release(seq)

        self.policy.observe_step(scheduled, generated)
        for seq in finished:   # after the step: they still counted toward it (as in the engine)
            self.policy.forget(seq.req.request_id)
        self.stats.steps += 1
        self.stats.busy_time += duration
        if self.record_shapes:
            self.stats.shapes.append(shape)
        return t_end, finished

    def close_idle_runs(self) -> None:
        """Account the trailing unscheduled run of requests still waiting (none once a run completes)."""
        for seq in [*self.waiting.values(), *self.running.values()]:
            seq.max_idle_steps = max(seq.max_idle_steps, self.stats.steps - seq.last_step - 1)


def new_seq(req: SimRequest, replica: int) -> SimSeq:
    return SimSeq(req=req, replica=replica,
                  state=RankState(request_id=req.request_id, arrival=req.arrival, score=req.score,
                                  prompt_len=req.prompt_len))

