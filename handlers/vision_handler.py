"""``vision_handler``: TorchServe's ``VisionHandler``, the base of the image handlers.

Each request is one image: its ``data`` field or its body, as image bytes (PNG, JPEG, GIF, BMP, WEBP, TIFF, PPM), a
base64 string of them, or a nested list that is already the model's input tensor for that image. Bytes are decoded
by ``image.decode_image`` (at most ``max_pixels`` pixels) and passed through ``image_processing``.

The model-config YAML can set ``handler: {max_image_pixels: N}`` (default 4096 x 4096).

Runs in the worker process; never imports asyncio or fastapi.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

import torch

from servekit.handler import Context, InvalidInput

from .base_handler import BaseHandler, handler_config, json_kind, positive_int, request_value
from .image import DEFAULT_MAX_PIXELS, Compose, ToRGB, ToTensor, decode_image


class VisionHandler(BaseHandler):
    """Decode, bound and transform one image per request; ``preprocess`` stacks them into one batch tensor."""

    # A callable from a PIL image to a tensor; subclasses set their own (torchvision's transforms work too).
    image_processing: Callable[[Any], torch.Tensor] = Compose([ToRGB(), ToTensor()])
    max_image_pixels = DEFAULT_MAX_PIXELS

    def initialize(self, context: Context) -> None:
        super().initialize(context)
        self.max_image_pixels = positive_int(handler_config(context), "max_image_pixels", DEFAULT_MAX_PIXELS)

    def preprocess(self, data: list[Any]) -> torch.Tensor:
        images = self.images(data)
        shapes = sorted({tuple(image.shape) for image in images})
        if len(shapes) > 1:
            # Only a batch of several requests gets here, and the worker then runs each of them alone.
            raise InvalidInput(f"Images of different sizes cannot be stacked into one batch: {shapes}")
        return torch.stack(images).to(self.device)

    def images(self, data: list[Any]) -> list[torch.Tensor]:
        """One preprocessed image tensor per request."""
        return [self.image(row) for row in data]

    def image(self, row: Any) -> torch.Tensor:
        value = request_value(row)
        if isinstance(value, str):
            try:
                value = base64.b64decode("".join(value.split()), validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInput("A text body must be a base64-encoded image") from None
        if isinstance(value, bytes | bytearray):
            return self.image_processing(decode_image(value, self.max_image_pixels))
        if isinstance(value, list):
            return self._tensor_image(value)
        kind = json_kind(value)
        raise InvalidInput(f"Expected image bytes, a base64 string or a nested list; got a JSON {kind}")

    def _tensor_image(self, value: list[Any]) -> torch.Tensor:
        """A nested list sent as the image's tensor (channels, height, width), as TorchServe accepts it."""
        try:
            tensor = torch.tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise InvalidInput(f"The image list is not a rectangular array of numbers: {exc}") from None
        if tensor.dim() != 3:
            shape = list(tensor.shape)
            raise InvalidInput(f"An image list must have 3 dimensions (C, H, W), got shape {shape}")
        if tensor.shape[1] * tensor.shape[2] > self.max_image_pixels:
            raise InvalidInput(f"Image list over the limit of {self.max_image_pixels} pixels")
        return tensor
