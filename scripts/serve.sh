#!/usr/bin/env bash
# Start ltr-serve locally on CPU (private local Ray, Serve HTTP on --port, default 8000).
# Options go to `python -m deployments.local` (see --help), e.g. `bash scripts/serve.sh --port 8123`.
# Engine replicas, threads and seats are fitted to this machine (deployments/machine.py) and printed at start;
# --replicas, --engine-threads, --engine-cpus and --max-num-seqs override them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ${PYTHON:-python3} -m deployments.local "$@"
