"""Bounded image decoding, and the torchvision transforms that the built-in vision handlers need, on Pillow and torch.

``decode_image`` is how the built-ins turn request bytes into an image. It reads the header first and refuses, with a
400 that says why, anything that is not an image of an allowed format, an image over the pixel cap (checked before a
single pixel is decoded, so a decompression bomb costs nothing), and a corrupt or truncated image.

The transforms have torchvision's names, arguments and results for PIL images (``Resize`` and ``CenterCrop`` give
the same pixels, ``ToTensor`` and ``Normalize`` the same tensors), so a handler written for TorchServe keeps its
``image_processing`` pipeline; torchvision's own transforms work in their place where torchvision is installed.

Runs in the worker process; imports only Pillow, torch and the handler contract.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from servekit.handler import InvalidInput

# 4096 x 4096: an RGB image of this size is 48 MiB decoded and 192 MiB as a float tensor. Pillow's own cap
# (Image.MAX_IMAGE_PIXELS, 89 million pixels) is far above what a worker should decode for one request.
DEFAULT_MAX_PIXELS = 4096 * 4096
# The formats decode_image opens; never the ones Pillow hands to an external program (EPS runs Ghostscript).
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")
# What torchvision's ImageNet models (and TorchServe's image handlers) normalize with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(data: bytes | bytearray, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The decoded image (first frame, mode as stored), at most ``max_pixels`` pixels.
    Raises ``InvalidInput`` (400) for anything else."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own cap; ours is lower and checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"Image too large: {exc}") from None
    except UnidentifiedImageError:
        kinds = ", ".join(FORMATS)
        raise InvalidInput(f"The request is not an image of a known format ({kinds})") from None
    except Exception as exc:  # Pillow's plugins raise many types for input they cannot read
        raise InvalidInput(f"The request is not a readable image: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidInput(
            f"Image of {width}x{height} = {width * height} pixels is over the limit of {max_pixels} pixels"
        )
    if width * height == 0:
        raise InvalidInput(f"Image of {width}x{height} pixels is empty")
    try:
        image.load()
    except Exception as exc:
        raise InvalidInput(f"Corrupt or truncated {image.format} image: {exc}") from None
    return image


class Compose:
    """Apply ``transforms`` in order (torchvision's ``Compose``)."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, value: Any) -> Any:
        for transform in self.transforms:
            value = transform(value)
        return value


class ToRGB:
    """Convert any image mode (palette, grey, alpha, CMYK) to RGB, so that a 3-channel model accepts it."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")


class Resize:
    """torchvision's ``Resize`` for PIL images: an ``int`` is the new length of the shorter side (aspect kept),
    ``(height, width)`` the exact size."""

    def __init__(self, size: int | Sequence[int], interpolation: Image.Resampling = Image.Resampling.BILINEAR) -> None:
        self.size = size
        self.interpolation = interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if isinstance(self.size, int) or len(self.size) == 1:
            short = self.size if isinstance(self.size, int) else self.size[0]
            if width <= height:
                new_width, new_height = short, int(short * height / width)
            else:
                new_width, new_height = int(short * width / height), short
        else:
            new_height, new_width = self.size
        if (new_width, new_height) == (width, height):
            return image
        return image.resize((new_width, new_height), self.interpolation)


class CenterCrop:
    """torchvision's ``CenterCrop`` for PIL images: the centre ``size`` (``int`` or ``(height, width)``), padded with
    zeros where the image is smaller."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = (size, size) if isinstance(size, int) else (size[0], size[-1])

    def __call__(self, image: Image.Image) -> Image.Image:
        crop_height, crop_width = self.size
        width, height = image.size
        if crop_width > width or crop_height > height:
            pad_left, pad_top = max(crop_width - width, 0) // 2, max(crop_height - height, 0) // 2
            padded = Image.new(image.mode, (max(width, crop_width), max(height, crop_height)))
            padded.paste(image, (pad_left, pad_top))
            image, (width, height) = padded, padded.size
        top = round((height - crop_height) / 2.0)
        left = round((width - crop_width) / 2.0)
        return image.crop((left, top, left + crop_width, top + crop_height))


class ToTensor:
    """torchvision's ``ToTensor``: a ``(channels, height, width)`` tensor, float in [0, 1] for 8-bit modes; 32-bit
    integer and float modes keep their values."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode == "1":
            image = image.convert("L")
        elif image.mode.startswith("I;16"):
            image = image.convert("I")
        dtype = {"I": torch.int32, "F": torch.float32}.get(image.mode, torch.uint8)
        raw = bytearray(image.tobytes())
        tensor = torch.frombuffer(raw, dtype=dtype)  # Pillow's "I" and "F" raw data is in native byte order
        width, height = image.size
        tensor = tensor.view(height, width, len(image.getbands())).permute(2, 0, 1).contiguous()
        return tensor.to(torch.float32).div(255) if dtype == torch.uint8 else tensor


class Normalize:
    """torchvision's ``Normalize``: ``(tensor - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device)[:, None, None]
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device)[:, None, None]
        return tensor.sub(mean).div(std)
