"""CPU the idle local service burns, per process role: `python -m deployments.local` started as peer_bench
starts it, left to settle, then its processes' CPU time read over a window with no requests.

    python benchmarks/idle_cpu.py --env RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.1 --output results/idle_cpu_x.json

`--env KEY=VALUE` is set for the service (an explicit setting wins over `deployments.local.serve_env`).
On a 2-core box every core the service takes while idle is one its engines lack under load.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import peer_bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="environment for the service")
    parser.add_argument("--settle-s", type=float, default=30.0, help="idle seconds after start before measuring")
    parser.add_argument("--window-s", type=float, default=60.0, help="seconds of idle CPU measured")
    parser.add_argument("--samples", type=int, default=2, help="consecutive windows measured")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    bad = [item for item in args.env if "=" not in item]
    if bad:
        parser.error(f"--env takes KEY=VALUE, got {bad}")
    extra = dict(item.split("=", 1) for item in args.env)
    peer_bench._BASE_ENV.update(extra)
    server = peer_bench.server_for("ltr", peer_bench.parse_args([]), "", Path(tempfile.mkdtemp(prefix="idle-cpu-")))
    server.start(900)
    windows = []
    try:
        time.sleep(args.settle_s)
        for _ in range(args.samples):
            before, started = peer_bench.cpu_seconds_by_role(server), time.monotonic()
            time.sleep(args.window_s)
            after, wall = peer_bench.cpu_seconds_by_role(server), time.monotonic() - started
            cores = {role: round((after[role] - before.get(role, 0.0)) / wall, 4) for role in sorted(after)}
            windows.append({"cores": cores, "total_cores": round(sum(cores.values()), 4)})
            peer_bench.log(f"idle: {windows[-1]['total_cores']:.3f} cores {cores}")
    finally:
        server.stop(90)
    report = {"command": shlex.join(["python", "benchmarks/idle_cpu.py", *(argv or sys.argv[1:])]), "env": extra,
              "settle_s": args.settle_s, "window_s": args.window_s, "windows": windows}
    args.output.write_text(json.dumps(report, indent=1))
    peer_bench.log(f"wrote {args.output}")


if __name__ == "__main__":
    main()
