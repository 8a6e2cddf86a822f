"""A generative handler for continuous batching (docs/handlers.md, "Continuous batching"): greedy decoding with the
tiny transformer of ``decoder.py`` (an extra file of the archive), written for TorchServe 0.12's contract.

A request is JSON, ``{"prompt": "some text", "max_new_tokens": 16}``; its answer streams one chunk per generated token:
the token's id and a newline (``"17\\n"``).

With ``continuousBatching: true`` in the model config, each call is one iteration: the requests joining it are
prefilled (their prompt runs into the KV cache, which gives their first token), the others decode one token together,
and ``context.stopping_criteria`` says which requests are done. Without it, a call runs its batch to the end and
streams each step with ``send_intermediate_predict_response``: static batching, where every stream of a batch waits
for the longest one.
"""

import functools
import json

import torch
from decoder import POSITIONS, VOCAB, WINDOW, Cache, Sequence, build, tokens_of
from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

CHUNKS = [f"{token}\n" for token in range(VOCAB)]  # each token's chunk


class Generator(BaseHandler):
    def initialize(self, context):
        self.context = context
        self.model = build(int(context.model_yaml_config.get("handler", {}).get("seed", 0)))
        self.cache = Cache(context.system_properties["batch_size"])
        self.sequences = {}  # by request id, in the cache's first slots
        self.slots = []  # the request id of each slot in use
        self.continuous = context.model_yaml_config.get("continuousBatching") is True
        self.shrink = context.model_yaml_config.get("handler", {}).get("static") == "shrink"
        self.initialized = True

    def handle(self, data, context):
        self.context = context
        if context.get_request_header(0, "describe") == "True":  # GET /models/{m}?customized=true
            return [self.describe_handle()]
        ids = list(context.request_ids.values())  # by index, as get_request_id(i) gives them
        for gone in self.sequences.keys() - ids:  # left the batch: finished, failed, or its client went away
            self.release(gone)
        if not self.continuous:
            return self.run_to_end(ids, data)
        chunks = self.iterate(ids, data)
        context.stopping_criteria = [functools.partial(self.finished, rid) for rid in ids]
        return chunks

    def describe_handle(self):
        return {"continuous": self.continuous, "generating": len(self.sequences)}

    def preprocess(self, row):
        """A request's prompt tokens and token count; 400 for a request that cannot be served as sent."""
        body = row.get("data") or row.get("body")
        if isinstance(body, (bytes, bytearray)):
            try:
                body = json.loads(body)
            except ValueError:
                body = None
        if not isinstance(body, dict):
            raise PredictionException('expected JSON: {"prompt": "...", "max_new_tokens": n}', 400)
        prompt, count = body.get("prompt"), body.get("max_new_tokens", 16)
        if not isinstance(prompt, str) or not prompt:
            raise PredictionException("prompt must be a non-empty string", 400)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise PredictionException("max_new_tokens must be a positive integer", 400)
        tokens = tokens_of(prompt)
        if len(tokens) > WINDOW:
            raise PredictionException(f"prompt must be at most {WINDOW} bytes", 400)
        if len(tokens) + count > POSITIONS:
            raise PredictionException(f"prompt and max_new_tokens must fit in {POSITIONS} tokens", 400)
        return tokens, count

    @torch.inference_mode()
    def iterate(self, ids, data):
        """One iteration: a chunk for each request. Every joining request's inputs are checked before the model runs,
        and the model's step changes nothing the handler keeps until it has returned: a call that raises leaves every
        request as it was (the worker then runs the others again without the one at fault)."""
        joining = {rid: self.preprocess(row) for rid, row in zip(ids, data, strict=True) if rid not in self.sequences}
        chunks = self.step(joining)
        return [chunks[rid] for rid in ids]

    def run_to_end(self, ids, data):
        """Static batching: the whole generation of the batch, streaming each step; a request that has finished gets
        empty chunks until the longest one ends. Its row stays in the batch, computed and dropped, as with
        ``model.generate`` (the model config's ``handler: {static: shrink}`` takes finished rows out instead)."""
        inputs = [self.preprocess(row) for row in data]
        done = set()
        with torch.inference_mode():
            first = self.step(dict(zip(ids, inputs, strict=True)))
            chunks = [first[rid] for rid in ids]
            while True:
                done |= {rid for rid in ids if rid not in done and not self.sequences[rid].remaining}
                if len(done) == len(ids):
                    for rid in ids:
                        self.release(rid)
                    return chunks
                send_intermediate_predict_response(chunks, self.context.request_ids, "ok", 200, self.context)
                if self.shrink:
                    for rid in done:
                        self.release(rid)
                stepped = self.step({}, idle=done)
                chunks = [stepped.get(rid, "") for rid in ids]

    def step(self, joining, idle=()):
        """One step of the model: the next token of every sequence in the cache (but those ``idle``, whose tokens are
        dropped), and the first of each request joining (its prompt runs into the cache in the same pass); the
        chunks, by request id."""
        running = [(rid, self.sequences[rid]) for rid in self.slots]
        prompts = [(len(running) + i, tokens) for i, (tokens, _) in enumerate(joining.values())]
        tokens = [s.token for _, s in running]
        made = self.model.step(self.cache, tokens, [s.position for _, s in running], prompts)
        chunks = {rid: self.advance(rid, t) for (rid, _), t in zip(running, made, strict=False) if rid not in idle}
        firsts = made[len(running) :]
        for (rid, (prompt, count)), (slot, _), token in zip(joining.items(), prompts, firsts, strict=True):
            self.sequences[rid] = Sequence(slot, len(prompt), token, count - 1)
            self.slots.append(rid)
            chunks[rid] = CHUNKS[token]
        return chunks

    def advance(self, rid, token):
        """Take ``token`` as the next of request ``rid``; its chunk."""
        sequence = self.sequences[rid]
        sequence.token, sequence.position, sequence.remaining = token, sequence.position + 1, sequence.remaining - 1
        return CHUNKS[token]

    def finished(self, rid, chunk):
        """TorchServe's stopping criterion of one request, called with its chunk after each iteration."""
        sequence = self.sequences.get(rid)
        if sequence is not None and sequence.remaining:
            return False
        self.release(rid)
        return True

    def release(self, rid):
        """Forget a sequence; the last one in the cache takes its slot."""
        sequence = self.sequences.pop(rid, None)
        if sequence is None:
            return
        last = self.slots.pop()
        if last != rid:
            moved = self.sequences[last]
            self.cache.move(moved.slot, sequence.slot)
            moved.slot = sequence.slot
            self.slots[sequence.slot] = last
