#!/usr/bin/env bash
# servekit on the reference workloads of ../shared/bench (W1 tiny, W2 compute), next to a bare FastAPI endpoint and
# the raw in-process model rate (with JSON decode/encode) measured in the same run, at 1, 8 and 64 clients.
#
#   benchmarks/run.sh                       # 3 rounds, 10 s per cell (~15 min on 2 cores)
#   benchmarks/run.sh --repeats 1 --duration 3   # a quick look, not for decisions
#   BENCH_SERVERS=servekit,torchserve,floor benchmarks/run.sh   # add TorchServe (see benchmarks/README.md)
#
# Extra arguments go to `run.py compare`. Loopback only; the driver starts and stops every server by PID.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bench=${SHARED_BENCH:-$repo/../shared/bench}
export BENCH_WORKDIR=${BENCH_WORKDIR:-/tmp/servekit-bench}
[ -f "$bench/run.py" ] || { echo "ERROR: the reference harness is not at $bench (set SHARED_BENCH)" >&2; exit 2; }
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
make -C "$repo" install >/dev/null
"$repo/.venv/bin/pip" install -q psutil
py="$repo/.venv/bin/python"
"$py" "$bench/run.py" prepare >/dev/null
"$py" "$bench/run.py" compare --project "$repo" --servers "${BENCH_SERVERS:-servekit,floor}" \
    --cells w1:b8:c1,w1:b8:c8,w1:b8:c64,w2:b8:c1,w2:b8:c8,w2:b8:c64 --compare-raw w1,w2 \
    --json "$BENCH_WORKDIR/compare.json" "$@"
