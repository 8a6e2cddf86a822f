"""A TorchServe-style handler for the example MLP, unchanged from what TorchServe would run.

Request body: ``{"data": [16 floats]}``; response: a JSON list of 4 floats. Anything else is a 400.
"""

import json

import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException


class MLPHandler(BaseHandler):
    def preprocess(self, data):
        rows = []
        for row in data:
            body = row.get("body", row.get("data"))
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            if not isinstance(body, dict) or "data" not in body:
                raise PredictionException("expected a JSON object with a 'data' list", 400)
            rows.append(body["data"])
        return torch.tensor(rows, dtype=torch.float32)
