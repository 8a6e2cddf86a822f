"""How the connections of a port are paced and timed: ``Pacing`` (how long a connection refused for overload rests
before it is read again, issue 13) and ``Deadlines`` (the read deadlines of the connections, swept once per
period). Used by ``servekit.api.http``; pure policy and bookkeeping, no HTTP."""

from __future__ import annotations

import asyncio
import math
from typing import Protocol


class Watched(Protocol):
    """A connection whose read deadline ``Deadlines`` checks."""

    loop: asyncio.AbstractEventLoop

    def expire(self, now: float) -> None: ...


class Pacing:
    """How long connections refused for overload rest. Under overload a closed-loop client sends its next request
    the moment it is refused, and an event loop that reads every ready connection in turn spends itself on refusals
    while the admitted requests and the workers' results wait behind them (issue 13). So a refused connection is not
    read again for ``resting / rate`` seconds (at most ``max_rest_s``; its refusal's ``Retry-After`` says how long):
    all resting connections together come back at about ``rate`` a second, whatever their number. Wake times fall
    on ``tick_s`` boundaries, so that connections waking together are read in one turn of the event loop."""

    rate = 400.0
    max_rest_s = 2.0
    tick_s = 0.05

    def __init__(self) -> None:
        self.resting = 0

    def wake_at(self, now: float) -> float:
        """When a connection refused at ``now`` (loop time) is read again."""
        rest = min(self.max_rest_s, self.resting / self.rate)
        return float(math.ceil((now + rest) / self.tick_s) * self.tick_s)


class Deadlines:
    """The read deadlines of a port's connections, checked by one sweep every ``period_s`` rather than by a timer
    armed and cancelled two or three times per request."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._watched: set[Watched] = set()
        self._sweep: asyncio.TimerHandle | None = None

    def watch(self, connection: Watched) -> None:
        self._watched.add(connection)
        if self._sweep is None:
            self._sweep = connection.loop.call_later(self.period_s, self._check, connection.loop)

    def forget(self, connection: Watched) -> None:
        self._watched.discard(connection)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for connection in list(self._watched):
            connection.expire(now)
        self._sweep = loop.call_later(self.period_s, self._check, loop) if self._watched else None
