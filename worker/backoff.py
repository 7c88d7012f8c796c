"""Capped exponential backoff with full jitter (the AWS Architecture Blog's "Exponential Backoff
And Jitter"), shared by the worker and the torch-free echo client."""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential backoff with full jitter; ``rng`` is injectable for tests."""

    def __init__(self, initial: float = 0.5, cap: float = 15.0,
                 rng: random.Random | None = None) -> None:
        self.initial, self.cap = initial, cap
        self.attempt = 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * 2**self.attempt)
        self.attempt += 1
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0
