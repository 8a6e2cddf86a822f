"""``ts.torch_handler.base_handler``: also the built-in handler named ``base_handler``."""

from servekit import handler


class BaseHandler(handler.BaseHandler):
    """TorchServe's ``BaseHandler``; defined here so that ``--handler base_handler`` finds one class."""
