"""Fixtures shared by the end-to-end modules (helpers: ``proxy_process``, ``standin_upstream``, ``wire``,
``observe``, and ``proxy.testing``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.testing import LocalCA

from standin_upstream import UpstreamStandIn


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    """The test CA: signs the stand-in platforms' and operators' certificates."""
    return LocalCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def upstream(ca: LocalCA) -> Iterator[UpstreamStandIn]:
    """A stand-in platform that accepts only SNI ``spgo.io`` (modules may override it)."""
    stand_in = UpstreamStandIn(ca.issue("spgo.io"))
    yield stand_in
    stand_in.close()
