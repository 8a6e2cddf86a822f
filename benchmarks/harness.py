"""The reference harness of ../shared/bench (`run.py`: workloads, servers, wrk), loaded for the scripts here, which
use its drivers and never change it. `SHARED_BENCH` says where it is when not beside this checkout."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(os.environ.get("SHARED_BENCH", REPO.parent / "shared" / "bench")).resolve()


def load_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    if spec is None or spec.loader is None or not (BENCH / "run.py").is_file():
        sys.exit(f"ERROR: the reference harness is not at {BENCH} (set SHARED_BENCH)")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))  # run.py imports its neighbours (models, servekit_venv)
    spec.loader.exec_module(mod)
    return mod
