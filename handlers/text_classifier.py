"""``text_classifier``: TorchServe's ``TextClassifier``.

Per request one UTF-8 text: its ``data`` field or its body (text, bytes, or a JSON string). It is cleaned as TorchServe
does (HTML tags, accents and punctuation removed), split by torchtext's ``basic_english`` rules, and looked up, with
its bigrams (``ngrams`` = 2), in ``source_vocab.pt``: a ``{token: index}`` dict saved with ``torch.save`` and read with
``weights_only=True`` (a pickled torchtext ``Vocab`` needs ``weightsOnly: false`` in the model config). Tokens not in
the vocabulary get the index of ``<unk>`` (else 0). The model is called as ``model(token_ids, offsets)`` (an
``nn.EmbeddingBag`` model: the batch's ids concatenated, and where each request starts); the answer is
``{label: probability}`` for every class after a softmax, labels from ``index_to_name.json`` (else the class index).

Unlike TorchServe's, which answers only the first request of a batch, every request of the batch is classified.

Runs in the worker process; never imports asyncio or fastapi.
"""

from __future__ import annotations

import os
import re
import string
import unicodedata
from collections.abc import Iterator
from typing import Any

import torch

from servekit.handler import Context, InvalidInput, map_class_to_label

from .base_handler import BaseHandler, json_kind, request_value

CLEANUP_REGEX = re.compile("<.*?>")
# torchtext.data.utils.get_tokenizer("basic_english"), rule for rule
BASIC_ENGLISH = [
    (re.compile(pattern), replacement)
    for pattern, replacement in [
        (r"\'", " '  "),
        (r"\"", ""),
        (r"\.", " . "),
        (r"<br \/>", " "),
        (r",", " , "),
        (r"\(", " ( "),
        (r"\)", " ) "),
        (r"\!", " ! "),
        (r"\?", " ? "),
        (r"\;", " "),
        (r"\:", " "),
        (r"\s+", " "),
    ]
]


class TextClassifier(BaseHandler):
    """Text in, ``{label: probability}`` over every class out."""

    ngrams = 2

    def initialize(self, context: Context) -> None:
        super().initialize(context)
        model_section = (self.manifest or {}).get("model", {})
        model_dir = context.system_properties["model_dir"]
        path = os.path.join(model_dir, model_section.get("sourceVocab") or "source_vocab.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Missing the vocabulary {os.path.basename(path)} in the model archive")
        weights_only = bool(self.model_yaml_config.get("weightsOnly", True))
        try:
            self.source_vocab: Any = torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as exc:
            raise ValueError(
                f"{os.path.basename(path)} must be a {{token: index}} dict saved with torch.save "
                f"(a torchtext Vocab needs weightsOnly: false in the model config): {exc}"
            ) from None
        if isinstance(self.source_vocab, dict):
            self.unknown_index = int(self.source_vocab.get("<unk>", 0))

    def preprocess(self, data: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The token ids of every request, concatenated, and the offset where each request's ids start."""
        ids: list[int] = []
        offsets: list[int] = []
        for row in data:
            tokens = self._tokenize(self._clean(self.text(row)))
            if not tokens:
                raise InvalidInput("The text has no words to classify")
            offsets.append(len(ids))
            ids.extend(self._index(token) for token in ngrams_iterator(tokens, self.ngrams))
        as_tensor = torch.as_tensor
        return as_tensor(ids, dtype=torch.int64, device=self.device), as_tensor(offsets, device=self.device)

    def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        token_ids, offsets = data
        return super().inference(token_ids, offsets, *args, **kwargs)

    def postprocess(self, data: torch.Tensor) -> list[Any]:
        probabilities = torch.nn.functional.softmax(data, dim=1)
        return map_class_to_label(probabilities.tolist(), self.mapping)  # type: ignore[no-any-return]

    @staticmethod
    def text(row: Any) -> str:
        value = request_value(row)
        if isinstance(value, bytes | bytearray):
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInput(f"The text is not valid UTF-8: {exc}") from None
        if not isinstance(value, str):
            kind = json_kind(value)
            raise InvalidInput(f"Expected UTF-8 text (a text body or a JSON string), got a JSON {kind}")
        return value

    def _clean(self, text: str) -> str:
        return self._remove_punctuation(self._remove_accented_characters(self._remove_html_tags(text)))

    def _remove_html_tags(self, text: str) -> str:
        return CLEANUP_REGEX.sub("", text)

    def _remove_accented_characters(self, text: str) -> str:
        return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("utf-8", "ignore")

    def _remove_punctuation(self, text: str) -> str:
        return text.translate(str.maketrans("", "", string.punctuation))

    def _tokenize(self, text: str) -> list[str]:
        line = text.lower()
        for pattern, replacement in BASIC_ENGLISH:
            line = pattern.sub(replacement, line)
        return line.split()

    def _index(self, token: str) -> int:
        if isinstance(self.source_vocab, dict):
            return int(self.source_vocab.get(token, self.unknown_index))
        return int(self.source_vocab[token])  # a torchtext Vocab maps unknown tokens to its default index


def ngrams_iterator(tokens: list[str], ngrams: int) -> Iterator[str]:
    """The tokens, then every run of 2 to ``ngrams`` tokens joined by a space (torchtext's ``ngrams_iterator``)."""
    yield from tokens
    for n in range(2, ngrams + 1):
        for gram in zip(*[tokens[i:] for i in range(n)], strict=False):
            yield " ".join(gram)
