"""servekit's built-in handlers, installed as the package ``servekit_handlers`` (this folder).

Named by their short name in ``--handler`` or in an archive's manifest, as in TorchServe:

- ``image_classifier``: image in, the top ``topk`` (5) classes out as ``{label: probability}``.
- ``image_segmenter``: image in, per pixel ``[class index, probability]`` out.
- ``object_detector``: image in, a list of ``{label: [x1, y1, x2, y2], "score": s}`` out.
- ``text_classifier``: UTF-8 text in, ``{label: probability}`` over every class out.
- ``tensor``: a JSON array or ``torch.save`` tensor bytes in, the model's output out; the default when an archive
  names no handler.
- ``base_handler``: TorchServe's ``BaseHandler``.

Inputs and outputs are TorchServe's (``../shared/reference/torchserve.md`` §5.5), without torchvision: images are
decoded and transformed with Pillow and torch (``image``). Bad input is a 400 naming what was wrong, for that request
only. Handler files written for TorchServe import these classes as ``ts.torch_handler.<name>``.

Runs in the worker process; imports only the handler contract (``servekit.handler``), torch and Pillow.
"""
