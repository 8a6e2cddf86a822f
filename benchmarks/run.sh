#!/usr/bin/env bash
# servekit on the reference workloads of ../shared/bench (W1 tiny, W2 compute) at 1, 8 and 64 clients, next to a
# bare FastAPI endpoint, the raw in-process model rate (with JSON decode/encode) and, with BENCH_PEERS=1, TorchServe
# 0.12 and LitServe: all measured in the same run, servers alternating, then one table of ratios (ratios.py).
#
#   benchmarks/run.sh                               # servekit vs the floor: 3 rounds, 10 s per cell (~10 min)
#   BENCH_PEERS=1 benchmarks/run.sh                 # + TorchServe and LitServe (setup_peers.sh venv; ~25 min)
#   BENCH_PEERS=1 benchmarks/run.sh --repeats 1 --duration 3   # a quick look, not for decisions
#   BENCH_SERVERS=servekit,torchserve,floor benchmarks/run.sh  # any list out of servekit,torchserve,litserve,floor
#   BENCH_CELLS=w1:b8:c64,w2:b8:c64 benchmarks/run.sh          # other cells (WORKLOAD:bBATCH:cCLIENTS)
#   BENCH_PEERS=all benchmarks/run.sh               # + MLServer, KServe, Ray Serve, BentoML: runs benchmarks/peers.sh
#
# Extra arguments go to `run.py compare`. Loopback only; the driver starts and stops every server by PID.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ "${BENCH_PEERS:-0}" = all ]; then # every peer, each in its own venv: peers.sh (same options)
    exec "$repo/benchmarks/peers.sh" "$@"
fi
bench=${SHARED_BENCH:-$repo/../shared/bench}
export BENCH_WORKDIR=${BENCH_WORKDIR:-/tmp/servekit-bench}
[ -f "$bench/run.py" ] || { echo "ERROR: the reference harness is not at $bench (set SHARED_BENCH)" >&2; exit 2; }
if [ "${BENCH_PEERS:-0}" = 1 ]; then
    servers=${BENCH_SERVERS:-servekit,torchserve,litserve,floor}
else
    servers=${BENCH_SERVERS:-servekit,floor}
fi
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
make -C "$repo" install >/dev/null
case ",$servers," in
*,torchserve,* | *,litserve,*) # the driver runs in the peers' venv: torchserve, its archiver and litserve beside it
    py="$("$repo/benchmarks/setup_peers.sh")/bin/python" ;;
*)
    "$repo/.venv/bin/pip" install -q psutil
    py="$repo/.venv/bin/python" ;;
esac
json=$BENCH_WORKDIR/compare.json
"$py" "$bench/run.py" prepare >/dev/null
rc=0
"$py" "$bench/run.py" compare --project "$repo" --servers "$servers" \
    --cells "${BENCH_CELLS:-w1:b8:c1,w1:b8:c8,w1:b8:c64,w2:b8:c1,w2:b8:c8,w2:b8:c64}" --compare-raw w1,w2 \
    --json "$json" "$@" || rc=$?
if [ -f "$json" ]; then
    echo
    echo "## servekit side by side ($json)"
    "$repo/.venv/bin/python" "$repo/benchmarks/ratios.py" "$json" || true
fi
exit "$rc"
