#!/usr/bin/env bash
# TorchServe's gRPC inference API under load (issue 15): servekit and TorchServe 0.12 side by side with h2load,
# servekit's REST /predictions in the same start for the ratio (grpc_bench.py).
#
#   benchmarks/grpc_bench.sh                                   # W1, 3 rounds, 64 clients
#   benchmarks/grpc_bench.sh --rounds 1 --duration 5           # a quick look, not for decisions
#
# Arguments go to grpc_bench.py (`grpc_bench.py --help`). Loopback only; servers are started and stopped by PID.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export SHARED_BENCH=${SHARED_BENCH:-$repo/../shared/bench}
export BENCH_WORKDIR=${BENCH_WORKDIR:-/tmp/servekit-bench}
[ -f "$SHARED_BENCH/run.py" ] || { echo "ERROR: the reference harness is not at $SHARED_BENCH" >&2; exit 2; }
command -v wrk >/dev/null && command -v h2load >/dev/null && command -v curl >/dev/null ||
	{ apt-get update -qq && apt-get install -y -qq wrk nghttp2-client curl; }
make -C "$repo" install >/dev/null
py="$("$repo/benchmarks/setup_peers.sh")/bin/python" # torchserve and its archiver beside the driver
exec "$py" "$repo/benchmarks/grpc_bench.py" --json "$BENCH_WORKDIR/grpc.json" "$@"
