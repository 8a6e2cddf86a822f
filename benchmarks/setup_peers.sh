#!/usr/bin/env bash
# The side virtual environment for the peers servekit is measured against: TorchServe 0.12 (+ its model archiver,
# Java 17+) and LitServe, plus what the driver of ../shared/bench needs (fastapi/uvicorn for the floor, psutil).
#
#   benchmarks/setup_peers.sh            # creates or completes $BENCH_PEERS_VENV (default /tmp/servekit-peers-venv)
#
# Idempotent: a venv whose stamp matches the pins below is left as it is. Prints the venv path on the last line.
# torch is installed first and held at the CPU pin by a constraints file (an unpinned torch pulls a CUDA build).
set -euo pipefail
venv=${BENCH_PEERS_VENV:-/tmp/servekit-peers-venv}
python=${BENCH_PEERS_PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
torch_pin=torch==2.13.0
# litserve 0.2.19 is the LitServe 0.2 of ../shared/bench/baseline.md and works with fastapi 0.165 / starlette 1.10.
# TorchServe's workers import yaml: without pyyaml they die with "No module named 'yaml'".
pkgs=(torchserve==0.12.0 torch-model-archiver==0.12.0 litserve==0.2.19 fastapi 'uvicorn[standard]' psutil pyyaml)

die() {
    echo "ERROR: $*" >&2
    exit 2
}

# TorchServe's front end is Java: 17 or newer.
command -v java >/dev/null || die "java not found: TorchServe 0.12 needs a JDK/JRE 17+ (apt-get install -y openjdk-17-jre-headless)"
jline=$(java -version 2>&1 | head -n1)
jmajor=$(sed -E 's/.*version "([0-9]+)(\.[0-9]+)*.*/\1/' <<<"$jline")
[[ $jmajor =~ ^[0-9]+$ && $jmajor -ge 17 ]] || die "TorchServe 0.12 needs Java 17+, found: $jline"

want="$torch_pin ${pkgs[*]}"
stamp=$venv/.servekit-peers-stamp
check() { "$venv/bin/python" -c 'import torch, ts, model_archiver, litserve, fastapi, uvicorn, psutil, yaml' 2>/dev/null; }
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && check; then
    echo "peers venv up to date ($jline)" >&2
    echo "$venv"
    exit 0
fi
log=$venv.setup.log
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv" || die "cannot create the venv $venv with $python"
rm -f "$stamp"
echo "$torch_pin" >"$venv/constraints.txt"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q -c "$venv/constraints.txt")
echo "installing $torch_pin, then ${pkgs[*]} into $venv (log $log)" >&2
{ "${pip[@]}" "$torch_pin" && "${pip[@]}" "${pkgs[@]}"; } >"$log" 2>&1 || {
    tail -n 20 "$log" >&2
    die "pip install failed (log $log)"
}
check || die "installed, but the imports fail: $("$venv/bin/python" -c 'import torch, ts, litserve, yaml' 2>&1 | tail -n1)"
for exe in torchserve torch-model-archiver; do
    [ -x "$venv/bin/$exe" ] || die "$venv/bin/$exe is missing after the install"
done
echo "$want" >"$stamp"
"$venv/bin/python" - >&2 <<'EOF'
import importlib.metadata as m
print(", ".join(f"{p} {m.version(p)}" for p in ("torch", "torchserve", "torch-model-archiver", "litserve", "fastapi", "uvicorn")))
EOF
echo "$jline" >&2
echo "$venv"
