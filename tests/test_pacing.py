"""``Pacing``, the policy that decides which refused connections rest (issue 13): a connection that comes straight
back after its refusal rests, one that paces itself does not, and "straight back" allows for the event loop's own
lag, which a probe measures while refusals last. Pure policy on a real event loop; the HTTP behaviour is in
tests/test_shedding.py."""

from __future__ import annotations

import asyncio
import time

from servekit.api.pacing import Pacing


def test_pacing_rests_a_connection_that_comes_straight_back_and_not_one_that_waits() -> None:
    async def scenario() -> tuple[bool, bool, float, float]:
        pacing = Pacing()
        loop = asyncio.get_running_loop()
        refused_at, wake = pacing.refused(loop)
        return (
            pacing.straight_back(refused_at, refused_at + 0.001),
            pacing.straight_back(refused_at, refused_at + 0.1),
            refused_at,
            wake,
        )

    straight, paced, refused_at, wake = asyncio.run(scenario())
    assert straight and not paced
    assert refused_at <= wake <= refused_at + Pacing.tick_s + 1e-9  # alone, it rests until the next tick at most


def test_pacing_allows_for_a_busy_event_loop_and_forgets_it_when_refusals_stop() -> None:
    async def scenario() -> tuple[float, bool, float, list[bool]]:
        pacing = Pacing()
        loop = asyncio.get_running_loop()
        refusing = [pacing.refusing(loop)]
        refused_at, _ = pacing.refused(loop)
        refusing.append(pacing.refusing(loop))
        await asyncio.sleep(0)
        time.sleep(0.05)  # the loop is busy for 50 ms: the probe, due after 10 ms, fires about 40 ms late
        await asyncio.sleep(0.001)
        lagged = pacing.lag
        late_but_straight = pacing.straight_back(refused_at, refused_at + 0.04)
        await asyncio.sleep(1.2)  # no refusal for a second: the probe stops and the lag is forgotten
        refusing.append(pacing.refusing(loop))
        return lagged, late_but_straight, pacing.lag, refusing

    lagged, late_but_straight, after, refusing = asyncio.run(scenario())
    assert lagged >= 0.03
    assert late_but_straight
    assert after == 0.0
    assert refusing == [False, True, False]  # the port refuses from its first refusal until a second without one


def test_pacing_rest_grows_with_the_resting_connections_up_to_its_bound() -> None:
    pacing = Pacing()
    pacing.resting = 4000
    assert pacing.wake_at(100.0) == 100.0 + Pacing.max_rest_s
    pacing.resting = 40
    assert 100.1 <= pacing.wake_at(100.0) <= 100.1 + Pacing.tick_s
