"""``ts.torch_handler.vision_handler``: servekit's built-in of that name, for handler files that subclass it."""

from servekit_handlers.vision_handler import VisionHandler

__all__ = ["VisionHandler"]
