"""``python -m proxy`` is the ``trackproxy`` command."""

import sys

from proxy.cli import main

sys.exit(main())
