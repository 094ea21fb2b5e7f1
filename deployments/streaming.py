"""Stream batching: an engine replica sends a streamed answer's SSE events to the ingress in fewer messages.

Every message from a replica is a Ray object that crosses two processes (replica -> ingress -> Serve's HTTP
proxy), and on a small machine those hops cost as much CPU as a model step: at 1.5 req/s on the 2-core box
the ingress, proxy and replica took 0.23 cores for ~70 tokens/s (benchmarks/README.md, "Probe: what plain
vLLM's engine really runs"). Ray Serve LLM batches its streams for the same reason (`stream_batching_interval_ms`,
50 ms by default). Here the events themselves stay exactly vLLM's (one per engine output, byte for byte); only
their transport is grouped: the first event goes at once (time to first token is unchanged), later ones are
joined into one message per interval, and the last goes as soon as the answer ends (latency is unchanged).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ltr.scheduling.engine import Platform

#: Seconds a replica gathers a stream's events into one message, per platform (`AppArgs.stream_batch_ms`
#: overrides). GPU: Ray Serve LLM's default, where tokens come ~100x faster than here. CPU: none; a 1 s
#: interval cut the ingress and proxy from 0.15-0.17 to 0.10-0.11 cores at ~75 tokens/s but moved neither the
#: service's CPU per token nor its latency beyond the box's noise (benchmarks/README.md, "Stream batching").
STREAM_BATCH_S: dict[Platform, float] = {"cpu": 0.0, "gpu": 0.05}


async def batched_events(events: AsyncIterator[str], interval_s: float) -> AsyncIterator[str]:
    """`events`, the first alone and then everything that arrived within each `interval_s`, joined.

    A reader task drains `events` while a message waits for its interval, so the source is never held up.
    Closing this generator cancels the reader, which stops `events` where it waits (vLLM then aborts the
    request); an error in `events` is raised here after the events before it were sent."""
    if interval_s <= 0:
        async for event in events:
            yield event
        return
    loop = asyncio.get_running_loop()
    pending: list[str] = []
    arrived = asyncio.Event()
    ended = asyncio.Event()

    async def read() -> None:
        try:
            async for event in events:
                pending.append(event)
                arrived.set()
        finally:
            ended.set()
            arrived.set()

    reader = loop.create_task(read())
    sent_at = -float("inf")
    try:
        while True:
            await arrived.wait()
            arrived.clear()
            hold = sent_at + interval_s - loop.time()
            if hold > 0 and not ended.is_set():
                try:
                    await asyncio.wait_for(ended.wait(), hold)
                except asyncio.TimeoutError:
                    pass
            if pending:
                message = "".join(pending)
                pending.clear()
                sent_at = loop.time()
                yield message
            if ended.is_set() and not pending:
                break
        reader.result()   # the source's error, if it ended with one
    finally:
        reader.cancel()   # closed early (client gone): the source is closed too; a no-op once it ended
