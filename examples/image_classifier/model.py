"""The image_classifier example: what share of an image each of 11 named colours covers.

A 1x1 convolution scores every pixel against each colour (its weights put the nearest colour highest), a softmax
turns the scores into per-pixel colour probabilities, and their mean over the image is the share of each colour. The
model returns the log of the shares, so that the handler's softmax gives the shares back: the answer reads
"45% green, 40% blue, ...". The weights are not trained: ``model_store/build_examples.py`` sets them from the colours.

Input: ImageNet-normalized RGB images (the ``image_classifier`` handler's preprocessing), shape (N, 3, H, W).
"""

import torch
from torch import nn

NUM_COLORS = 11


class ColorClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Conv2d(3, NUM_COLORS, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shares = torch.softmax(self.score(x), dim=1).mean(dim=(2, 3))
        return torch.log(shares.clamp_min(1e-12))
