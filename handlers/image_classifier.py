"""``image_classifier``: TorchServe's ``ImageClassifier``.

Per request one image (see ``vision_handler``), resized to 256 on its shorter side, centre-cropped to 224 x 224 and
normalized with ImageNet's mean and standard deviation; the answer is the top ``topk`` classes (5, or every class if
there are fewer) after a softmax, as ``{label: probability}`` in decreasing order, labels from ``index_to_name.json``
(else the class index). The model-config YAML can set ``handler: {topk: N}``.

Runs in the worker process; never imports asyncio or fastapi.
"""

from __future__ import annotations

from typing import Any

import torch

from servekit.handler import Context, map_class_to_label

from .base_handler import handler_config, positive_int
from .image import IMAGENET_MEAN, IMAGENET_STD, CenterCrop, Compose, Normalize, Resize, ToRGB, ToTensor
from .vision_handler import VisionHandler


class ImageClassifier(VisionHandler):
    """Image in, ``{label: probability}`` of the ``topk`` most likely classes out."""

    topk = 5
    image_processing = Compose(
        [ToRGB(), Resize(256), CenterCrop(224), ToTensor(), Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]
    )

    def initialize(self, context: Context) -> None:
        super().initialize(context)
        self.topk = positive_int(handler_config(context), "topk", self.topk)

    def set_max_result_classes(self, topk: int) -> None:
        self.topk = topk

    def get_max_result_classes(self) -> int:
        return self.topk

    def postprocess(self, data: torch.Tensor) -> list[Any]:
        probabilities = torch.nn.functional.softmax(data, dim=1)
        probs, classes = torch.topk(probabilities, min(self.topk, probabilities.shape[1]), dim=1)
        return map_class_to_label(probs.tolist(), self.mapping, classes.tolist())  # type: ignore[no-any-return]
