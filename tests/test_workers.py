"""The parent's merging of its workers' metrics and status, and the control channel, in memory."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from proxy.config import load_config
from proxy.control import ControlChannel, ControlError
from proxy.workers import Supervisor, _Families, merge_metrics, merge_status


def worker_exposition(requests: float, open_https: float) -> str:
    registry = CollectorRegistry()
    Counter("trackproxy_requests_total", "Requests.", ["domain"], registry=registry).labels("t.example").inc(requests)
    Gauge("trackproxy_open_connections", "Open.", ["listener"], registry=registry).labels("https").set(open_https)
    return generate_latest(registry).decode()


def test_worker_series_get_a_worker_label_and_share_a_family_with_the_parents():
    parent = CollectorRegistry()
    Gauge("trackproxy_open_connections", "Open.", ["listener"], registry=parent).labels("admin").set(1)
    merged = merge_metrics(list(parent.collect()), {0: worker_exposition(3, 2), 1: worker_exposition(4, 5)})
    text = generate_latest(_Families(merged)).decode()
    assert text.count("# TYPE trackproxy_open_connections gauge") == 1, "one family per name"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("trackproxy_open_connections", (("listener", "admin"),))] == 1
    assert samples[("trackproxy_open_connections", (("listener", "https"), ("worker", "1")))] == 5
    assert samples[("trackproxy_requests_total", (("domain", "t.example"), ("worker", "0")))] == 3
    assert samples[("trackproxy_requests_total", (("domain", "t.example"), ("worker", "1")))] == 4


def test_status_sums_cache_and_upstream_counts_and_keeps_the_latest_error():
    cache, health = merge_status({
        0: {"cache": {"a": 2}, "health": {"a": {"ok": 3, "failed": 1, "last_error": "reset: x", "last_error_at": 100.0}}},
        1: {"cache": {"a": 1, "b": 4}, "health": {"a": {"ok": 0, "failed": 4, "last_error": "timeout: y",
                                                        "last_error_at": 200.0}}},
    })
    assert cache == {"a": 3, "b": 4}
    assert health["a"] == {"last_error": "timeout: y", "last_error_at": "1970-01-01T00:03:20Z", "failed_ratio_5m": 0.625}


def connected_pair() -> tuple[ControlChannel, ControlChannel, StringTransport, StringTransport]:
    asked = ControlChannel(lambda message: {"echo": message["value"]} if message["op"] == "echo" else 1 / 0)
    asking = ControlChannel(lambda message: None)
    a, b = StringTransport(), StringTransport()
    asked.makeConnection(a)
    asking.makeConnection(b)
    return asking, asked, b, a


def pump(source: StringTransport, target: ControlChannel) -> None:
    data = source.value()
    source.clear()
    target.dataReceived(data)


def test_a_request_gets_its_reply_and_a_failure_its_error():
    asking, asked, to_asked, to_asking = connected_pair()
    ok, bad = asking.call("echo", value=7), asking.call("boom")
    pump(to_asked, asked)
    pump(to_asking, asking)
    case = SynchronousTestCase()
    assert case.successResultOf(ok) == {"echo": 7}
    case.failureResultOf(bad, ControlError)


def test_requests_pending_when_the_connection_ends_fail():
    asking, _, _, _ = connected_pair()
    pending = asking.call("echo", value=1)
    asking.connectionLost(None)
    SynchronousTestCase().failureResultOf(pending, ControlError)
    SynchronousTestCase().failureResultOf(asking.call("echo", value=2), ControlError)


class _AnsweringWorker:
    """A serving worker as the parent sees it: its channel answers at once."""

    def __init__(self, index: int) -> None:
        self.index, self.ready, self.text = index, True, ""
        self.asked: list[str] = []

        worker = self

        class Channel:
            def call(self, op: str, **fields: object) -> defer.Deferred[dict[str, object]]:
                worker.asked.append(op)
                return defer.succeed({"ok": True})

        self.channel = Channel()


def test_a_reload_while_a_worker_is_being_replaced_reaches_the_others_and_succeeds(tmp_path):
    """After a crash the slot stays empty for its back-off; a reload then is still one
    answer, and the replacement starts with the new file."""
    path = tmp_path / "trackproxy.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\ndomains:\n  t.example.com: {{certificate: none}}\n")
    supervisor = Supervisor(MemoryReactorClock(), load_config(str(path)), 2, issuer=object())
    serving = _AnsweringWorker(1)
    supervisor.workers = [None, serving]  # worker 0 crashed; its replacement is not started yet
    path.write_text(path.read_text() + "  click.example.com: {certificate: none}\n")
    ok, summary = SynchronousTestCase().successResultOf(supervisor.reload())
    assert ok and summary["result"] == "success" and summary["domains"] == 2, summary
    assert serving.asked == ["reload"]
    assert supervisor._config_text == path.read_text(), "what the replacement will be given"
