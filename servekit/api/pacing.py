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
    while the admitted requests and the workers' results wait behind them (issue 13). So a connection that comes
    straight back after its refusal is not read again until ``resting / rate`` seconds after that refusal (at most
    ``max_rest_s``; the refusal's ``Retry-After`` says how long): all resting connections together come back at about
    ``rate`` a second, whatever their number. A client that paces itself (an open-loop load, a client with think
    time) is not made to wait: its requests cost no more than it chose to send, and stalling it would leave capacity
    unused. "Straight back" is within ``retry_gap_s`` plus twice the event loop's recent lag (a busy loop reads
    every connection late: a client that came straight back is seen up to two turns of the loop later), which a
    timer measures every ``probe_s`` while there are refusals. Wake times fall on ``tick_s`` boundaries, so that
    connections waking together are read in one turn of the event loop; short ticks (5 ms), so that no turn reads a
    burst of woken connections large enough to lag the loop, which would make paced clients look straight back
    (50 ms ticks: open loop at 2x W1's capacity 0.22-0.23 of capacity served, 503 p50 0.2-2 s; 5 ms: 0.29-0.32,
    503 p50 60-73 ms; benchmarks/RESULTS.md)."""

    rate = 400.0
    max_rest_s = 2.0
    tick_s = 0.005
    retry_gap_s = 0.01
    probe_s = 0.01

    def __init__(self) -> None:
        self.resting = 0
        self.lag = 0.0  # the event loop's recent lag (s): the latest probe's, or an earlier larger one decaying
        self._last_refusal = -math.inf
        self._probing = False

    def refused(self, loop: asyncio.AbstractEventLoop) -> tuple[float, float]:
        """A connection was refused now: (now, when it is read again if it comes straight back), in loop time."""
        now = self._last_refusal = loop.time()
        if not self._probing:
            self._probing = True
            loop.call_at(now + self.probe_s, self._probe, loop, now + self.probe_s)
        return now, self.wake_at(now)

    def refusing(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether a connection of this port was refused within the last second."""
        return loop.time() - self._last_refusal < 1.0

    def straight_back(self, refused_at: float, now: float) -> bool:
        """Whether a connection refused at ``refused_at`` and sending again at ``now`` came straight back."""
        return now - refused_at < self.retry_gap_s + 2 * self.lag

    def wake_at(self, now: float) -> float:
        """When a connection refused at ``now`` (loop time) is read again."""
        rest = min(self.max_rest_s, self.resting / self.rate)
        return float(math.ceil((now + rest) / self.tick_s) * self.tick_s)

    def _probe(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        now = loop.time()
        self.lag = max(now - due, self.lag * 0.8)
        if now - self._last_refusal > 1.0:  # no refusal for a second: stop probing
            self._probing, self.lag = False, 0.0
            return
        loop.call_at(now + self.probe_s, self._probe, loop, now + self.probe_s)


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
