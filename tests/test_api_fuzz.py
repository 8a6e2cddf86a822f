"""schemathesis against the OpenAPI description (``/api-description``) of each API of a real server: no input it
generates may produce a server error (5xx other than the documented 503/504/507 answers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import running_server

STORE = Path(__file__).parent.parent / "model_store"


@pytest.mark.slow
def test_api_fuzz_finds_no_server_errors(tmp_path: Path) -> None:
    st = Path(sys.executable).with_name("st")
    (tmp_path / "schemathesis.toml").write_text(
        '[parameters]\n"path.model_name" = "mlp"\n"path.name" = "mlp"\n"path.version" = "1.0"\n'
    )
    args = ("--disable-token-auth", "--ncs", "--enable-model-api")
    with running_server(tmp_path / "run", STORE, args=args) as server:
        for url in (server.management, server.inference, server.metrics):
            result = subprocess.run(
                [
                    str(st),
                    "run",
                    f"{url}/api-description",
                    "--checks",
                    "not_a_server_error",
                    "--max-examples",
                    "40",
                    "--seed",
                    "1",
                ],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, result.stdout[-3000:]
        assert "Traceback" not in server.log_text()
