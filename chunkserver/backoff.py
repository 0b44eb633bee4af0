"""The one backoff formula of the Python side: capped exponential, with jitter.

The client retries a chunk, the hooks retry a delivery; both wait `min(cap, base * 2**attempt)`
seconds times a random factor in [least_fraction, 1]: 0.5 for the client (its retries stay
spaced), 0 (full jitter) for the hooks (many events due at once spread out).
"""

from __future__ import annotations

import random


def jittered_delay(attempt: int, *, base: float, cap: float, least_fraction: float) -> float:
    ceiling: float = min(cap, base * 2**attempt)
    return ceiling * random.uniform(least_fraction, 1.0)
