"""`ltr calibrate` (fit the step-time model to the real engine) and `ltr simulate` (run a trace)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ltr.scheduling.policy import POLICY_NAMES, PolicyConfig, StarvationConfig

DEFAULT_CALIBRATION = Path("benchmarks/results/sim_calibration_cpu.json")


def _calibrate(args: argparse.Namespace) -> int:
    from ltr.models import prepare_model
    from ltr.sim.calibrate import calibrate

    model = args.model or prepare_model()
    profile = calibrate(model, args.output, repeats=args.repeats,
                        command="ltr " + shlex.join(sys.argv[1:]))
    print(json.dumps(profile.to_json()["step"]))
    print(args.output)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import numpy as np

    from ltr.data import read_trace
    from ltr.sim import ClusterConfig, a100_llama3_8b, build_requests, load_profile, poisson_arrivals, simulate

    profile = a100_llama3_8b() if args.profile == "a100-llama3-8b" else load_profile(Path(args.profile))
    rows = read_trace(args.trace)
    if args.limit:
        rows = rows[: args.limit]
    if not rows:
        raise ValueError(f"{args.trace}: empty trace")
    output_lens = [min(int(r["output_len"]), args.max_output) if args.max_output else int(r["output_len"])
                   for r in rows]
    output_lens = [max(n, 1) for n in output_lens]
    if args.scores == "oracle":
        scores = [float(n) for n in output_lens]
    elif args.scores == "trace":
        missing = [i for i, r in enumerate(rows) if "score" not in r]
        if missing:
            raise ValueError(f"{args.trace}: --scores trace but line {missing[0] + 1} has no 'score'")
        scores = [float(r["score"]) for r in rows]
    else:
        scores = None
    arrivals = (np.zeros(len(rows)) if args.rate <= 0
                else poisson_arrivals(len(rows), args.rate, np.random.default_rng(args.seed)))
    requests = build_requests([max(int(r["prompt_len"]), 1) for r in rows], output_lens, arrivals, scores=scores)
    starvation = None if args.no_starvation else StarvationConfig(
        args.starvation_threshold, args.starvation_quantum, args.aged_share)
    policy = PolicyConfig(name=args.policy, starvation=starvation,
                          max_preemptions_per_step=args.max_preemptions_per_step,
                          preemption_patience=args.preemption_patience)
    config = ClusterConfig(num_replicas=args.replicas, router=args.router, policy=policy)
    result = simulate(requests, profile, config, seed=args.seed)
    print(json.dumps({"profile": profile.name, "policy": args.policy, "scores": args.scores, "rate": args.rate,
                      "replicas": args.replicas, "router": args.router, **result.summary()}, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calibrate", help="fit the simulator's step-time model to the real vLLM CPU engine")
    p.add_argument("--model", type=Path, default=None, help="HF model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--output", type=Path, default=DEFAULT_CALIBRATION)
    p.add_argument("--repeats", type=int, default=2, help="times to run the calibration batch shapes")
    p.set_defaults(func=_calibrate)

    p = subparsers.add_parser("simulate", help="simulate a JSONL trace on N replicas under a policy")
    p.add_argument("--trace", type=Path, required=True, help="JSONL trace (ltr export-trace)")
    p.add_argument("--profile", default="a100-llama3-8b",
                   help="'a100-llama3-8b' (derived) or a calibration JSON (ltr calibrate)")
    p.add_argument("--policy", choices=POLICY_NAMES, default="ltr",
                   help="ltr with the default oracle scores is SJF; gittins needs predictor scores (--scores trace)")
    p.add_argument("--scores", choices=("oracle", "trace", "none"), default="oracle",
                   help="oracle = true output length (SJF), trace = the trace's 'score' column")
    p.add_argument("--rate", type=float, default=8.0, help="Poisson requests/s (<= 0: one burst at t=0)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--router", choices=("least_work", "pow2"), default="least_work")
    p.add_argument("--limit", type=int, default=0, help="first N trace rows (0 = all)")
    p.add_argument("--max-output", type=int, default=0, help="cap output lengths (0 = no cap)")
    p.add_argument("--starvation-threshold", type=int, default=StarvationConfig.threshold)
    p.add_argument("--starvation-quantum", type=int, default=StarvationConfig.quantum)
    p.add_argument("--aged-share", type=float, default=StarvationConfig.aged_share,
                   help="most seats aged (promoted) requests may hold at once, as a share of max_num_seqs")
    p.add_argument("--no-starvation", action="store_true")
    p.add_argument("--max-preemptions-per-step", type=int, default=PolicyConfig.max_preemptions_per_step)
    p.add_argument("--preemption-patience", type=int, default=PolicyConfig.preemption_patience,
                   help="iterations a better-ranked request waits before it may evict a running one")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_simulate)
