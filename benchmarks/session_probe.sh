#!/bin/bash
# Which processes wait for a CPU while ltr-serve serves near saturation (benchmarks/README.md, "The engines'
# session"; results/session_probe.json). Starts the service in a session of its own (as peer_bench does; LAUNCH=env
# keeps it in this one), then runs side by side, in this session: a probe that sleeps 5 ms in a loop and records
# every wake-up more than 50 ms late, and vLLM's benchmark client (3 req/s, --ignore-eos) over DATASET, a
# ShareGPT-format file as peer_bench writes them (its work dir keeps them: dataset_slice0.json).
#
# usage: bash benchmarks/session_probe.sh NAME DATASET [python -m deployments.local options...]
# writes /tmp/session-probe/NAME.json (client, detailed) and /tmp/session-probe/lag_NAME.json, prints one line.
set -euo pipefail
name=$1; dataset=$2; shift 2
out=/tmp/session-probe; mkdir -p "$out"
port=${PORT:-8124}
cd "$(dirname "$0")/.."
PYTHONPATH=. ${LAUNCH:-setsid} python3 -m deployments.local --port "$port" --temp-dir "$out/ray-$name" "$@" \
    > "$out/server_$name.log" 2>&1 < /dev/null &
for _ in $(seq 1 150); do curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null && break; sleep 2; done
model=$(curl -sf "http://127.0.0.1:$port/v1/models" | python3 -c "import json,sys; print(json.load(sys.stdin)['data'][0]['id'])")
python3 - "$out/lag_$name.json" 50 <<'EOF' &
import json, sys, time
late, end = [], time.time() + float(sys.argv[2])
while time.time() < end:
    start = time.perf_counter(); time.sleep(0.005); wait = time.perf_counter() - start - 0.005
    if wait > 0.05:
        late.append((time.time(), wait))
json.dump(late, open(sys.argv[1], "w"))
EOF
probe=$!
python3 -c "import benchmarks.peer_bench as p, sys; sys.argv[0] = 'vllm bench serve'; exec(p.CLIENT_CODE)" \
    --backend openai --base-url "http://127.0.0.1:$port" --endpoint /v1/completions \
    --model "$model" --tokenizer "$HOME/.cache/ltr-serve/models/SmolLM2-135M-Instruct" \
    --dataset-name sharegpt --dataset-path "$dataset" --disable-shuffle --no-oversample --num-prompts 150 \
    --ignore-eos --temperature 0 --request-rate 3 --seed 6400 --save-result --save-detailed \
    --result-dir "$out" --result-filename "$name.json" --disable-tqdm > "$out/client_$name.log" 2>&1
wait "$probe"
pkill -INT -f "deployments.local --port $port" || true
sleep 15
python3 - "$out" "$name" <<'EOF'
import json, sys
import numpy as np
out, name = sys.argv[1:]
late = json.load(open(f"{out}/lag_{name}.json"))
client = json.load(open(f"{out}/{name}.json"))
starts, ttft = np.sort(np.array(client["start_times"])), np.array(client["ttfts"])
print(name, "probe waits > 50 ms:", len(late), "longest", round(max([w for _, w in late] or [0.0]), 3),
      "| client sends within 3 ms:", int((np.diff(starts) < 0.003).sum()),
      "| TTFT mean / p50 / p99", round(ttft.mean(), 3), round(float(np.median(ttft)), 3),
      round(float(np.quantile(ttft, 0.99)), 3), "| TPOT", round(client["mean_tpot_ms"], 1),
      "ms | e2e mean", round(float(np.mean(client["latencies"])), 3))
EOF
