"""The tensor example: degrees Celsius to degrees Fahrenheit (F = 1.8 C + 32), a one-weight linear layer.

Archived with the ``tensor`` handler; its model config declares the input (``celsius``, FP32,
shape [-1, 1]) and the output, so the same model answers ``/predictions`` and the Open Inference Protocol.
"""

import torch
from torch import nn


class CelsiusToFahrenheit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, celsius: torch.Tensor) -> torch.Tensor:
        return self.linear(celsius)
