"""The ``trackproxy`` command line: ``run``, ``check-config``, ``reload``, ``status``
and ``certs``.

This module owns argument parsing, exit statuses and what is printed for a person.
It is, with ``service``, the only place that touches the global reactor: ``run``
imports it, hands it to :class:`~proxy.service.ProxyService`, and runs it. ``reload``
and ``status`` talk to the running proxy through its admin listener; ``certs`` runs
certbot in the foreground with the command line ``issuer`` builds.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from proxy import __version__
from proxy.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigErrors,
    admin_url,
    config_path,
    load_config,
)


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

    reload = commands.add_parser(
        "reload", help="ask the running proxy to reload its configuration and certificates"
    )
    reload.add_argument("-c", "--config", help=config_help)
    reload.set_defaults(handler=cmd_reload)

    status = commands.add_parser(
        "status", help="per domain: upstream, certificate status, not-after, last error, cache entries"
    )
    status.add_argument("-c", "--config", help=config_help)
    status.add_argument("--json", action="store_true", help="print the admin listener's /status JSON")
    status.set_defaults(handler=cmd_status)

    doctor = commands.add_parser(
        "doctor",
        help="the platforms' checks, automated: DNS, CAA, HTTPS certificate, probe relays a 3xx",
    )
    doctor.add_argument("-c", "--config", help=config_help)
    doctor.add_argument("domains", nargs="*", metavar="DOMAIN", help="default: every configured domain")
    doctor.add_argument(
        "--address", action="append", default=[], metavar="IP",
        help="this host's public address (repeatable; e.g. behind NAT); default: its own addresses",
    )
    doctor.add_argument(
        "--ca-file", metavar="PEM", help="trust this CA for the https check instead of the system roots"
    )
    doctor.set_defaults(handler=cmd_doctor)

    certs = commands.add_parser("certs", help="run certbot with the trackproxy plugin")
    certs.add_argument("-c", "--config", help=config_help)
    # issue/renew are sub-commands so that DOMAIN ... may follow --force.
    actions = certs.add_subparsers(dest="action", required=True, metavar="issue|renew")
    for action, text in (
        ("issue", "get each certificate (an existing good one is only re-deployed)"),
        ("renew", "renew the certificates due by acme.renew_before"),
    ):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("--force", action="store_true", help="ask the CA for a new certificate regardless")
        sub.add_argument("domains", nargs="*", metavar="DOMAIN", help="default: every certificate: acme domain")
    certs.set_defaults(handler=cmd_certs)
    return parser


def _load_or_report(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigErrors as e:
        for error in e.errors:
            print(error, file=sys.stderr)
        return None


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
    # Absolute, so that status shows it and certbot (run from state_dir) finds it.
    path = os.path.abspath(config_path(args.config))
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
    from proxy.systemd import Notifier

    start_logging()
    log = Logger(namespace="trackproxy.cli")
    try:
        service = ProxyService(reactor, config, notifier=Notifier(os.environ))
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
    # A signal handler may run between any two bytecodes: the reload itself runs on
    # the reactor's next turn.
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(service.reload))
    reactor.run()
    return outcome["code"]


def _admin_request(config: Config, method: str, path: str) -> tuple[int, bytes]:
    """One request to the running proxy's admin listener.

    Raises:
        SystemExit: nothing answers there, or the config names no TCP admin listener.
    """
    base = admin_url(config)
    if base is None:
        print(f"trackproxy: {config.path} has no tcp admin listener to talk to", file=sys.stderr)
        raise SystemExit(1)
    request = urllib.request.Request(base + path, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        print(f"trackproxy: the proxy does not answer on {base} ({reason}); is it running?", file=sys.stderr)
        raise SystemExit(1)


def cmd_reload(args: argparse.Namespace) -> int:
    config = _load_or_report(config_path(args.config))
    if config is None:
        print("trackproxy: not reloading: the file has errors (the proxy keeps its current config)",
              file=sys.stderr)
        return 1
    code, body = _admin_request(config, "POST", "/reload")
    try:
        outcome = json.loads(body)
    except ValueError:
        outcome = {}
    if code == 200:
        certificates = outcome.get("certificates", {})
        print(f"reloaded {config.path}: {outcome.get('domains', len(certificates))} domain(s)")
        for domain, status in sorted(certificates.items()):
            print(f"  {domain}: certificate {status}")
        return 0
    for error in outcome.get("errors", [body.decode("utf-8", "replace").strip()]):
        print(error, file=sys.stderr)
    print("trackproxy: reload refused; the proxy keeps its current config", file=sys.stderr)
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    config = _load_or_report(config_path(args.config))
    if config is None:
        return 1
    code, body = _admin_request(config, "GET", "/status")
    if code != 200:
        print(f"trackproxy: /status answered {code}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(body.decode("utf-8"))
        return 0
    print(format_status(json.loads(body)))
    return 0


def format_status(status: dict) -> str:
    """The ``/status`` document as a table for a person."""
    config = status["config"]
    lines = [
        f"config {config['path']} loaded {config['loaded_at']}"
        + ("" if config["last_reload_success"] else "  (last reload REFUSED: see the log)"),
        "",
    ]
    rows = [("DOMAIN", "UPSTREAM", "CERTIFICATE", "SOURCE", "NOT AFTER", "CACHED", "LAST ERROR")]
    for name, domain in sorted(status["domains"].items()):
        cert = domain["certificate"]
        rows.append((
            name, domain["upstream"], cert["status"], cert["source"], cert["not_after"] or "-",
            str(domain["cache_entries"]), cert["last_error"] or "",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return "\n".join(line.rstrip() for line in lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    config = _load_or_report(config_path(args.config))
    if config is None:
        return 1
    from twisted.internet import reactor

    from proxy.doctor import run_doctor

    return run_doctor(config, args.domains, reactor, addresses=args.address, ca_file=args.ca_file)


def cmd_certs(args: argparse.Namespace) -> int:
    config = _load_or_report(config_path(args.config))
    if config is None:
        return 1
    from proxy.issuer import certbot_command, certbot_environment

    acme_domains = [d.name for d in config.domains.values() if d.certificate.kind == "acme"]
    chosen = args.domains or acme_domains
    wrong = [d for d in chosen if d not in acme_domains]
    if wrong:
        print(f"trackproxy: not a certificate: acme domain in {config.path}: {', '.join(wrong)}",
              file=sys.stderr)
        return 2
    if not chosen:
        print(f"{config.path}: no certificate: acme domains")
        return 0
    failed = []
    for domain in chosen:
        force = args.force
        if args.action == "renew" and not force:
            due, why = _renewal_due(config, domain)
            print(f"{domain}: {why}")
            if not due:
                continue
            force = True
        command = certbot_command(config.path, config.state_dir, config.acme, domain, force)
        env = certbot_environment(config.acme, os.environ, reload=True)
        os.makedirs(config.state_dir, exist_ok=True)
        if subprocess.run(command, env=env, cwd=config.state_dir).returncode != 0:
            failed.append(domain)
    if failed:
        print(f"trackproxy: certbot failed for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _renewal_due(config: Config, domain: str) -> tuple[bool, str]:
    """Whether ``domain``'s deployed certificate is within ``acme.renew_before``."""
    from proxy.certs import ACME_FULLCHAIN, domain_cert_dir
    from proxy.tls import load_pem_chain

    path = os.path.join(domain_cert_dir(config.state_dir, domain), ACME_FULLCHAIN)
    try:
        not_after = load_pem_chain(path)[0].not_valid_after_utc
    except (OSError, ValueError) as e:
        return True, f"no usable certificate ({e}); requesting one"
    renew_from = not_after - datetime.timedelta(seconds=config.acme.renew_before)
    if datetime.datetime.now(datetime.timezone.utc) >= renew_from:
        return True, f"valid until {not_after:%Y-%m-%dT%H:%M:%SZ}: due, renewing"
    return False, f"valid until {not_after:%Y-%m-%dT%H:%M:%SZ}: not due before {renew_from:%Y-%m-%dT%H:%M:%SZ}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
