"""The ``trackproxy`` command line: ``run``, ``check-config``, ``reload``, ``status``,
``doctor``, ``certs`` and ``stand-in``.

This module owns argument parsing, exit statuses and what is printed for a person.
It is, with ``service``, the only place that touches the global reactor: ``run``
imports it, hands it to :class:`~proxy.service.ProxyService`, and runs it. ``reload``
and ``status`` talk to the running proxy through its admin listener; ``certs`` runs
certbot in the foreground with the command line ``issuer`` builds.

(Over 400 lines: one short function per subcommand, each only parsing and printing;
the work is in the modules they call.)
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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from proxy import __version__
from proxy.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    Config,
    admin_url,
    config_path,
    load_config,
)
from proxy.yamlnodes import ConfigErrors

if TYPE_CHECKING:
    from email.message import Message

    from twisted.python.failure import Failure

    from proxy.doctor import DoctorReactor
    from proxy.service import ProxyService
    from proxy.standin import StandInReactor
    from proxy.workers import Supervisor


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
        "--ca-file", metavar="PEM", action="append", default=[],
        help="trust this CA for the https check instead of the system roots (repeatable)",
    )
    doctor.add_argument(
        "--trust-self-signed", action="store_true",
        help="also trust the certificates of the config's self-signed domains (your own machine)",
    )
    doctor.set_defaults(handler=cmd_doctor)

    stand_in = commands.add_parser(
        "stand-in",
        help="a stand-in tracking platform on loopback (HTTPS, SNI required, 302 for /f/...)",
        description="A local stand-in for a platform's tracking endpoint, for the local config, "
        "demos and benchmarks. Point an upstream at it with connect_to: 127.0.0.1:PORT and "
        "ca_file: the CA it prints.",
    )
    stand_in.add_argument("--name", default="spgo.io", help="the endpoint it stands in for (default: spgo.io)")
    stand_in.add_argument("--port", type=int, default=9443, help="loopback port (default: 9443; 0: any free one)")
    stand_in.add_argument(
        "--delay", default="0", metavar="DURATION", help="hold every answer this long (e.g. 50ms, 2s)"
    )
    stand_in.add_argument(
        "--dir", metavar="DIR",
        help="where its CA and certificate are made on first use (default: $XDG_STATE_HOME/trackproxy/stand-in)",
    )
    stand_in.add_argument("--quiet", action="store_true", help="print no line per request")
    stand_in.set_defaults(handler=cmd_stand_in)

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
    config = _load_or_report(path)
    if config is None:
        return 1
    for warning in config.warnings:
        print(warning, file=sys.stderr)
    print(f"{path}: ok, {len(config.domains)} domain(s)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    # Absolute, so that status shows it and certbot (run from state_dir) finds it.
    path = os.path.abspath(config_path(args.config))
    config = _load_or_report(path)
    if config is None:
        return 1

    from proxy import process

    reactor = process.prepare()
    from twisted.logger import Logger

    from proxy.clusterkey import ClusterKeyError
    from proxy.issuer import CertbotIssuer
    from proxy.service import ProxyService
    from proxy.systemd import Notifier
    from proxy.workers import Supervisor, worker_count

    log = Logger(namespace="trackproxy.cli")
    workers = worker_count(config)
    service: ProxyService | Supervisor
    try:
        if workers == 1:
            service = ProxyService(reactor, config, issuer=CertbotIssuer(reactor, os.environ), out=sys.stdout,
                                   notifier=Notifier(os.environ))
        else:
            service = Supervisor(reactor, config, workers, issuer=CertbotIssuer(reactor, os.environ),
                                 notifier=Notifier(os.environ))
    except OSError as e:
        print(f"trackproxy: cannot prepare {config.state_dir}: {e}", file=sys.stderr)
        return 1
    except ClusterKeyError as e:
        print(f"trackproxy: {e}", file=sys.stderr)
        return 1
    outcome = {"code": 0}

    def failed(failure: Failure) -> None:
        log.critical("start-up failed: {error}", error=failure.getErrorMessage())
        outcome["code"] = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: service.start().addErrback(failed))
    reactor.addSystemEventTrigger("before", "shutdown", service.stop)
    # A signal handler may run between any two bytecodes: the reload itself runs on
    # the reactor's next turn.
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(service.reload))
    reactor.run()
    service.flush_logs()  # what requests finishing during shutdown logged
    return outcome["code"]


class AdminUnreachable(Exception):
    """Nothing usable answers on the config's admin listener; the message says why."""


class AdminListener:
    """The running proxy's admin listener, as the CLI reaches it.

    The CLI talks only to the proxy of the file it was given: every admin answer names
    the config file it serves (``Trackproxy-Config``), and :meth:`request` refuses an
    answer from another program, or from a trackproxy serving another file.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.base = admin_url(config)

    def _open(self, method: str, path: str) -> tuple[int, bytes, Message]:
        if self.base is None:
            raise AdminUnreachable(f"{self.config.path} has no tcp admin listener to talk to")
        request = urllib.request.Request(
            self.base + path, method=method, data=b"" if method == "POST" else None
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, answer.read(), answer.headers
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise AdminUnreachable(
                f"the proxy does not answer on {self.base} ({reason}); is it running "
                f"(trackproxy run -c {self.config.path})?"
            ) from None

    def identity_problem(self) -> str | None:
        """None when the proxy answering serves this config file, else why not.

        Raises:
            AdminUnreachable: nothing answers.
        """
        from proxy.admin import CONFIG_HEADER, decode_config_path

        _, _, headers = self._open("GET", "/healthz")
        value = headers.get(CONFIG_HEADER.decode("ascii"))
        mine = self.config.path
        where = f"{self.base} (listen.admin of {mine})"
        if value is None:
            return (
                f"what answers on {where} is not a trackproxy admin listener: another program "
                f"uses that port; give listen.admin another port"
            )
        served = decode_config_path(value)
        if not same_file(served, mine):
            return (
                f"the trackproxy answering on {where} serves {served}, not {mine}: use "
                f"-c {served} for that proxy, or give {mine} its own listen.admin port"
            )
        return None

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        """One request to this config's proxy, once it is known to be this config's.

        Raises:
            SystemExit: (after saying why on stderr) nothing answers, or what answers is
                not this config's proxy.
        """
        try:
            problem = self.identity_problem()
            if problem is None:
                code, body, _ = self._open(method, path)
                return code, body
        except AdminUnreachable as e:
            problem = str(e)
        print(f"trackproxy: {problem}", file=sys.stderr)
        raise SystemExit(1)

    def describe(self) -> str:
        """One line for doctor: which proxy answers on the admin listener."""
        try:
            problem = self.identity_problem()
        except AdminUnreachable as e:
            return f"note: {e}"
        if problem is not None:
            return f"note: {problem}; the checks below examine what listens on this file's ports"
        return f"the trackproxy on {self.base} serves {self.config.path}"


def same_file(a: str, b: str) -> bool:
    """Whether two names of config files name the same file."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def cmd_reload(args: argparse.Namespace) -> int:
    config = _load_or_report(config_path(args.config))
    if config is None:
        print("trackproxy: not reloading: the file has errors (the proxy keeps its current config)",
              file=sys.stderr)
        return 1
    code, body = AdminListener(config).request("POST", "/reload")
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
    code, body = AdminListener(config).request("GET", "/status")
    if code != 200:
        print(f"trackproxy: /status answered {code}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(body.decode("utf-8"))
        return 0
    print(format_status(json.loads(body)))
    return 0


def format_status(status: dict[str, Any]) -> str:
    """The ``/status`` document as a table for a person, then one line per problem."""
    config = status["config"]
    lines = [
        f"config {config['path']} loaded {config['loaded_at']}"
        + ("" if config["last_reload_success"] else "  (last reload REFUSED: see the log)"),
        "",
    ]
    rows = [("DOMAIN", "UPSTREAM", "CERTIFICATE", "SOURCE", "NOT AFTER", "CACHED", "UPSTREAM HEALTH",
             "LAST ERROR")]
    problems = []
    for name, domain in sorted(status["domains"].items()):
        cert = domain["certificate"]
        health = domain.get("upstream_health") or {}
        rows.append((
            name, domain["upstream"], cert["status"], cert["source"], cert["not_after"] or "-",
            str(domain["cache_entries"]), upstream_health_summary(health), cert["last_error"] or "",
        ))
        if health.get("last_error"):
            problems.append(
                f"{name}: upstream {domain['upstream']} last failed at {health['last_error_at']}: "
                f"{health['last_error']}"
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    if problems:
        lines += ["", *problems]
    if "cluster" in status:
        lines += ["", *format_cluster(status["cluster"])]
    return "\n".join(line.rstrip() for line in lines)


def format_cluster(cluster: dict[str, Any]) -> list[str]:
    """Which node issues, whether etcd answers, and each node's last sync."""
    store = cluster["store"]
    if store != "ok" and cluster.get("store_error"):
        store += f" ({cluster['store_error']})"
    lines = [
        f"cluster: this node {cluster['node']}, issuer {cluster['issuer'] or 'none'}, etcd {store}",
        "  NODE  ISSUER  LAST SYNC",
    ]
    nodes = cluster.get("nodes") or {cluster["node"]: {"last_sync": cluster["last_sync"]}}
    width = max(len("NODE"), *(len(name) for name in nodes))
    lines[1] = "  " + "NODE".ljust(width) + "  ISSUER  LAST SYNC"
    for name, node in sorted(nodes.items()):
        issuer = "yes" if name == cluster["issuer"] else ""
        lines.append(f"  {name.ljust(width)}  {issuer.ljust(6)}  {node.get('last_sync') or 'never'}")
    return lines


def upstream_health_summary(health: dict[str, Any]) -> str:
    """``ok``, or the failed share of the last five minutes' upstream requests."""
    ratio = health.get("failed_ratio_5m") or 0.0
    if ratio > 0:
        return f"{ratio * 100:.3g}% failed (5m)"
    return "ok"


def cmd_doctor(args: argparse.Namespace) -> int:
    config = _load_or_report(config_path(args.config))
    if config is None:
        return 1
    from twisted.internet import reactor

    from proxy.doctor import run_doctor

    # Twisted types the global reactor as its "common" interfaces; it provides IReactorUDP too.
    return run_doctor(
        config, args.domains, cast("DoctorReactor", reactor), addresses=args.address, ca_files=args.ca_file,
        trust_self_signed=args.trust_self_signed, preamble=AdminListener(config).describe(),
    )


def cmd_stand_in(args: argparse.Namespace) -> int:
    from proxy.standin import default_directory, run
    from proxy.values import normalise_domain, parse_duration

    try:
        delay = parse_duration(args.delay)
        name = normalise_domain(args.name)
    except ValueError as e:
        print(f"trackproxy: stand-in: {e}", file=sys.stderr)
        return 2
    if not 0 <= args.port < 65536:
        print(f"trackproxy: stand-in: --port {args.port} is not a port number", file=sys.stderr)
        return 2
    from twisted.internet import reactor

    # Twisted types the global reactor as its "common" interfaces; it provides IReactorThreads
    # too, and its listenTCP takes any factory.
    return run(cast("StandInReactor", reactor), name, args.port, delay, args.dir or default_directory(), args.quiet)


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
    refusal = _not_the_issuer(config)
    if refusal is not None:
        print(f"trackproxy: {refusal}", file=sys.stderr)
        return 1
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


def _not_the_issuer(config: Config) -> str | None:
    """On a cluster, why certbot must not run here (None: this node issues). A
    certificate made elsewhere would stay on that node, and spend the CA's limits."""
    settings = config.cluster
    if settings is None or not settings.etcd:
        return None
    from proxy.clusterstore import StoreError, etcd_store

    try:
        issuer = etcd_store(settings).issuer()
    except StoreError as e:
        return f"cannot tell which cluster node issues ({e}); certbot not run"
    if issuer == settings.node:
        return None
    return (f"this node ({settings.node}) does not issue the cluster's certificates "
            f"({issuer or 'no node does right now'} does): run trackproxy certs there")


def _renewal_due(config: Config, domain: str) -> tuple[bool, str]:
    """Whether ``domain``'s deployed certificate is within ``acme.renew_before``."""
    from proxy.certs import renewal_starts
    from proxy.statedir import FULLCHAIN, domain_cert_dir
    from proxy.tls import load_pem_chain

    path = os.path.join(domain_cert_dir(config.state_dir, domain), FULLCHAIN)
    try:
        not_after = load_pem_chain(path)[0].not_valid_after_utc
    except (OSError, ValueError) as e:
        return True, f"no usable certificate ({e}); requesting one"
    renew_from = renewal_starts(not_after, config.acme.renew_before)
    if datetime.datetime.now(datetime.UTC) >= renew_from:
        return True, f"valid until {not_after:%Y-%m-%dT%H:%M:%SZ}: due, renewing"
    return False, f"valid until {not_after:%Y-%m-%dT%H:%M:%SZ}: not due before {renew_from:%Y-%m-%dT%H:%M:%SZ}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
