"""``object_detector``: TorchServe's ``ObjectDetector``.

Per request one image (see ``vision_handler``) as a float tensor in [0, 1] at its own size; the model gets the list
of image tensors of the batch (torchvision's detection models' input) and returns one dict per image with ``boxes``
(N x 4, ``x1, y1, x2, y2`` in pixels), ``labels`` and ``scores``. The answer per request is a list of
``{label: [x1, y1, x2, y2], "score": s}`` for the detections scoring at least ``threshold`` (0.5), labels from
``index_to_name.json`` (else the class index). The model-config YAML can set ``handler: {threshold: t}``.

Runs in the worker process; never imports asyncio or fastapi.
"""

from __future__ import annotations

from typing import Any

import torch

from servekit.handler import Context

from .base_handler import handler_config
from .vision_handler import VisionHandler


class ObjectDetector(VisionHandler):
    """Image in, the labelled boxes found in it with their scores out."""

    threshold = 0.5

    def initialize(self, context: Context) -> None:
        super().initialize(context)
        threshold = handler_config(context).get("threshold", self.threshold)
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
            raise ValueError(f"handler.threshold in the model config must be a number in [0, 1], got {threshold!r}")
        self.threshold = float(threshold)

    def preprocess(self, data: list[Any]) -> Any:
        """The batch's images as a list of tensors, not stacked: they need not be of one size."""
        return [image.to(self.device) for image in self.images(data)]

    def postprocess(self, data: list[dict[str, torch.Tensor]]) -> list[Any]:
        result = []
        for detections in data:
            keep = detections["scores"] >= self.threshold
            boxes, labels, scores = (detections[key][keep].tolist() for key in ("boxes", "labels", "scores"))
            found = zip(boxes, labels, scores, strict=True)
            result.append([{self._label(label): box, "score": score} for box, label, score in found])
        return result

    def _label(self, label: int) -> str:
        name = self.mapping.get(str(label), str(label)) if self.mapping else str(label)
        return str(name)
