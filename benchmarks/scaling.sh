#!/usr/bin/env bash
# servekit's scaling figures (issue 7): W2 at 64 clients with 1 and 2 workers, and W1's p99 at 1, 64 and 256
# clients; the same .mar, handler and settings as run.sh, through the driver of ../shared/bench (see scaling.py).
#
#   benchmarks/scaling.sh                            # 3 rounds, 10 s per cell (~5 min on a quiet machine)
#   benchmarks/scaling.sh --repeats 1 --duration 3   # a quick look, not for decisions
#
# Arguments go to scaling.py (`scaling.py --help`); unknown ones go on to `run.py servekit`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export SHARED_BENCH=${SHARED_BENCH:-$repo/../shared/bench}
export BENCH_WORKDIR=${BENCH_WORKDIR:-/tmp/servekit-bench}
[ -f "$SHARED_BENCH/run.py" ] || { echo "ERROR: the reference harness is not at $SHARED_BENCH" >&2; exit 2; }
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
make -C "$repo" install >/dev/null
"$repo/.venv/bin/pip" install -q psutil
exec "$repo/.venv/bin/python" "$repo/benchmarks/scaling.py" --json "$BENCH_WORKDIR/scaling.json" "$@"
