#!/usr/bin/env bash
# servekit (/predictions and v2 JSON) next to TorchServe 0.12, MLServer 1.7.1, the KServe 0.21 Python server (v1 and
# v2), Ray Serve 2.60 and BentoML 1.4.40 on the reference workloads of ../shared/bench, all in the same run, servers
# alternating, then one table (ratios.py) that says where each peer's semantics differ.
#
#   benchmarks/peers.sh                              # 3 rounds x 8 s, W1 c64, W1 c1, W2 c64 (~35 min; setup ~5 min once)
#   benchmarks/peers.sh --repeats 1 --duration 5 --cells w1:b8:c64,w2:b8:c64   # a quick look (~7 min), not for decisions
#   BENCH_SERVERS=servekit,servekit-v2,mlserver benchmarks/peers.sh            # some routes only (peers.py --help)
#
# Sets up what it needs first: wrk (Debian), the project's .venv, and the venvs of benchmarks/setup_peers.sh all
# (idempotent: the driver's with TorchServe, one per peer under $BENCH_PEER_VENVS, default /tmp/servekit-peer-venvs).
# Extra arguments go to peers.py (and, past its own, to run.py compare). Loopback only; every server is started and
# stopped by PID. Results: $BENCH_WORKDIR/peers.json (default /tmp/servekit-bench) and the harness's results file.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bench=${SHARED_BENCH:-$repo/../shared/bench}
export BENCH_WORKDIR=${BENCH_WORKDIR:-/tmp/servekit-bench}
[ -f "$bench/peers/peers_bench.py" ] || {
    echo "ERROR: the reference harness and its peers are not at $bench (set SHARED_BENCH)" >&2
    exit 2
}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
make -C "$repo" install >/dev/null
py="$("$repo/benchmarks/setup_peers.sh" all | tail -n1)/bin/python"
exec "$py" "$repo/benchmarks/peers.py" --project "$repo" "$@"
