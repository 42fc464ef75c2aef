"""How the server ran its linked forwards (in which graph, or eagerly), logged every so often:
a load run's server log then tells whether the graphs serve it."""
from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger(__name__)


class Tally:
    def __init__(self, what: str, every: int = 500):
        self.what, self.every = what, every
        self.counts: Counter[str] = Counter()

    def add(self, how: str) -> None:
        self.counts[how] += 1
        if self.counts.total() % self.every == 0:
            logger.info("epic: %s so far: %s", self.what, dict(self.counts))
