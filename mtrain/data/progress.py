"""Progress lines while a big file is tokenized: records done (of how many, where that is known),
their rate and the tokens', and the time left. A file done within one interval logs nothing here;
the cache's summary line follows either way."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("mtrain.data")

INTERVAL_SECONDS = 10.0  # between two progress lines of one file


class Ticker:
    """Counts records and tokens as they are written; logs a line every `INTERVAL_SECONDS`.
    `total` is asked once, at the first line, so a small file never pays for counting."""

    def __init__(self, source: str, unit: str, total: Callable[[], int | None]):
        self.source, self.unit, self._total_of = source, unit, total
        self.records = self.tokens = 0
        self.start = self.last = time.perf_counter()
        self.interval = INTERVAL_SECONDS
        self._total: int | None = None
        self._asked = False

    def add(self, records: int, tokens: int) -> None:
        self.records += records
        self.tokens += tokens
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            log.info("data: %s", self.line(now - self.start))

    def line(self, elapsed: float) -> str:
        if not self._asked:
            self._total, self._asked = self._total_of(), True
        elapsed = max(elapsed, 1e-9)
        done, total, rate = self.records, self._total, self.records / elapsed
        count = f"{done:,}/{total:,} ({done / total:.0%})" if total else f"{done:,}"
        line = (
            f"{self.source}: {count} {self.unit}, {rate:,.0f} {self.unit}/s, "
            f"{self.tokens / elapsed:,.0f} tokens/s, elapsed {clock(elapsed)}"
        )
        if total and rate > 0:
            line += f", ETA {clock(max(total - done, 0) / rate)}"
        return line


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
