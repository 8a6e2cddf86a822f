"""``ts.torch_handler.text_classifier``: servekit's built-in of that name, for handler files that subclass it."""

from servekit_handlers.text_classifier import TextClassifier

__all__ = ["TextClassifier"]
