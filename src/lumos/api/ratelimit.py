"""Token-bucket rate limits of the API process (`Limits.rate_per_s` / `rate_burst` per client
address, `owner_rate_per_s` / `owner_rate_burst` per owner key) on session create and extend.

A bucket holds up to `burst` tokens and refills at `rate` tokens per second; a request takes one
token or is refused with the seconds until the next one (HTTP 429, Retry-After). Buckets live in
this process: with several API processes each enforces its own (so the cluster-wide rate is at
most the sum). At most `max_keys` buckets are kept; the least recently used one is dropped first
(it would start full again, which only ever errs toward letting a request through).

The client address is the socket peer as uvicorn reports it: behind a reverse proxy, run uvicorn
with --proxy-headers and --forwarded-allow-ips set to the proxy, or every client shares the
proxy's bucket.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    """One token bucket per key. rate 0 turns the limiter off."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s < 0 or burst < 1 or max_keys < 1:
            raise ValueError("RateLimiter needs rate_per_s >= 0, burst >= 1 and max_keys >= 1")
        self.rate = float(rate_per_s)
        self.burst = float(burst)
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, t)

    def take(self, key: str) -> float:
        """Take one token for key: 0.0 if allowed, else the seconds until one is available."""
        if self.rate == 0:
            return 0.0
        now = self.clock()
        tokens, stamp = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(wait_s: float) -> int:
    """A Retry-After header value (whole seconds, at least 1) for a wait."""
    return max(1, math.ceil(wait_s))
