"""Process-wide set-up happens in the entry points only (``proxy.process``), never on
import or construction: a test process that builds the parts keeps Python's defaults."""

from __future__ import annotations

import subprocess
import sys

from proxy_process import REPO_ROOT

BUILD_THE_PARTS = """
import sys
import prometheus_client.metrics as pm
from proxy.metrics import Metrics
from proxy.service import new_metrics
from proxy.tls import ServerTLS
ServerTLS()
new_metrics()
print(sys.excepthook is sys.__excepthook__, pm._use_created)
"""

PREPARE = """
import sys
import prometheus_client.metrics as pm
from proxy import process
process.prepare()
print(sys.excepthook is sys.__excepthook__, pm._use_created)
"""


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout.strip()


def test_importing_and_building_the_parts_changes_nothing_process_wide():
    assert run(BUILD_THE_PARTS) == "True True"


def test_prepare_quiets_refused_server_names_and_drops_created_series():
    assert run(PREPARE) == "False False"
