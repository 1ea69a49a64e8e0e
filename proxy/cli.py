"""The ``trackproxy`` command line: ``run`` and ``check-config``.

This module owns argument parsing, exit statuses and what is printed for a person.
It is, with ``service``, the only place that touches the global reactor: ``run``
imports it, hands it to :class:`~proxy.service.ProxyService`, and runs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, ConfigErrors, config_path, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trackproxy",
        description="HTTPS reverse proxy for email engagement-tracking domains.",
    )
    parser.add_argument("--version", action="version", version=f"trackproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"the YAML domain map (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH})"

    run = commands.add_parser("run", help="run the proxy in the foreground")
    run.add_argument("-c", "--config", help=config_help)
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser(
        "check-config", help="validate the configuration; exit 1 with FILE:LINE:COL lines if invalid"
    )
    check.add_argument("-c", "--config", help=config_help)
    check.set_defaults(handler=cmd_check_config)
    return parser


def cmd_check_config(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    try:
        config = load_config(path)
    except ConfigErrors as e:
        for error in e.errors:
            print(error, file=sys.stderr)
        return 1
    for warning in config.warnings:
        print(warning, file=sys.stderr)
    print(f"{path}: ok, {len(config.domains)} domain(s)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    try:
        config = load_config(path)
    except ConfigErrors as e:
        for error in e.errors:
            print(error, file=sys.stderr)
        return 1

    from twisted.internet import reactor
    from twisted.logger import Logger

    from proxy.logs import start_logging
    from proxy.service import ProxyService

    start_logging()
    log = Logger(namespace="trackproxy.cli")
    try:
        service = ProxyService(reactor, config)
    except OSError as e:
        print(f"trackproxy: cannot prepare {config.state_dir}: {e}", file=sys.stderr)
        return 1
    outcome = {"code": 0}

    def failed(failure: object) -> None:
        log.critical("start-up failed: {error}", error=failure.getErrorMessage())  # type: ignore[attr-defined]
        outcome["code"] = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: service.start().addErrback(failed))
    reactor.addSystemEventTrigger("before", "shutdown", service.stop)
    reactor.run()
    return outcome["code"]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
