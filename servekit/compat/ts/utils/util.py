"""``ts.utils.util`` for handlers written for TorchServe."""

from __future__ import annotations

from typing import Any

import yaml

from servekit.handler import PredictionException, list_classes_from_module, load_label_mapping, map_class_to_label


def get_yaml_config(yaml_file_path: str) -> dict[str, Any]:
    with open(yaml_file_path) as handle:
        return yaml.safe_load(handle) or {}


__all__ = [
    "PredictionException",
    "get_yaml_config",
    "list_classes_from_module",
    "load_label_mapping",
    "map_class_to_label",
]
