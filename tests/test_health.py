"""Upstream health per domain: the failed share over five minutes, and the last error."""

from __future__ import annotations

from twisted.internet.task import Clock

from proxy.health import WINDOW, HealthBook, UpstreamHealth

START = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def health_at(start: float = START) -> tuple[UpstreamHealth, Clock]:
    clock = Clock()
    clock.advance(start)
    return UpstreamHealth(clock.seconds), clock


def test_a_fresh_domain_is_healthy_with_no_error():
    health, _ = health_at()
    assert health.document() == {"last_error": None, "last_error_at": None, "failed_ratio_5m": 0.0}


def test_the_ratio_is_the_failed_share_of_the_window():
    health, clock = health_at()
    for _ in range(3):
        health.succeeded()
    clock.advance(60)
    health.failed("connect_error: Connection refused")
    assert health.counts() == (3, 1)
    document = health.document()
    assert document["failed_ratio_5m"] == 0.25
    assert document["last_error"] == "connect_error: Connection refused"
    assert document["last_error_at"] == "2027-01-15T08:01:00Z"


def test_outcomes_older_than_five_minutes_no_longer_count_but_the_last_error_stays():
    health, clock = health_at()
    health.failed("timeout: no complete answer within 15s")
    clock.advance(WINDOW + 10)
    health.succeeded()
    assert health.counts() == (1, 0) and health.failed_ratio() == 0.0
    assert health.last_error == "timeout: no complete answer within 15s"


def test_a_bucket_reused_after_the_ring_wraps_starts_from_zero():
    health, clock = health_at()
    health.failed("reset: x")
    clock.advance(WINDOW)  # the same ring slot, one lap later
    health.succeeded()
    assert health.counts() == (1, 0)


def test_the_book_keeps_a_domains_health_across_reloads_and_forgets_removed_ones():
    clock = Clock()
    book = HealthBook(clock.seconds)
    book.for_domain("a.example").failed("tls_error: x")
    book.keep_only(["a.example", "b.example"])
    assert book.for_domain("a.example").last_error == "tls_error: x"
    book.keep_only(["b.example"])
    assert book.for_domain("a.example").last_error is None
