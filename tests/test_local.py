"""`python -m deployments.local` (what `bash scripts/serve.sh` runs): the engine layout it fits to the machine
(`deployments.machine`), its command-line overrides, and one real start on this machine: the printed layout,
an OpenAI-client request, the engines' threads as their processes see them, and a clean SIGTERM shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from deployments.app import AppArgs, PredictorArgs
from deployments.local import (QUIET_SERVE_ENV, app_args, engine_layout, parse_args, predictor_args, serve_env,
                               stop_haproxy)
from deployments.machine import ENGINE_NICE, PREDICTOR_REPLICAS, PREDICTOR_THREADS, SEATS_PER_THREAD, EngineLayout, \
    fit_to_machine
from ltr.scheduling.engine_session import autogroup_enabled

REPO = Path(__file__).resolve().parents[1]
RESERVED = AppArgs.model_fields["ingress_num_cpus"].default + PredictorArgs.model_fields["num_cpus"].default


@pytest.mark.parametrize("cpus,memory_gib,replicas,threads,nice,predictor", [
    (1, 8.0, 1, 1, ENGINE_NICE, (1, 1)),   # one core: one engine on it, below the predictor and the ingress
    # this box: one engine on both cores (peer_bench: it beat two one-thread engines near saturation), two
    # one-thread predictors
    (2, 23.0, 1, 2, ENGINE_NICE, (2, 1)),
    (3, 23.0, 1, 2, 0, (1, None)),          # a spare core: the engine need not yield
    (8, 64.0, 4, 2, ENGINE_NICE, (PREDICTOR_REPLICAS, PREDICTOR_THREADS)),
    (16, 6.0, 1, 2, 0, (1, None)),         # memory-bound: one engine, cores to spare for everything else
])
def test_fit_to_machine(cpus: int, memory_gib: float, replicas: int, threads: int, nice: int,
                        predictor: tuple[int, int | None]) -> None:
    budget = max(cpus - RESERVED, 0.4)
    layout = fit_to_machine(cpus, memory_gib, budget)
    assert (layout.replicas, layout.threads, layout.max_num_seqs, layout.nice) == \
        (replicas, threads, SEATS_PER_THREAD * threads, nice)
    assert (layout.predictor_replicas, layout.predictor_threads) == predictor
    assert layout.spin_wait == (threads > 1) and layout.worker_in_core
    assert layout.replicas * layout.num_cpus <= budget + 1e-9
    assert "peer_bench_incore" in layout.reason


def test_engine_env_sets_threads_and_passive_wait_only_for_several() -> None:
    one = EngineLayout(replicas=2, threads=1, num_cpus=0.7, max_num_seqs=16, nice=0, reason="r")
    two = EngineLayout(replicas=1, threads=2, num_cpus=1.4, max_num_seqs=16, nice=0, reason="r")
    assert one.engine_env() == {"OMP_NUM_THREADS": "1"}
    assert two.engine_env() == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    for bad in ({"replicas": 0}, {"nice": 20}, {"predictor_replicas": 0}, {"predictor_threads": 0}):
        with pytest.raises(ValueError):
            EngineLayout(**{"replicas": 1, "threads": 1, "num_cpus": 1.0, "max_num_seqs": 16, "nice": 0,
                            "reason": "r", **bad})


def test_command_line_overrides_the_fitted_layout() -> None:
    budget = 2 - RESERVED
    fitted = engine_layout(parse_args([]), 2, 23.0, 2)
    assert fitted == fit_to_machine(2, 23.0, budget)
    assert fitted.engine_env() == {"OMP_NUM_THREADS": "2"} and "OpenMP spin wait" in fitted.describe()
    halves = engine_layout(parse_args(["--replicas", "2"]), 2, 23.0, 2)   # the layout before 2026-12-05
    assert (halves.replicas, halves.threads, halves.num_cpus) == (2, 1, round(budget / 2, 3))
    assert halves.max_num_seqs == SEATS_PER_THREAD   # seats follow the threads unless given
    assert halves.reason == "set by --replicas" and "2 replicas x 1 thread" in halves.describe()
    assert "OpenMP spin wait" not in halves.describe() and halves.engine_env() == {"OMP_NUM_THREADS": "1"}
    one = engine_layout(parse_args(["--replicas", "1"]), 2, 23.0, 2)   # one engine gets the whole budget
    assert (one.replicas, one.threads, one.num_cpus) == (1, 2, round(budget, 3))
    passive = engine_layout(parse_args(["--no-engine-spin-wait"]), 2, 23.0, 2)
    assert (passive.threads, passive.engine_env()["OMP_WAIT_POLICY"]) == (2, "PASSIVE")
    assert passive.reason == "set by --engine-spin-wait" and "OpenMP spin wait" not in passive.describe()
    seats = engine_layout(parse_args(["--max-num-seqs", "8", "--engine-threads", "1"]), 2, 23.0, 2)
    assert (seats.replicas, seats.threads, seats.max_num_seqs) == (fitted.replicas, 1, 8)
    assert "--engine-threads" in seats.reason and "--max-num-seqs" in seats.reason
    with pytest.raises(SystemExit):   # two engines of 1 Ray CPU do not fit 2 CPUs less ingress and predictor
        engine_layout(parse_args(["--replicas", "2", "--engine-cpus", "1"]), 2, 23.0, 2)
    same_priority = engine_layout(parse_args(["--engine-nice", "0"]), 2, 23.0, 2)
    assert (same_priority.nice, same_priority.replicas) == (0, fitted.replicas)
    assert same_priority.reason == "set by --engine-nice" and "nice" not in same_priority.describe().split(";")[0]
    assert f"nice {ENGINE_NICE}, OpenMP spin wait, predictor 2 x 1 thread;" in fitted.describe()
    old_predictor = engine_layout(parse_args(["--predictor-replicas", "1", "--predictor-threads", "2"]), 2, 23.0, 2)
    assert (old_predictor.predictor_replicas, old_predictor.predictor_threads) == (1, 2)
    assert old_predictor.reason == "set by --predictor-replicas, --predictor-threads"
    assert ", predictor 2 threads;" in old_predictor.describe()
    for bad in (["--replicas", "0"], ["--engine-nice", "20"], ["--predictor-replicas", "0"],
                ["--predictor-threads", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    no_predictor = engine_layout(parse_args(["--no-predictor"]), 2, 23.0, 2)
    assert no_predictor.num_cpus * no_predictor.replicas > fitted.num_cpus * fitted.replicas


def test_http_front_defaults_to_haproxy_with_its_files_in_the_service_dir() -> None:
    assert parse_args([]).http_front == "haproxy" and parse_args(["--http-front", "proxy"]).http_front == "proxy"
    assert serve_env("proxy", "/tmp/x") == QUIET_SERVE_ENV
    env = serve_env("haproxy", "/tmp/x")
    assert env.items() >= QUIET_SERVE_ENV.items()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert all(value.startswith("/tmp/x") for name, value in env.items() if "HAPROXY_" in name)
    with pytest.raises(SystemExit):
        parse_args(["--http-front", "nginx"])


def test_predictor_replicas_share_the_predictors_ray_cpus() -> None:
    for replicas in (1, 2, 3):
        layout = engine_layout(parse_args(["--predictor-replicas", str(replicas)]), 2, 23.0, 2)
        parsed = PredictorArgs(**predictor_args(layout))
        assert (parsed.num_replicas, parsed.threads) == (replicas, layout.predictor_threads)
        assert parsed.num_replicas * parsed.num_cpus == pytest.approx(PredictorArgs.model_fields["num_cpus"].default,
                                                                      abs=2e-3)


def test_predictor_threads_reach_its_replica_options() -> None:
    options = PredictorArgs(threads=2).actor_options()
    assert options["runtime_env"]["env_vars"] == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    assert "runtime_env" not in PredictorArgs().actor_options()   # Ray's rule for its CPUs


def test_app_args_carry_the_layout_into_a_valid_app() -> None:
    args = parse_args(["--replicas", "2", "--policy", "fcfs"])
    layout = engine_layout(args, 2, 23.0, 2)
    parsed = AppArgs(**app_args(args, layout))
    assert (parsed.num_engine_replicas, parsed.engine_num_cpus) == (2, layout.num_cpus)
    assert parsed.engine_kwargs["max_num_seqs"] == layout.max_num_seqs
    assert parsed.engine_spec("/models/m").nice == layout.nice == ENGINE_NICE
    env = parsed.replica_env()
    assert env["OMP_NUM_THREADS"] == "1" and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert parsed.stream_batch_ms is None   # the platform's default unless the command line sets it
    assert parsed.engine_spec("/models/m").worker_in_engine_core and layout.worker_in_core
    assert not AppArgs(**app_args(args, layout), engine_num_gpus=1).engine_spec("/m").worker_in_engine_core
    apart = parse_args(["--engine-worker-process"])   # vLLM-CPU's own placement, a process per model worker
    apart_layout = engine_layout(apart, 2, 23.0, 2)
    assert not AppArgs(**app_args(apart, apart_layout)).engine_spec("/m").worker_in_engine_core
    assert apart_layout.reason == "set by --engine-worker-process"
    assert "model in a worker process" in apart_layout.describe() and "worker" not in layout.describe()
    assert parsed.ingress["send_before_score"]   # requests go to their engine at once, their scores following
    assert not parsed.engine_policy().reranks_by_late_scores and AppArgs().engine_policy().reranks_by_late_scores
    waiting = parse_args(["--wait-for-score"])
    assert AppArgs(**app_args(waiting, engine_layout(waiting, 2, 23.0, 2))).ingress["send_before_score"] is False
    batched = parse_args(["--stream-batch-ms", "500"])
    assert AppArgs(**app_args(batched, engine_layout(batched, 2, 23.0, 2))).engine_spec("/m").stream_batch_s == 0.5
    with pytest.raises(SystemExit):
        parse_args(["--stream-batch-ms", "-1"])


def test_cpu_engines_prefill_whole_prompts_unless_the_command_line_asks_for_chunks() -> None:
    def engine(argv: list[str]) -> dict:
        args = parse_args(argv)
        return AppArgs(**app_args(args, engine_layout(args, 2, 23.0, 2))).engine_spec("/m").vllm_kwargs()

    whole = engine([])
    assert whole["enable_chunked_prefill"] is False
    assert whole["max_num_batched_tokens"] == whole["max_model_len"] + whole["max_num_seqs"] - 1
    chunked = engine(["--chunked-prefill", "--max-model-len", "4096"])
    assert chunked["enable_chunked_prefill"] is True and "max_num_batched_tokens" not in chunked


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _processes(leader: psutil.Process, title: str) -> list[psutil.Process]:
    """The server's descendants whose command line holds `title`."""
    found = []
    for proc in leader.children(recursive=True):
        try:
            if title in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _tree(leader: psutil.Process) -> list[str]:
    """The server's descendants as `pid ppid cmdline`: what a failed process lookup shows, to say why."""
    rows = []
    for proc in leader.children(recursive=True):
        try:
            rows.append(f"{proc.pid} {proc.ppid()} {' '.join(proc.cmdline())[:100]}")
        except psutil.Error as exc:
            rows.append(f"{proc.pid} ? {type(exc).__name__}")
    return rows


def _nice_of(task: Path) -> int:
    """A thread's nice value (Linux keeps one per thread): field 19 of /proc/PID/task/TID/stat."""
    return int(task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[16])


def test_only_the_services_own_haproxy_is_stopped_even_one_that_ignores_sigterm(tmp_path: Path) -> None:
    """What the service's shutdown does after Ray's: HAProxy left running by a dead HAProxyManager actor (its
    config in the service's private dir) is stopped; a process naming another dir is not."""
    ours_dir, other_dir = tmp_path / "ltrhap-ours", tmp_path / "ltrhap-other"
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(120)"
    started = [subprocess.Popen([sys.executable, "-c", code, "-f", f"{directory}/haproxy.cfg"], stdout=subprocess.PIPE)
               for code, directory in ((stubborn, ours_dir), ("import time; time.sleep(120)", ours_dir),
                                       ("import time; time.sleep(120)", other_dir))]
    try:
        started[0].stdout.readline()   # its SIGTERM handler is in place
        assert sorted(stop_haproxy(str(ours_dir), grace_s=1.0)) == sorted(p.pid for p in started[:2])
        assert started[0].wait(timeout=10) == -signal.SIGKILL   # it ignores SIGTERM: killed after the grace
        started[1].wait(timeout=10)   # ended (psutil reaped it, so its status is not ours to read)
        assert started[2].poll() is None
    finally:
        for process in started:
            process.kill()
            process.wait()


def test_defaults_start_and_serve_on_this_machine(smollm2_path: Path) -> None:
    """The real thing, as a user starts it: defaults only (plus a free port and a private Ray dir)."""
    import openai
    from vllm.utils.torch_utils import available_cpu_count

    cpus = available_cpu_count()
    expected = engine_layout(parse_args([]), cpus, psutil.virtual_memory().total / 2**30, cpus)
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ltr-local-")
    log_path = Path(temp_dir) / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "deployments.local", "--port", str(port), "--temp-dir",
                                 temp_dir], cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    leader = psutil.Process(proc.pid)
    family: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 600
        while "ltr-serve is up at" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-4000:]
            time.sleep(1.0)
        lines = log_path.read_text(errors="replace").splitlines()
        assert expected.describe() in lines, [line for line in lines if "layout" in line]
        assert "scheduling policy: gittins, prefill weight 0 (CPU)" in lines, lines[:20]
        front = next(line for line in lines if line.startswith("HTTP front: haproxy (state in /tmp/ltrhap-"))
        haproxy_dir = front.split("state in ")[1].rstrip(")")

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
        answer = client.completions.create(model=smollm2_path.name, prompt="Hello,", max_tokens=8)
        assert answer.usage.completion_tokens == 8 and answer.choices[0].text

        # The processes that run the model: each engine's core, its model inside (no worker process of its own).
        assert not _processes(leader, "VLLM::Worker"), _tree(leader)
        workers = _processes(leader, "VLLM::EngineCore")
        assert len(workers) == expected.replicas, _tree(leader)
        for worker in workers:   # the thread count and the priority reached the process that runs the model
            environ = Path(f"/proc/{worker.pid}/environ").read_bytes().split(b"\0")
            assert f"OMP_NUM_THREADS={expected.threads}".encode() in environ
            assert {_nice_of(task) for task in Path(f"/proc/{worker.pid}/task").iterdir()} == {expected.nice}
            if autogroup_enabled():   # and the CPU session it yields in against other programs
                session = Path(f"/proc/{worker.pid}/autogroup").read_text().split()
                assert session[:1] != Path(f"/proc/{proc.pid}/autogroup").read_text().split()[:1]
                assert session[1:] == ["nice", str(expected.nice)]
        for replica in _processes(leader, "ServeReplica:ltr:LLMEngine"):   # the replica keeps normal priority
            assert _nice_of(Path(f"/proc/{replica.pid}/task/{replica.pid}")) == 0
        predictors = _processes(leader, "ServeReplica:ltr-predictor:Predictor")
        assert len(predictors) == expected.predictor_replicas
        for predictor in predictors:
            environ = Path(f"/proc/{predictor.pid}/environ").read_bytes().split(b"\0")
            assert f"OMP_NUM_THREADS={expected.predictor_threads}".encode() in environ
            assert _nice_of(Path(f"/proc/{predictor.pid}/task/{predictor.pid}")) == 0
        haproxy = _processes(leader, "haproxy")   # the port is HAProxy's, configured in the service's own dir
        assert any(f"{haproxy_dir}/" in " ".join(p.cmdline()) for p in haproxy), haproxy
        family = {p.pid: p for p in [leader, *leader.children(recursive=True), *workers]}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log_path.read_text(errors="replace")[-4000:]
        gone, alive = psutil.wait_procs(list(family.values()), timeout=60)
        assert not alive, [(p.pid, p.name()) for p in alive]
        assert "shutting down..." in log_path.read_text(errors="replace")
        assert not Path(haproxy_dir).exists()
    finally:
        try:   # a failed check above leaves `family` short: take every descendant before the leader goes
            family.update({p.pid: p for p in leader.children(recursive=True)})
        except psutil.Error:
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for p in family.values():
            try:
                p.kill()
            except psutil.Error:
                pass
