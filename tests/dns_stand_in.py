"""A DNS server for end-to-end tests: answers from a JSON zone on 127.0.0.1 UDP.

Run as a process (``trackproxy doctor`` is one, and needs a server it can ask)::

    python tests/dns_stand_in.py --zone-json ZONE.json --port-file PORT_FILE [--port N]

The zone maps owner names to their records; names not listed are NXDOMAIN::

    {"track.example.test": {"CNAME": "proxy.example.test"},
     "proxy.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
     "caa.example.test": {"A": ["127.0.0.1"], "CAA": [[0, "issue", "sectigo.com"]]}}

A query for a name that is a CNAME gets the CNAME and then the target's records, as a
recursive resolver's answer carries them. CAA (RFC 8659, type 257) goes out as an opaque
record: Twisted Names has no class for it. Once listening, the server writes its port to
``--port-file`` (``--port 0``, the default, picks a free one). It runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from typing import Any

from twisted.internet import defer
from twisted.names import common, dns, error, server

CAA = 257


def caa_record(flags: int, tag: str, value: str) -> dns.UnknownRecord:
    """A CAA record in its wire format: flags, tag length, tag, value."""
    return dns.UnknownRecord(struct.pack("!BB", flags, len(tag)) + tag.encode() + value.encode())


def records_of(entry: dict[str, Any]) -> list[tuple[int, Any]]:
    """One zone entry's records as ``(type, payload)`` pairs."""
    found: list[tuple[int, Any]] = []
    found += [(dns.A, dns.Record_A(a)) for a in entry.get("A", [])]
    found += [(dns.AAAA, dns.Record_AAAA(a)) for a in entry.get("AAAA", [])]
    if "CNAME" in entry:
        found.append((dns.CNAME, dns.Record_CNAME(entry["CNAME"])))
    found += [(CAA, caa_record(*caa)) for caa in entry.get("CAA", [])]
    return found


class JSONZone(common.ResolverBase):
    """Authority for every name of a JSON zone."""

    def __init__(self, zone: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self.zone = {name.lower().rstrip("."): records_of(entry) for name, entry in zone.items()}

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:
        owner = name.decode().lower().rstrip(".")
        if owner not in self.zone:
            # Twisted's server answers NXDOMAIN for a DomainError.
            return defer.fail(error.DomainError(owner))
        answers: list[dns.RRHeader] = []
        seen: set[str] = set()
        while owner not in seen:
            seen.add(owner)
            found = self._records(owner, type)
            cnames = self._records(owner, dns.CNAME)
            if found or not cnames or type == dns.CNAME:
                answers += found
                break
            answers += cnames
            owner = cnames[0].payload.name.name.decode().lower()
        return defer.succeed((answers, [], []))

    def _records(self, owner: str, type: int) -> list[dns.RRHeader]:
        return [
            dns.RRHeader(owner, kind, payload=payload, auth=True)
            for kind, payload in self.zone.get(owner, [])
            if kind == type
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zone-json", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args()
    with open(args.zone_json) as f:
        zone = json.load(f)

    from twisted.internet import reactor

    factory = server.DNSServerFactory(authorities=[JSONZone(zone)])
    port = reactor.listenUDP(args.port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    # Written whole, then renamed: a reader never sees half a number.
    partial = args.port_file + ".partial"
    with open(partial, "w") as f:
        f.write(str(port.getHost().port))
    os.replace(partial, args.port_file)
    reactor.run()


if __name__ == "__main__":
    main()
