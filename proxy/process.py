"""What a serving process sets up once, before it serves: ``trackproxy run`` and each worker.

Everything here changes the whole process (the global reactor, the log observers,
``sys.excepthook``, a resource limit, a prometheus_client switch), so it happens only
here, called by the two entry points, and never on import or when an object is built:
tests build services, frontends and TLS layers by the dozen in one process and keep
the defaults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.reactor import SharedListenerReactor


def prepare() -> SharedListenerReactor:
    """Install trackproxy's reactor and everything process-wide; the reactor.

    - the reactor (:mod:`proxy.reactor`), before anything imports Twisted's global one;
    - the open-files limit raised to its hard limit, JSON logging on standard output,
      and the once-a-second check that logs running out of descriptors once, not per
      accept (:mod:`proxy.logs`);
    - no traceback on standard error for each refused server name
      (:func:`proxy.tls.install_quiet_excepthook`);
    - no ``*_created`` series in ``/metrics``: they double the series count and nothing
      of ours reads them (prometheus_client's switch is process-wide).
    """
    from proxy.reactor import install

    reactor = install()

    from prometheus_client import disable_created_metrics
    from twisted.internet.task import LoopingCall

    from proxy.logs import raise_open_files_limit, start_logging
    from proxy.tls import install_quiet_excepthook

    raise_open_files_limit()
    shortage = start_logging()
    watch = LoopingCall(shortage.tick)
    watch.clock = reactor
    watch.start(1.0, now=False)
    install_quiet_excepthook()
    disable_created_metrics()
    return reactor
