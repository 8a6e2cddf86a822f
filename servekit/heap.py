"""The garbage collector's settings for servekit's long-running processes: the front end once its ports are bound
and its startup models loaded, a worker once its handler is initialized (``settle``).

What was built until then lives as long as the process, so ``gc.freeze`` takes it out of every later collection;
and the youngest generation is collected every ``YOUNG`` allocations of container objects instead of Python's
700. A request allocates dozens of them, so with the default the front end collected a few hundred times a second,
and under overload, with thousands of connections alive, 15 % of its loop went to collections (2,209 collections,
2.4 s, during a 14 s flood). Measured on W1 (benchmarks/RESULTS.md, seventh session): at 64 connections 7,085 and
6,756 req/s with the default against 8,338 and 8,472 with ``YOUNG`` 10,000, p99 19.8-23.2 ms against 10.8-11.4 ms.
Reference cycles are still collected, only less often; objects that are not in cycles are freed as they die, as
always."""

from __future__ import annotations

import gc

YOUNG = 10_000


def settle() -> None:
    """The process has started: freeze what it built, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG, middle, old)
