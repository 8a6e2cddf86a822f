"""A stateful handler for sequence batching (docs/handlers.md, "Sequence batching"), as TorchServe's
examples/stateful: each sequence's running sum, computed by the model of ``model.py``.

A request's body is a number; its answer is the sum of the numbers its sequence has sent so far. The handler keeps
each sequence's sum in this worker's memory: with ``sequenceBatching: true`` in the model config every request of a
sequence comes to the same worker, one at a time and in order, so the handler finds the sum the previous request
left. A batch holds one request of each of several sequences: ``context.get_sequence_id(i)`` says whose. The sums
are kept in a least-recently-used cache of ``handler: capacity`` entries (the sequences that expire never say so).
"""

import collections

import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException


class RunningSum(BaseHandler):
    def initialize(self, context):
        super().initialize(context)  # model.py's Accumulator, with its weights
        self.capacity = int(context.model_yaml_config.get("handler", {}).get("capacity", 1000))
        self.sums = collections.OrderedDict()  # sequence id -> its sum so far, the least recently used first

    def preprocess(self, data):
        values = []
        for row in data:
            body = row.get("data") or row.get("body")
            if isinstance(body, (bytes, bytearray)):
                body = body.decode("utf-8", "replace")
            try:
                values.append(float(body))
            except (TypeError, ValueError):
                raise PredictionException(f"expected a number, got {body!r}", 400) from None
        return torch.tensor(values)

    def inference(self, values):
        ids = [self.context.get_sequence_id(i) for i in range(len(values))]
        for i, sequence_id in enumerate(ids):
            if self.context.get_request_header(i, self.context.header_key_sequence_start) == "true":
                self.sums.pop(sequence_id, None)  # a new sequence starts from 0, whatever its id
        state = torch.stack([self.sums.get(sequence_id, torch.tensor(0.0)) for sequence_id in ids])
        with torch.inference_mode():
            sums = self.model(state, values)
        for i, (sequence_id, total) in enumerate(zip(ids, sums, strict=True)):
            self.sums[sequence_id] = total
            self.sums.move_to_end(sequence_id)
            if self.context.get_request_header(i, self.context.header_key_sequence_end) == "true":
                del self.sums[sequence_id]  # its last request: nothing to keep
        while len(self.sums) > self.capacity:
            self.sums.popitem(last=False)
        return sums

    def postprocess(self, sums):
        return [total.item() for total in sums]
