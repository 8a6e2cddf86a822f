"""``ts.torch_handler.image_segmenter``: servekit's built-in of that name, for handler files that subclass it."""

from servekit_handlers.image_segmenter import ImageSegmenter

__all__ = ["ImageSegmenter"]
