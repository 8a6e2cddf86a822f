"""A TorchServe-style handler for the example MLP, unchanged from what TorchServe would run.

Request body: ``{"data": [16 floats]}`` (or a bare list); response: a JSON list of 4 floats.
"""

import json

import torch
from ts.torch_handler.base_handler import BaseHandler


class MLPHandler(BaseHandler):
    def preprocess(self, data):
        rows = []
        for row in data:
            body = row.get("body", row.get("data"))
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            rows.append(body["data"] if isinstance(body, dict) else body)
        return torch.tensor(rows, dtype=torch.float32)
