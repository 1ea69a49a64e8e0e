"""Watching the running proxy from the tests: its metrics, parsed, and waiting for a
condition with a deadline (never a sleep-and-hope).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from proxy_process import LOOPBACK

# ---------------------------------------------------------------------------
# Metrics and waiting


@dataclass(frozen=True)
class Scrape:
    """One ``GET /metrics`` from the admin listener, parsed."""

    text: str
    #: ``(sample name, labels, value)``, counters under their ``_total`` names.
    samples: tuple[tuple[str, dict[str, str], float], ...]

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )

    def label_values(self, name: str, label: str) -> set[str]:
        """Every value label ``label`` takes on the samples called ``name``."""
        return {have[label] for sample, have, _ in self.samples if sample == name and label in have}

    def series(self, prefix: str) -> list[tuple[str, dict[str, str], float]]:
        """The samples whose name starts with ``prefix``."""
        return [s for s in self.samples if s[0].startswith(prefix)]


def scrape(admin_port: int, timeout: float = 5.0) -> Scrape:
    """The proxy's metrics now, in the Prometheus text format."""
    url = f"http://{LOOPBACK}:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        text = answer.read().decode("utf-8")
    samples = tuple(
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    )
    return Scrape(text, samples)


def poll(check: Any, within: float, what: str, interval: float = 0.05) -> Any:
    """Call ``check()`` until it returns something true; that value.

    Raises:
        TimeoutError: still false after ``within`` seconds (``what`` says what was awaited).
    """
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {within}s (last: {result!r})")
        time.sleep(interval)  # poll interval, not a wait for something to happen
