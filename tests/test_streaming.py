"""Stream batching (`deployments.streaming.batched_events`): what a replica sends the ingress is vLLM's events,
all of them, in order, fewer messages; the first and the last are never held; errors and closing pass through.
The real stack streams through it in tests/test_serve.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from deployments.app import AppArgs
from deployments.streaming import STREAM_BATCH_S, batched_events


async def _source(queue: asyncio.Queue) -> AsyncIterator[str]:
    """Yields what the test puts in `queue` until it puts None (or an exception, raised)."""
    while (item := await queue.get()) is not None:
        if isinstance(item, Exception):
            raise item
        yield item


async def _next(stream: AsyncIterator[str], timeout: float = 5.0) -> str:
    return await asyncio.wait_for(stream.__anext__(), timeout)


def test_first_event_alone_then_joined_then_the_end_at_once() -> None:
    async def run() -> None:
        queue: asyncio.Queue = asyncio.Queue()
        stream = batched_events(_source(queue), interval_s=30.0)
        queue.put_nowait("data: 0\n\n")
        assert await _next(stream) == "data: 0\n\n"           # time to first token is not held
        for i in (1, 2, 3):
            queue.put_nowait(f"data: {i}\n\n")
        await asyncio.sleep(0.05)                              # within the interval: nothing is sent yet
        pending = asyncio.ensure_future(_next(stream))
        await asyncio.sleep(0.05)
        assert not pending.done()
        queue.put_nowait("data: [DONE]\n\n")
        queue.put_nowait(None)                                 # the answer ends: sent now, not after 30 s
        assert await pending == "data: 1\n\ndata: 2\n\ndata: 3\n\ndata: [DONE]\n\n"
        with pytest.raises(StopAsyncIteration):
            await _next(stream)

    asyncio.run(run())


def test_events_after_the_interval_go_in_the_next_message() -> None:
    async def run() -> list[str]:
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait("a")
        stream = batched_events(_source(queue), interval_s=0.2)
        messages = [await _next(stream)]
        queue.put_nowait("b")                                  # held until 0.2 s after "a" went
        messages.append(await _next(stream))
        queue.put_nowait("c")
        queue.put_nowait(None)
        messages += [m async for m in stream]
        return messages

    assert asyncio.run(run()) == ["a", "b", "c"]


def test_zero_interval_sends_every_event_alone() -> None:
    async def run() -> list[str]:
        queue: asyncio.Queue = asyncio.Queue()
        for item in ("a", "b", "c", None):
            queue.put_nowait(item)
        return [m async for m in batched_events(_source(queue), interval_s=0.0)]

    assert asyncio.run(run()) == ["a", "b", "c"]


def test_an_error_comes_after_the_events_before_it() -> None:
    async def run() -> list[str]:
        queue: asyncio.Queue = asyncio.Queue()
        for item in ("a", "b", RuntimeError("engine died")):
            queue.put_nowait(item)
        got: list[str] = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for message in batched_events(_source(queue), interval_s=10.0):
                got.append(message)
        return got

    assert asyncio.run(run()) == ["ab"]   # both were there at once; the error follows them


def test_closing_early_stops_the_source() -> None:
    """The client went away: the source is stopped where it waits (vLLM aborts the request there)."""
    async def run() -> list[str]:
        stopped: list[str] = []
        queue: asyncio.Queue = asyncio.Queue()

        async def source() -> AsyncIterator[str]:
            try:
                async for item in _source(queue):
                    yield item
            except asyncio.CancelledError:
                stopped.append("cancelled")
                raise

        stream = batched_events(source(), interval_s=10.0)
        queue.put_nowait("a")
        assert await _next(stream) == "a"
        await stream.aclose()
        await asyncio.sleep(0.05)
        return stopped

    assert asyncio.run(run()) == ["cancelled"]


def test_interval_by_platform_and_configured() -> None:
    assert AppArgs(model="/m").engine_spec("/m").stream_batch_s == STREAM_BATCH_S["cpu"]
    assert AppArgs(model="/m", engine_num_gpus=1).engine_spec("/m").stream_batch_s == STREAM_BATCH_S["gpu"] == 0.05
    for gpus in (0, 1):
        assert AppArgs(model="/m", engine_num_gpus=gpus, stream_batch_ms=250).engine_spec("/m").stream_batch_s == 0.25
    with pytest.raises(ValueError, match="stream_batch_ms"):
        AppArgs(stream_batch_ms=-1)
