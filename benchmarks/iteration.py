"""The worker's side of continuous batching alone (issue 17): tokens per CPU second of its iteration loop.

    python benchmarks/iteration.py                        # 64 requests in flight, 15 s
    python benchmarks/iteration.py --seconds 30 --streams 16
    python benchmarks/iteration.py --repo /tmp/before     # another checkout's servekit and example, to compare
    python benchmarks/iteration.py --bare                 # servekit's loop alone: a handler with no model

``servekit.continuous.IterationLoop`` runs the example handler of ``examples/generative`` (the tiny transformer,
``continuousBatching: true``, ``batchSize`` 64) in a thread of this process, over a socket pair whose other end this
script drives as the front end would: it keeps ``--streams`` requests in flight (the same seeded mix as
``continuous.py``: prompts of 4-32 bytes, 3 in 4 asking for 4-32 tokens, 1 in 4 for 128-192), sending a new request
for each one that ends. Printed: tokens (chunks) per CPU second of the loop's thread (``time.thread_time``), and
iterations. No HTTP, no second process, no client: the number moves with the loop's own costs (servekit's per-chunk
bookkeeping, the handler, the model). The machine's load still moves it (on this shared machine, 10 % between two
runs of one checkout), so alternate checkouts (``--repo``) and compare pairs. The driver shares the GIL with the loop:
compare checkouts with this script, not with ``continuous.py``'s absolute numbers.

With ``--bare``, the handler has no model: it counts each request's ``max_new_tokens`` down, one chunk per request per
iteration, with TorchServe's stopping criteria, so what is measured is servekit's own cost per chunk (taking the
handler's answers, building and sending the steps, requests joining and leaving) and the little the handler does.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from continuous import jobs  # benchmarks/continuous.py, beside this script

REPO = Path(__file__).resolve().parent.parent
BARE = """
left = {}  # request id -> chunks still to send


def stop(rid):
    if left[rid]:
        return False
    del left[rid]
    return True


def handle(data, context):
    if data is None:  # loaded (TorchServe calls a function handler once with no data)
        return None
    ids = [context.get_request_id(i) for i in range(len(data))]
    for rid, row in zip(ids, data):
        if row:
            left[rid] = row["body"]["max_new_tokens"]
        left[rid] -= 1
    context.stopping_criteria = [lambda chunk, rid=rid: stop(rid) for rid in ids]
    return ["17\\n"] * len(ids)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--streams", type=int, default=64, help="requests kept in flight")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose servekit and example run")
    parser.add_argument("--bare", action="store_true", help="a handler without a model: servekit's cost per chunk")
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo))
    protocol = importlib.import_module("servekit.protocol")
    continuous = importlib.import_module("servekit.continuous")
    worker_module = importlib.import_module("servekit.worker")

    model_dir = Path(tempfile.mkdtemp(prefix="servekit-iteration-"))
    try:
        if args.bare:
            (model_dir / "handler.py").write_text(BARE)
        else:
            for name in ("handler.py", "decoder.py"):
                shutil.copy(args.repo / "examples" / "generative" / name, model_dir)
        config = {"continuousBatching": True, "handler": {"seed": 0}}
        command = protocol.LoadCommand("m", str(model_dir), "handler", {}, config, args.batch_size, None, 1)
        worker_module.prepare_process(command)
        worker = worker_module.Worker(command)
        front, back = socket.socketpair()
        loop = continuous.IterationLoop(worker, back)
        cpu: list[float] = []

        def serve() -> None:
            start = time.thread_time()
            loop.serve()
            cpu.append(time.thread_time() - start)

        thread = threading.Thread(target=serve)
        thread.start()
        source = itertools.cycle(jobs(20000))  # continuous.py's requests, in its order
        sent = 0

        def send(count: int) -> None:
            nonlocal sent
            requests = []
            for _ in range(count):
                sent += 1
                field = protocol.Field("body", "application/json", next(source))
                requests.append(protocol.Request(f"r{sent}", {}, (field,)))
            protocol.send_frame(front, protocol.encode_batch(requests))

        send(args.streams)
        tokens = iterations = 0
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            frame = protocol.recv_frame(front)
            assert frame is not None, "the loop closed its socket"
            header, _ = protocol.decode(frame)
            tokens += len(header["chunks"])
            iterations += header.get("iteration") is not False
            if ended := sum(1 for chunk in header["chunks"] if chunk[5]):
                send(ended)
        front.close()
        thread.join()
        back.close()
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    print(
        f"{args.repo}: {tokens / cpu[0]:,.0f} tokens per CPU second of the loop "
        f"({tokens:,} tokens, {iterations:,} iterations, {cpu[0]:.2f} CPU s, {args.streams} in flight"
        f"{', bare handler' if args.bare else ''}; {cpu[0] / tokens * 1e6:.2f} us a token)"
    )


if __name__ == "__main__":
    main()
