"""The garbage collector's settings for servekit's long-running processes: the front end once its ports are bound
and its startup models loaded, a worker once its handler is initialized (``settle``).

What was built until then lives as long as the process, so ``gc.freeze`` takes it out of every later collection;
and the youngest generation is collected every ``YOUNG`` allocations of container objects instead of Python's
700. A request allocates dozens of them, so with the default the front end collected a few hundred times a second,
and with thousands of connections alive each collection had more to scan: under W1's open loop at twice capacity,
2,209 collections took 2.4 s of a 25 s run, about 15 % of the loop while the flood lasted (59 collections, 0.4 s
with ``YOUNG``). At 64 connections throughput stays the same and p99 halves (``benchmarks/ab.py``: 19.9 ms against
8.5 ms; benchmarks/RESULTS.md, seventh session). Reference cycles are still collected, only less often; objects that
are not in cycles are freed as they die, as always."""

from __future__ import annotations

import gc

YOUNG = 10_000


def settle() -> None:
    """The process has started: freeze what it built, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG, middle, old)
