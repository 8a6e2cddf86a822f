"""The text_classifier example: the topic of a news sentence (World, Sports, Business, Sci/Tec, as AG_NEWS).

TorchServe's text classification model: an ``nn.EmbeddingBag`` over the words and bigrams of the text, then a linear
layer. Here each word of the small vocabulary (``source_vocab.pt``) counts one point for its topic, and the linear
layer scales the points to logits. The weights are not trained: ``model_store/build_examples.py`` sets them from
its word lists.

Input: ``(token_ids, offsets)`` as the ``text_classifier`` handler gives them.
"""

import torch
from torch import nn

VOCAB_SIZE = 65
NUM_TOPICS = 4


class NewsClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(VOCAB_SIZE, NUM_TOPICS, mode="sum")
        self.fc = nn.Linear(NUM_TOPICS, NUM_TOPICS)

    def forward(self, text: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embedding(text, offsets))
