"""Serving HTTP-01 challenge answers that certbot's trackproxy plugin leaves on disk.

This module owns the mapping from ``/.well-known/acme-challenge/TOKEN`` to the file
``state_dir/acme-challenge/TOKEN``. Such a request is always answered here, from disk,
and never forwarded: a CA validating the name must see our answer, not the platform's.
Writing and removing the files is the plugin's job.

The CA fetches a token several times (Let's Encrypt validates from several vantage
points; pebble fetches each token three times), so a token is served until the plugin
removes it, and never rate-limited.
"""

from __future__ import annotations

import os
import re

CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
_TOKEN = re.compile(rb"^[A-Za-z0-9_-]+$")
#: Key authorizations are a token, a dot and a thumbprint: well under a kilobyte.
MAX_ANSWER_BYTES = 4096


class ChallengeStore:
    """Reads challenge answers from one directory, refusing anything but a bare token."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def answer(self, token: bytes) -> bytes | None:
        """The key authorization for ``token``, or None if there is none (or the token
        is not of the ``[A-Za-z0-9_-]+`` form, so no path can escape the directory)."""
        if not _TOKEN.match(token):
            return None
        try:
            with open(os.path.join(self.directory, token.decode("ascii")), "rb") as f:
                return f.read(MAX_ANSWER_BYTES)
        except OSError:
            return None
