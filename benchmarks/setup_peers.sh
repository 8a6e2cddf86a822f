#!/usr/bin/env bash
# The virtual environments of the peers servekit is measured against.
#
#   benchmarks/setup_peers.sh            # the driver's venv: TorchServe 0.12 (+ its model archiver, Java 17+),
#                                        # LitServe and what ../shared/bench needs (fastapi/uvicorn, psutil)
#   benchmarks/setup_peers.sh all        # that, plus one venv per peer: MLServer 1.7.1, KServe 0.21 (Python
#                                        # server), Ray Serve 2.60, BentoML 1.4.40 (~5 min the first time)
#   benchmarks/setup_peers.sh mlserver kserve     # that, plus only the peers named
#
# The driver's venv is $BENCH_PEERS_VENV (default /tmp/servekit-peers-venv); the peers' venvs are
# $BENCH_PEER_VENVS/<peer> (default /tmp/servekit-peer-venvs/{mlserver,kserve,ray,bentoml}), the layout of
# ../shared/bench/peers ($PEERS_ROOT). Idempotent: a venv whose stamp matches its pins and whose imports work is
# left as it is. Prints the driver venv's path on the last line. In every venv torch is installed first and held at
# the CPU pin by a constraints file (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
venv=${BENCH_PEERS_VENV:-/tmp/servekit-peers-venv}
peer_root=${BENCH_PEER_VENVS:-/tmp/servekit-peer-venvs}
python=${BENCH_PEERS_PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
torch_pin=torch==2.13.0
# litserve 0.2.19 is the LitServe 0.2 of ../shared/bench/baseline.md and works with fastapi 0.165 / starlette 1.10.
# TorchServe's workers import yaml: without pyyaml they die with "No module named 'yaml'".
pkgs=(torchserve==0.12.0 torch-model-archiver==0.12.0 litserve==0.2.19 fastapi 'uvicorn[standard]' psutil pyyaml)

# The peers of ../shared/bench/peers/README.md, at its versions: requirement, extra pins (into the constraints
# file, with torch), the imports that prove the venv works. MLServer 1.7.1's parallel worker calls
# asyncio.get_event_loop() in a fresh process: uvloop >= 0.22 raises there ("There is no current event loop") and
# the worker restarts forever, hence uvloop 0.21.0.
declare -A peer_req=([mlserver]=mlserver==1.7.1 [kserve]=kserve==0.21.0 ['ray']='ray[serve]==2.60.0'
    [bentoml]=bentoml==1.4.40)
declare -A peer_pins=([mlserver]=uvloop==0.21.0 [kserve]='' ['ray']='' [bentoml]='')
declare -A peer_imports=([mlserver]='mlserver, mlserver.codecs, uvloop' [kserve]='kserve, uvicorn'
    ['ray']='ray, ray.serve, starlette' [bentoml]='bentoml')
all_peers=(mlserver kserve ray bentoml)

die() {
    echo "ERROR: $*" >&2
    exit 2
}

peers=()
for a in "$@"; do
    case $a in
    all) peers+=("${all_peers[@]}") ;;
    torchserve | litserve) ;; # always: the driver's venv
    mlserver | kserve | ray | bentoml) peers+=("$a") ;;
    -h | --help)
        sed -n '2,15p' "$0"
        exit 0
        ;;
    *) die "unknown peer '$a' (all, torchserve, mlserver, kserve, ray, bentoml)" ;;
    esac
done

# TorchServe's front end is Java: 17 or newer.
command -v java >/dev/null || die "java not found: TorchServe 0.12 needs a JDK/JRE 17+ (apt-get install -y openjdk-17-jre-headless)"
jline=$(java -version 2>&1 | head -n1)
jmajor=$(sed -E 's/.*version "([0-9]+)(\.[0-9]+)*.*/\1/' <<<"$jline")
[[ $jmajor =~ ^[0-9]+$ && $jmajor -ge 17 ]] || die "TorchServe 0.12 needs Java 17+, found: $jline"

# make_venv DIR IMPORTS PINS PACKAGE...: DIR with torch first, then the packages, all held by DIR/constraints.txt.
make_venv() {
    local dir=$1 imports=$2 pins=$3
    shift 3
    local want="$torch_pin${pins:+ $pins} $*" stamp=$dir/.servekit-peers-stamp log=$dir.setup.log
    local check=("$dir/bin/python" -c "import torch, $imports")
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "${check[@]}" 2>/dev/null; then
        echo "up to date: $dir" >&2
        return 0
    fi
    mkdir -p "$(dirname "$dir")"
    [ -x "$dir/bin/python" ] || "$python" -m venv "$dir" || die "cannot create the venv $dir with $python"
    rm -f "$stamp"
    printf '%s\n' "$torch_pin" $pins >"$dir/constraints.txt"
    local pip=("$dir/bin/python" -m pip install --disable-pip-version-check -q -c "$dir/constraints.txt")
    echo "installing $torch_pin, then $* into $dir (log $log)" >&2
    # shellcheck disable=SC2086 # $pins: zero or more words
    { "${pip[@]}" "$torch_pin" && "${pip[@]}" "$@" $pins; } >"$log" 2>&1 || {
        tail -n 20 "$log" >&2
        die "pip install failed (log $log)"
    }
    "${check[@]}" 2>>"$log" || die "installed, but 'import torch, $imports' fails in $dir (log $log)"
    local tv
    tv=$("$dir/bin/python" -c 'import torch; print(torch.__version__)')
    [[ $tv == 2.13.0* ]] || die "$dir has torch $tv, not the pin $torch_pin"
    echo "$want" >"$stamp"
}

make_venv "$venv" 'ts, model_archiver, litserve, fastapi, uvicorn, psutil, yaml' '' "${pkgs[@]}"
for exe in torchserve torch-model-archiver; do
    [ -x "$venv/bin/$exe" ] || die "$venv/bin/$exe is missing after the install"
done
for p in ${peers[@]+"${peers[@]}"}; do
    make_venv "$peer_root/$p" "${peer_imports[$p]}" "${peer_pins[$p]}" "${peer_req[$p]}" psutil
done

"$venv/bin/python" - "$venv" "$peer_root" ${peers[@]+"${peers[@]}"} >&2 <<'EOF'
import subprocess, sys
venv, root, peers = sys.argv[1], sys.argv[2], sys.argv[3:]
dist = {"mlserver": "mlserver uvloop", "kserve": "kserve", "ray": "ray", "bentoml": "bentoml"}
code = "import importlib.metadata as m, sys; print(', '.join(f'{p} {m.version(p)}' for p in sys.argv[1:]))"
for name, py, pkgs in [("driver", f"{venv}/bin/python", "torch torchserve torch-model-archiver litserve fastapi uvicorn")] + [
    (p, f"{root}/{p}/bin/python", f"torch {dist[p]}") for p in dict.fromkeys(peers)
]:
    out = subprocess.run([py, "-c", code, *pkgs.split()], capture_output=True, text=True)
    print(f"{name}: {out.stdout.strip() or out.stderr.strip()[-200:]}")
EOF
echo "$jline" >&2
echo "$venv"
