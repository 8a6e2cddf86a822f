"""The stateful example's model: one step of a running sum, ``sum' = sum + value``, as a linear layer whose two
weights (the serialized file) are 1: a stand-in for the step of a recurrent model, whose state is carried from one
request of a sequence to the next by the handler (``handler.py``)."""

import torch
from torch import nn


class Accumulator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.step = nn.Linear(2, 1, bias=False)

    def forward(self, state: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The next state of each sequence of the batch: ``state`` and ``value`` are 1-D, one entry per sequence."""
        return self.step(torch.stack([state, value], dim=-1)).squeeze(-1)
