"""Served-traffic log: records from finished vLLM requests, rotation under a size cap, torn tails, writers."""

from __future__ import annotations

import os
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest
from vllm import SamplingParams
from vllm.v1.request import Request, RequestStatus

from ltr.data.served_log import (
    ServedLogConfig,
    ServedLogWriter,
    ServedRecord,
    log_extra_args,
    read_served_log,
    record_from_request,
    segment_paths,
    text_sha256,
)


def _record(i: int, text: str | None = None) -> ServedRecord:
    return ServedRecord(time=1000.0 + i, model="m", request_id=f"r{i}", finish_reason="stop",
                        output_tokens=i, max_tokens=64, prompt_tokens=3, score=i / 10,
                        predictor_version="v1", input_sha256=f"{i:064x}", input_chars=5, text=text)


def _finished_request(extra: dict, output: list[int], status: RequestStatus) -> Request:
    params = SamplingParams(max_tokens=8, extra_args={"ltr_score": 1.25, **extra})
    request = Request(request_id="req-1", prompt_token_ids=[1, 2, 3, 4], sampling_params=params,
                      pooling_params=None)
    request.append_output_token_ids(output)
    request.status = status
    return request


def test_record_from_a_finished_vllm_request(tmp_path: Path) -> None:
    prompt = "<|im_start|>user\nWhat is 2+2?<|im_end|>"
    hashed = log_extra_args(prompt, "abc123@256", include_text=False)
    assert "ltr_input_text" not in hashed and hashed["ltr_input_sha256"] == text_sha256(prompt)
    assert "ltr_conversation_sha256" not in hashed                   # not given: e.g. a late score's fields
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert "ltr_input_messages" not in log_extra_args(prompt, None, include_text=False, messages=messages)
    request = _finished_request(log_extra_args(prompt, "abc123@256", include_text=True,
                                               conversation="What is 2+2?", messages=messages), [7] * 8,
                                RequestStatus.FINISHED_LENGTH_CAPPED)
    record = record_from_request(request, "SmolLM2", now=5.0)
    assert record == ServedRecord(time=5.0, model="SmolLM2", request_id="req-1", finish_reason="length",
                                  output_tokens=8, max_tokens=8, prompt_tokens=4, score=1.25,
                                  predictor_version="abc123@256", input_sha256=text_sha256(prompt),
                                  input_chars=len(prompt), text=prompt,
                                  conversation_sha256=text_sha256("What is 2+2?"), messages=messages)
    assert record.censored
    stopped = record_from_request(_finished_request({}, [7, 7, 2], RequestStatus.FINISHED_STOPPED), "m")
    assert (stopped.finish_reason, stopped.output_tokens, stopped.censored) == ("stop", 3, False)
    assert stopped.predictor_version is None and stopped.text is None   # no predictor: unattributed
    assert stopped.conversation_sha256 is None and stopped.messages is None
    with pytest.raises(ValueError, match="not finished"):
        record_from_request(_finished_request({}, [7], RequestStatus.RUNNING), "m")

    writer = ServedLogWriter(ServedLogConfig(directory=str(tmp_path), writer_id="replica-0"))
    writer.write(record)
    writer.write(stopped)
    writer.close()
    assert list(read_served_log(tmp_path)) == [record, stopped]


def test_rotation_keeps_the_folder_under_its_cap(tmp_path: Path) -> None:
    rng = random.Random(0)
    noise = lambda: "".join(rng.choices(string.ascii_letters, k=400))  # noqa: E731  (incompressible)
    config = ServedLogConfig(directory=str(tmp_path), segment_bytes=2048, max_total_bytes=8192,
                             writer_id="w")
    writer = ServedLogWriter(config)
    written = [_record(i, noise()) for i in range(300)]
    for record in written:
        writer.write(record)
        on_disk = sum(p.stat().st_size for p in segment_paths(tmp_path))
        assert on_disk <= config.max_total_bytes + config.segment_bytes   # closed segments + the open one
    writer.close()
    sizes = [p.stat().st_size for p in segment_paths(tmp_path)]
    assert len(sizes) >= 3 and sum(sizes) <= config.max_total_bytes
    assert writer.segments_deleted > 0
    kept = list(read_served_log(tmp_path))
    # What is left is the newest records, complete and in order.
    assert kept == written[-len(kept):] and 0 < len(kept) < len(written)


def test_reader_sees_flushed_records_of_an_open_segment_and_skips_a_torn_tail(tmp_path: Path) -> None:
    writer = ServedLogWriter(ServedLogConfig(directory=str(tmp_path), writer_id="w"))
    for i in range(5):
        writer.write(_record(i))
    writer.flush()
    assert [r.request_id for r in read_served_log(tmp_path)] == [f"r{i}" for i in range(5)]
    writer.write(_record(5))
    writer.close()
    (segment,) = segment_paths(tmp_path)
    data = segment.read_bytes()
    # A crash mid-write: the stream is cut inside the last record (and has no gzip trailer).
    torn = tmp_path / "torn"
    torn.mkdir()
    for cut in range(len(data) - 9, 20, -7):
        (torn / segment.name).write_bytes(data[:cut])
        records = list(read_served_log(torn))
        assert records == [_record(i) for i in range(len(records))]
    bad = tmp_path / "bad"
    bad.mkdir()
    other = ServedLogWriter(ServedLogConfig(directory=str(bad), writer_id="w"))
    other.write(_record(0))
    other._gz.write(b'{"not": "a record"\n')   # a complete but malformed line
    other.close()
    with pytest.raises(ValueError, match=r":2: not a served-log record"):
        list(read_served_log(bad))


#: One writer process: imports only the log module (no vLLM), as an engine-core process would use it.
_WRITER = """
import sys
from ltr.data.served_log import ServedLogConfig, ServedLogWriter, ServedRecord
directory, writer, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
log = ServedLogWriter(ServedLogConfig(directory=directory, writer_id=writer, segment_bytes=1024,
                                      max_total_bytes=2**30))
for i in range(n):
    log.write(ServedRecord(time=float(i), model="m", request_id=f"{writer}-{i}", finish_reason="stop",
                           output_tokens=i, max_tokens=64, prompt_tokens=3, score=0.5, predictor_version="v",
                           input_sha256=None, input_chars=None, text="x" * (i % 97)))
log.close()
"""


def test_several_processes_share_one_folder(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), f"replica-{k}", "400"])
             for k in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    names = [p.name for p in segment_paths(tmp_path)]
    assert all(any(f"replica-{k}-" in n for n in names) for k in range(3))
    ids = [r.request_id for r in read_served_log(tmp_path)]
    assert sorted(ids) == sorted(f"replica-{k}-{i}" for k in range(3) for i in range(400))
    for k in range(3):   # each writer's records in its own order
        mine = [int(i.rsplit("-", 1)[1]) for i in ids if i.startswith(f"replica-{k}-")]
        assert mine == sorted(mine)
    assert os.getpid() not in {int(n.split("-")[3]) for n in names}


def test_config_is_validated_at_the_edge(tmp_path: Path) -> None:
    assert ServedLogConfig.from_mapping(None) is None
    config = ServedLogConfig.from_mapping({"directory": tmp_path, "segment_bytes": 4096})
    assert config == ServedLogConfig(directory=str(tmp_path), segment_bytes=4096)
    with pytest.raises(ValueError, match="unknown served_log key"):
        ServedLogConfig.from_mapping({"directory": "x", "segment_size": 1})
    with pytest.raises(ValueError, match="segment_bytes: wrong type"):
        ServedLogConfig.from_mapping({"directory": "x", "segment_bytes": "1MB"})
    with pytest.raises(ValueError, match="max_total_bytes must be >= segment_bytes"):
        ServedLogConfig(directory="x", segment_bytes=4096, max_total_bytes=2048)
    with pytest.raises(FileNotFoundError):
        list(read_served_log(tmp_path / "missing"))


# ---- written by the rank scheduler: every finished request, live ranking quality in its stats ----------

def test_the_scheduler_logs_finished_requests_and_tracks_live_tau(tiny_model_path: Path, tmp_path: Path) -> None:
    from vllm.v1.request import RequestStatus

    from ltr.data.served_log import VERSION_KEY, read_served_log
    from ltr.scheduling.policy import PolicyConfig
    from ltr.scheduling.vllm_scheduler import RankScheduler
    from sched_harness import Driver, make_request, make_scheduler, token_for

    log_dir = tmp_path / "served"
    scheduler = make_scheduler(tiny_model_path, RankScheduler, policy=PolicyConfig(name="ltr", starvation=None),
                               async_scheduling=False, max_num_seqs=4, num_blocks=200,
                               served_log={"directory": str(log_dir), "writer_id": "replica-a"})
    driver = Driver(scheduler)
    # Five answers stop on their own; the last is cut at max_tokens (a lower bound, still longer than all
    # five). Scores rank the lengths except one swapped pair: 15 comparable pairs, 1 discordant.
    lengths = [4, 8, 12, 16, 20, 24]
    scores = [1.0, 2.0, 4.0, 3.0, 5.0, 6.0]
    for i, (n, score) in enumerate(zip(lengths, scores)):
        request = make_request(f"r{i}", 16, 24 if i == 5 else 100, score)
        if i < 5:
            request.sampling_params.stop_token_ids = [token_for(f"r{i}", n - 1)]
        request.sampling_params.extra_args[VERSION_KEY] = "v1"
        driver.add(request)
    aborted = make_request("gone", 16, 50, 0.5)
    aborted.sampling_params.extra_args[VERSION_KEY] = "v1"
    driver.add(aborted)
    driver.step()
    scheduler.finish_requests("gone", RequestStatus.FINISHED_ABORTED)
    driver.run_until_idle(max_steps=200)
    live = scheduler.stats()["live_quality"]
    assert live["versions"]["v1"]["n"] == 6                     # the aborted request is no label
    assert live["versions"]["v1"]["kendall_tau"] == pytest.approx(13 / 15)
    # ... and /metrics carries it per engine replica and predictor version.
    from prometheus_client.parser import text_string_to_metric_families

    from deployments.metrics import prometheus_text

    text = prometheus_text("ingress-1", {}, {"replica-1": {"scheduler": scheduler.stats()}}).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    labels = (("predictor_version", "v1"), ("replica", "replica-1"))
    assert samples[("ltr_live_kendall_tau", labels)] == pytest.approx(13 / 15)
    assert samples[("ltr_live_tau_window_requests", labels)] == 6
    assert samples[("ltr_live_tau_censored_requests", labels)] == 1
    scheduler.shutdown()
    records = {r.request_id: r for r in read_served_log(log_dir)}
    assert set(records) == {f"r{i}" for i in range(6)} | {"gone"}
    assert [records[f"r{i}"].output_tokens for i in range(6)] == lengths
    assert [records[f"r{i}"].finish_reason for i in range(6)] == ["stop"] * 5 + ["length"]
    assert live["versions"]["v1"]["censored"] == 1
    assert records["gone"].finish_reason == "abort"
    assert records["r3"].score == 3.0 and records["r3"].predictor_version == "v1"
