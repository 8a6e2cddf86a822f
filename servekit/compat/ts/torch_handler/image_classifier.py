"""``ts.torch_handler.image_classifier``: servekit's built-in of that name, for handler files that subclass it."""

from servekit_handlers.image_classifier import ImageClassifier

__all__ = ["ImageClassifier"]
