"""``ts.torch_handler.object_detector``: servekit's built-in of that name, for handler files that subclass it."""

from servekit_handlers.object_detector import ObjectDetector

__all__ = ["ObjectDetector"]
