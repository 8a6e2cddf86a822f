"""The object_detector example: finds the red, green, blue and yellow objects on a light background.

A 1x1 convolution scores every pixel against the background and each colour (its weights put the nearest colour
highest); each colour that covers at least ``MIN_PIXELS`` pixels is one detection, boxed around all its pixels and
scored by the mean probability of its pixels. The output is torchvision's detection format: per image a dict of
``boxes`` (N x 4, x1 y1 x2 y2), ``labels`` (1-4; 0 is the background) and ``scores``. The weights are not trained:
``model_store/build_examples.py`` sets them from the colours.

Input: a list of RGB image tensors in [0, 1], each (3, H, W) (the ``object_detector`` handler's preprocessing).
"""

import torch
from torch import nn

NUM_CLASSES = 5  # background, red, green, blue, yellow
MIN_PIXELS = 16


class ColorDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Conv2d(3, NUM_CLASSES, kernel_size=1)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.detect(image) for image in images]

    def detect(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        probabilities, classes = torch.softmax(self.score(image[None]), dim=1)[0].max(dim=0)
        boxes, labels, scores = [], [], []
        for label in range(1, NUM_CLASSES):
            mask = classes == label
            if int(mask.sum()) < MIN_PIXELS:
                continue
            ys, xs = mask.nonzero(as_tuple=True)
            boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
            labels.append(label)
            scores.append(probabilities[mask].mean())
        if not boxes:
            return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
        return {"boxes": torch.stack(boxes), "labels": torch.tensor(labels), "scores": torch.stack(scores)}
