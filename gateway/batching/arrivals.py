"""How requests arrive at one batcher: what its adaptive delay decides from.

The rate counted is that of rows arriving while the batcher is busy (a request queued, forming
or running), per second busy: a lone closed-loop client never arrives while its own request is
out, so its requests go at once, while independent traffic keeps Triton's wait.

That rate alone cannot start waiting for clients that the front end paces: grpc.aio hands the
loop one call per completion-queue round trip, so 16 closed-loop gRPC clients reach the batcher
one by one, each after the last batch finished, exactly like one closed-loop client, and no row
ever arrives while busy. So when the recent gap between any two arrivals (idle or busy) is at
most ``PROBE_GAPS`` times the delay left, a short batch waits anyway, a probe, for two gaps at
most: a row that joins counts as arriving while busy, and the rate takes over; a probe that
catches nothing backs off, doubling the batches that go before the next one (up to
``PROBE_MAX_SKIP``), so a lone client pays it about log2(requests) times.
"""

from __future__ import annotations

# How much each new observation of the arrival rate counts: the estimate follows about the
# last ten arrivals or busy periods.
ARRIVAL_DECAY = 0.9
# A batch waiting for company decides again after two expected gaps, but not more often than
# this (at a very high rate, or all arrivals at one instant, a timer per gap would spin).
MIN_RECHECK_S = 0.0005
# A probe waits while at most this many gaps between arrivals fit in the delay left: even
# half a gap gives a row about two chances in five, and a probe that fails backs off.
PROBE_GAPS = 2.0
# A failed probe lets this many batches at most go before the next.
PROBE_MAX_SKIP = 4096


class Arrivals:
    """One batcher's arrivals: the busy arrival rate (rows and busy seconds, both decayed by
    ``ARRIVAL_DECAY`` per observation), the recent gap between any two arrivals, and the
    probe's back-off. Times are the batcher's clock."""

    __slots__ = ("_backoff", "_busy_rows", "_busy_s", "_busy_since", "_gap_s", "_last_s", "_skip")

    def __init__(self) -> None:
        self._busy_rows = 0.0
        self._busy_s = 0.0
        self._busy_since: float | None = None  # when busy time was last counted; None: idle
        self._last_s: float | None = None  # the last arrival
        self._gap_s: float | None = None  # None before two arrivals
        self._skip = 0  # probes still to let go
        self._backoff = 1  # the skip after the next failed probe

    def arrived(self, now: float, rows: int) -> None:
        """A request of ``rows`` arrived: it starts a busy period, or counts in the one going."""
        last, self._last_s = self._last_s, now
        if last is not None:
            gap, new = self._gap_s, now - last
            self._gap_s = new if gap is None else gap + (1 - ARRIVAL_DECAY) * (new - gap)
        busy_since = self._busy_since
        if busy_since is None:
            self._busy_since = now  # this arrival found the batcher idle
        else:
            self._observe(now, busy_since, rows)

    def idle(self, now: float) -> None:
        """Nothing is outstanding any more: the busy period (if one was going) ends."""
        busy_since = self._busy_since
        if busy_since is not None:
            self._observe(now, busy_since, 0)
            self._busy_since = None

    def _observe(self, now: float, busy_since: float, rows: int) -> None:
        self._busy_s = ARRIVAL_DECAY * self._busy_s + (now - busy_since)
        self._busy_rows = ARRIVAL_DECAY * self._busy_rows + rows
        self._busy_since = now

    def rate(self, now: float) -> float:
        """Rows per second arriving while busy, recently (0.0 before any; inf when they all came
        at one instant); the busy time since the last arrival counts too."""
        if self._busy_rows == 0:
            return 0.0
        busy_s = self._busy_s
        if self._busy_since is not None:
            busy_s += now - self._busy_since
        return self._busy_rows / busy_s if busy_s > 0 else float("inf")

    def probe(self, wait_s: float) -> float | None:
        """How long a short batch that the busy rate would send now waits anyway (None: it
        goes): two gaps between recent arrivals at most, when the ``wait_s`` left is at least
        half a gap, unless a probe that failed still has batches to let go."""
        gap = self._gap_s
        if gap is None or gap > PROBE_GAPS * wait_s:
            return None
        if self._skip > 0:
            self._skip -= 1
            return None
        return min(wait_s, max(2.0 * gap, MIN_RECHECK_S))

    def probed(self, joined: bool) -> None:
        """A probe ended: a row joined (the busy rate counted it; probes go on), or none did
        (let twice as many batches go before the next probe as after the last failure)."""
        if joined:
            self._backoff = 1
        else:
            self._skip = self._backoff
            self._backoff = min(2 * self._backoff, PROBE_MAX_SKIP)
