"""Rebuild the example models of this folder (deterministic weights): ``python model_store/build_examples.py``.

- ``mlp/``: an unpacked (no-archive) eager model: ``model.py`` + state dict + ``handler.py``.
- ``mlp_scripted.mar``: the same network and handler, with the weights as TorchScript.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "mlp"))

from model import MLP  # noqa: E402

from servekit import archiver  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.save(model.state_dict(), work / "mlp.pt")
        torch.jit.script(model).save(str(work / "mlp_scripted.pt"))
        (work / "model-config.yaml").write_text("minWorkers: 1\nmaxWorkers: 1\nbatchSize: 8\nmaxBatchDelay: 5\n")
        staged = work / "out"
        archiver.main(
            [
                "--model-name",
                "mlp",
                "--version",
                "1.0",
                "--model-file",
                str(HERE / "mlp/model.py"),
                "--serialized-file",
                str(work / "mlp.pt"),
                "--handler",
                str(HERE / "mlp/handler.py"),
                "--config-file",
                str(work / "model-config.yaml"),
                "--archive-format",
                "no-archive",
                "--export-path",
                str(staged),
                "--force",
            ]
        )
        for item in (staged / "mlp").iterdir():
            target = HERE / "mlp" / item.name
            if item.is_dir():
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(item, target)
            else:
                shutil.copy2(item, target)
        archiver.main(
            [
                "--model-name",
                "mlp_scripted",
                "--version",
                "1.0",
                "--serialized-file",
                str(work / "mlp_scripted.pt"),
                "--handler",
                str(HERE / "mlp/handler.py"),
                "--export-path",
                str(HERE),
                "--force",
            ]
        )


if __name__ == "__main__":
    main()
