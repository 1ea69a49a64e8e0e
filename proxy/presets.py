"""The platforms' tracking endpoints built in, by name (``upstream: sendgrid``).

A preset is what the platform's own guide says: its tracking host, the path doctor
probes, the methods its links need and any header-size limit it enforces. ``config``
turns one into an :class:`~proxy.config.Upstream` when a domain names it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

import attrs


@attrs.frozen
class Preset:
    """A platform's tracking endpoint as its own guide describes it."""

    url: str
    probe_path: str = "/f/a/b/c/d"
    methods: tuple[str, ...] | None = None
    max_request_header_bytes: int | None = None


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "sparkpost": Preset("https://spgo.io"),
        "sparkpost-eu": Preset("https://eu.spgo.io"),
        "sparkpost-v2": Preset("https://v2.spgo.io"),
        "sparkpost-eu-v2": Preset("https://eu.v2.spgo.io"),
        "sendgrid": Preset("https://sendgrid.net"),
        # Mailgun's tracking host accepts plain HTTP only; start-up warns about it.
        "mailgun": Preset("http://mailgun.org"),
        "mailgun-eu": Preset("http://eu.mailgun.org"),
        "customerio": Preset("https://track.customer.io"),
        "customerio-eu": Preset("https://track-eu.customer.io"),
        # Iterable's links need POST (and cookies, which always pass).
        "iterable": Preset("https://links.iterable.com", methods=("GET", "HEAD", "POST")),
        "iterable-eu": Preset(
            "https://links.eu.iterable.com", methods=("GET", "HEAD", "POST")
        ),
    }
)
_SES_PRESET = re.compile(r"^ses-([a-z]{2}(?:-gov)?-[a-z]+-[0-9])$")
#: Amazon SES click tracking refuses requests with 8 KiB or more of headers.
SES_MAX_HEADER_BYTES = 8192


def preset_for(name: str) -> Preset | None:
    """The built-in preset called ``name``, including the ``ses-REGION`` family."""
    preset = PRESETS.get(name)
    if preset is not None:
        return preset
    match = _SES_PRESET.match(name)
    if match:
        return Preset(
            f"https://r.{match.group(1)}.awstrack.me",
            max_request_header_bytes=SES_MAX_HEADER_BYTES,
        )
    return None
