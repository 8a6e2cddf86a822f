"""The image_segmenter example: which of 11 named colours each pixel is.

A 1x1 convolution scores every pixel against each colour (its weights put the nearest colour highest), returned as
``{"out": scores}`` like torchvision's segmentation models. The weights are not trained:
``model_store/build_examples.py`` sets them from the colours (the same 11 as the image_classifier example).

Input: ImageNet-normalized RGB images (the ``image_segmenter`` handler's preprocessing), shape (N, 3, H, W).
"""

import torch
from torch import nn

NUM_COLORS = 11


class ColorSegmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Conv2d(3, NUM_COLORS, kernel_size=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.score(x)}
