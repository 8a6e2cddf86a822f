"""A tiny decoder-only transformer with random weights, for continuous batching (its example handler, tests and
benchmark): byte tokens (a vocabulary of 256), learned positions, pre-norm blocks of causal self-attention over a
sliding window of the last ``WINDOW`` positions and an MLP, greedy decoding with a KV cache.

One ``TinyDecoder.step`` runs a ragged batch, as continuous batching wants it: one token for each sequence that is
decoding, and the whole prompt of each sequence that joins (its prefill), through the same layers in one pass (the
last layer goes on with each sequence's last token alone). The ``Cache`` holds the keys and values of the window of
up to ``slots`` sequences, in ring buffers. The sequences decoding occupy its first slots (one that leaves is
replaced by the last, ``Cache.move``), so that a step reads their cache in place. The model computes in float64, so
that a sequence decoded in a batch gets the tokens it gets alone.
"""

import itertools

import torch
from torch import nn

VOCAB = 256
DIM = 64
HEADS = 4
LAYERS = 2
WINDOW = 32  # positions each token attends to (its own and those before it); a prompt fits in it
POSITIONS = 256  # a prompt and the tokens generated after it fit in these


class Cache:
    """Keys and values of the last ``WINDOW`` positions of up to ``slots`` sequences: per layer, [slots, heads,
    WINDOW, head_dim], position p at index p % WINDOW, all in one tensor so that a sequence moves in one copy;
    ``positions`` says which position each index holds (-1: none)."""

    def __init__(self, slots: int) -> None:
        self.windows = torch.zeros((LAYERS, 2, slots, HEADS, WINDOW, DIM // HEADS), dtype=torch.float64)
        self.keys = [self.windows[layer, 0] for layer in range(LAYERS)]  # views of ``windows``
        self.values = [self.windows[layer, 1] for layer in range(LAYERS)]
        self.positions = torch.full((slots, WINDOW), -1)

    def move(self, source: int, target: int) -> None:
        """Slot ``source``'s sequence into slot ``target``."""
        self.windows[:, :, target] = self.windows[:, :, source]
        self.positions[target] = self.positions[source]


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Each query ([n, heads, head_dim]) over its own window ([n, heads, WINDOW, head_dim]), where ``visible``
    ([n, WINDOW])."""
    scores = torch.einsum("nhd,nhwd->nhw", q, keys) * q.shape[-1] ** -0.5
    weights = scores.masked_fill(~visible[:, None, :], float("-inf")).softmax(-1)
    return torch.einsum("nhw,nhwd->nhd", weights, values)


def attend_prompt(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """A prompt's queries ([n, heads, head_dim]) over its one sequence's window ([heads, WINDOW, head_dim]), where
    ``visible`` ([n, WINDOW]): the window is read in place, not copied for each query."""
    scores = torch.einsum("nhd,hwd->nhw", q, keys) * q.shape[-1] ** -0.5
    weights = scores.masked_fill(~visible[:, None, :], float("-inf")).softmax(-1)
    return torch.einsum("nhw,hwd->nhd", weights, values)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(
        self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: "Step", final: bool
    ) -> torch.Tensor:
        """``x``: [tokens, DIM], the decoding tokens (one per slot, from slot 0) then the prompts' tokens. The
        ``final`` block returns one row per sequence, its last token's: every token's keys and values go into the
        cache, but the other rows of a prompt would feed nothing after it."""
        q, k, v = self.qkv(self.norm1(x)).view(-1, 3, HEADS, DIM // HEADS).unbind(1)
        keys[step.slots, :, step.index] = k
        values[step.slots, :, step.index] = v
        if final and step.prompts:
            x, q = x[step.last], q[step.last]
            heard = attend(q, keys[step.windows], values[step.windows], step.visible[step.last])
            x = x + self.out(heard.reshape(-1, DIM))
            return x + self.mlp(self.norm2(x))
        b = step.decoding
        heard = [attend(q[:b], keys[:b], values[:b], step.visible[:b])] if b else []
        start = b
        for slot, length in step.prompts:  # each prompt's tokens over its sequence's window
            end = start + length
            heard.append(attend_prompt(q[start:end], keys[slot], values[slot], step.visible[start:end]))
            start = end
        x = x + self.out(torch.cat(heard).reshape(-1, DIM))
        return x + self.mlp(self.norm2(x))


class Step:
    """Where the tokens of one step go: their slots, positions and ring indices, and what each may see."""

    def __init__(self, cache: Cache, decoding: list[int], prompts: list[tuple[int, list[int]]]) -> None:
        self.decoding = len(decoding)
        self.prompts = [(slot, len(prompt)) for slot, prompt in prompts]
        slots = list(range(self.decoding)) + [slot for slot, prompt in prompts for _ in prompt]
        at = decoding + [p for _, prompt in prompts for p in range(len(prompt))]
        self.slots, self.at = torch.tensor(slots, dtype=torch.long), torch.tensor(at, dtype=torch.long)
        self.index = self.at % WINDOW
        for slot, _ in prompts:
            cache.positions[slot] = -1  # a new sequence in that slot
        cache.positions[self.slots, self.index] = self.at
        seen = cache.positions[self.slots]
        self.visible = (seen >= 0) & (seen <= self.at[:, None])
        self.last: torch.Tensor | None = None  # each sequence's last token
        self.windows: slice | torch.Tensor = slice(0, self.decoding)  # each sequence's slot: read in place if in order
        if prompts:  # (the final block reads these only when prompts join; see Block.forward)
            ends = itertools.accumulate(len(prompt) for _, prompt in prompts)  # each prompt's end, in its rows
            self.last = torch.tensor(list(range(self.decoding)) + [self.decoding + end - 1 for end in ends])
            sequences = list(range(self.decoding)) + [slot for slot, _ in prompts]
            in_order = sequences == list(range(len(sequences)))  # as the handler places them
            self.windows = slice(0, len(sequences)) if in_order else torch.tensor(sequences, dtype=torch.long)


class TinyDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.position = nn.Embedding(POSITIONS, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def step(
        self, cache: Cache, tokens: list[int], positions: list[int], prompts: list[tuple[int, list[int]]]
    ) -> list[int]:
        """One step of a ragged batch: the sequences of the first ``len(tokens)`` slots each feed their last token
        at their position, and each ``(slot, prompt)`` runs its prompt into that slot (a prompt is at most WINDOW
        tokens). Returns the next token of each: the decoding ones first, then the prompts'."""
        step = Step(cache, positions, prompts)
        flat = torch.tensor(tokens + [t for _, prompt in prompts for t in prompt], dtype=torch.long)
        x = self.embed(flat) + self.position(step.at)
        for i, (block, keys, values) in enumerate(zip(self.blocks, cache.keys, cache.values, strict=True)):
            x = block(x, keys, values, step, final=i == LAYERS - 1)
        return self.head(self.norm(x)).argmax(-1).tolist()  # one row per sequence (see Block.forward)


class Sequence:
    """One sequence being generated: its cache slot, the position and token it feeds next, the tokens still to make."""

    def __init__(self, slot: int, position: int, token: int, remaining: int) -> None:
        self.slot = slot
        self.position = position
        self.token = token
        self.remaining = remaining


def build(seed: int = 0) -> TinyDecoder:
    """The model with its random weights, the same for the same seed."""
    torch.manual_seed(seed)
    return TinyDecoder().to(torch.float64).eval()


def tokens_of(prompt: str) -> list[int]:
    return list(prompt.encode())


@torch.inference_mode()
def generate(model: TinyDecoder, prompt: str, max_new_tokens: int) -> list[int]:
    """The tokens greedy decoding gives for ``prompt`` alone: what the handler streams for it."""
    cache = Cache(1)
    tokens = tokens_of(prompt)
    out = model.step(cache, [], [], [(0, tokens)])
    position = len(tokens)
    while len(out) < max_new_tokens:
        out += model.step(cache, [out[-1]], [position], [])
        position += 1
    return out
