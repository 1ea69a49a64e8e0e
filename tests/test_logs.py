"""The event log (``proxy.logs``): one JSON object per line, Twisted's legacy chatter
dropped, running out of descriptors said once and its end once."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from proxy.logs import DescriptorShortage, JSONLineObserver, QuietLegacyInfo


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_an_event_is_one_json_line_with_its_fields():
    out = io.StringIO()
    log = Logger(namespace="trackproxy.test", observer=JSONLineObserver(out))
    log.warn("upstream {upstream} failed for {domain}", upstream="sparkpost", domain="t.example.com", port=443,
             when=object())
    (record,) = lines(out)
    assert record["level"] == "warn" and record["namespace"] == "trackproxy.test"
    assert record["message"] == "upstream sparkpost failed for t.example.com"
    assert (record["upstream"], record["domain"], record["port"]) == ("sparkpost", "t.example.com", 443)
    assert isinstance(record["when"], str), "anything else is logged as its text"
    assert record["time"].endswith("Z") and len(record["time"]) == len("2026-12-02T10:00:00Z")


def test_a_failure_carries_its_error_and_traceback():
    out = io.StringIO()
    log = Logger(namespace="trackproxy.test", observer=JSONLineObserver(out))
    try:
        raise ValueError("broken pair")
    except ValueError:
        log.failure("cannot load {domain}", Failure(), domain="t.example.com")
    (record,) = lines(out)
    assert record["level"] == "critical" and record["error"] == "broken pair"
    assert "ValueError: broken pair" in record["traceback"]


def test_twisted_legacy_info_is_dropped_but_its_warnings_pass():
    quiet = QuietLegacyInfo()
    legacy = {"log_namespace": "log_legacy", "log_level": LogLevel.info, "log_format": "Starting protocol"}
    assert quiet(legacy) == quiet(dict(legacy, log_level=LogLevel.debug)) != quiet(dict(legacy, log_level=LogLevel.warn))
    assert quiet({"log_namespace": "trackproxy.server", "log_level": LogLevel.info}) != quiet(legacy)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_running_out_of_descriptors_is_said_once_and_its_end_once():
    clock = Clock()
    out = io.StringIO()
    shortage = DescriptorShortage(clock)
    publisher = LogPublisher()
    from twisted.logger import FilteringLogObserver

    publisher.addObserver(FilteringLogObserver(JSONLineObserver(out), [shortage]))
    twisted_says = Logger(namespace="twisted", observer=publisher)
    shortage._log = Logger(namespace="trackproxy.limits", observer=publisher)

    twisted_says.info("EMFILE recovery: Closed socket from {address}", address="192.0.2.1")
    for n in range(100):
        clock.now += 0.01
        twisted_says.info("EMFILE recovery: Closed socket from {address}", address=f"192.0.2.{n}")
        shortage.tick()  # still short: nothing said
    said = lines(out)
    assert len(said) == 1 and said[0]["level"] == "warn" and "out of file descriptors" in said[0]["message"]

    clock.now += DescriptorShortage.QUIET + 0.1
    shortage.tick()
    shortage.tick()
    said = lines(out)
    assert len(said) == 2 and "available again" in said[1]["message"] and said[1]["closed"] == 101
    twisted_says.info("Starting protocol")  # anything else goes through untouched
    assert lines(out)[-1]["message"] == "Starting protocol"
