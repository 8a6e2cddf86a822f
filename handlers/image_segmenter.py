"""``image_segmenter``: TorchServe's ``ImageSegmenter``.

Per request one image (see ``vision_handler``) at its own size, normalized with ImageNet's mean and standard
deviation. The model returns ``{"out": scores}`` (torchvision's segmentation models) or the scores themselves, of
shape (batch, classes, height, width); the answer is, per pixel, ``[class index, probability]`` of the most likely
class after a softmax: a ``height x width x 2`` nested list. Images of different sizes in one batch are run one by one.

Runs in the worker process; never imports asyncio or fastapi.
"""

from __future__ import annotations

from typing import Any

import torch

from .image import IMAGENET_MEAN, IMAGENET_STD, Compose, Normalize, ToRGB, ToTensor
from .vision_handler import VisionHandler


class ImageSegmenter(VisionHandler):
    """Image in, the most likely class of every pixel and its probability out."""

    image_processing = Compose([ToRGB(), ToTensor(), Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])

    def postprocess(self, data: Any) -> list[Any]:
        scores = data["out"] if isinstance(data, dict) else data
        best = torch.max(torch.nn.functional.softmax(scores, dim=1), dim=1)
        pixels = torch.stack([best.indices.to(best.values.dtype), best.values], dim=3)
        return pixels.tolist()
