#!/usr/bin/env bash
# Goodput past capacity (issue 13): servekit and TorchServe 0.12 side by side at 64, 256 and 1,024 closed-loop
# connections with jobQueueSize 64, an open loop at twice the capacity for 60 s (openloop.c), recovery, and a second model
# within its capacity while the first is overloaded; the same .mar, handler and settings as run.sh (overload.py).
#
#   benchmarks/overload.sh                                             # W1 and W2, 3 rounds (~45 min)
#   benchmarks/overload.sh --rounds 1 --duration 5 --open-seconds 20   # a quick look, not for decisions
#   benchmarks/overload.sh --servers servekit --workloads w1           # servekit alone
#
# Arguments go to overload.py (`overload.py --help`). Loopback only; servers are started and stopped by PID.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export SHARED_BENCH=${SHARED_BENCH:-$repo/../shared/bench}
export BENCH_WORKDIR=${BENCH_WORKDIR:-/tmp/servekit-bench}
[ -f "$SHARED_BENCH/run.py" ] || { echo "ERROR: the reference harness is not at $SHARED_BENCH" >&2; exit 2; }
command -v wrk >/dev/null && command -v hey >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk hey; }
make -C "$repo" install >/dev/null
py="$("$repo/benchmarks/setup_peers.sh")/bin/python" # torchserve and its archiver beside the driver
exec "$py" "$repo/benchmarks/overload.py" --multi --json "$BENCH_WORKDIR/overload.json" "$@"
