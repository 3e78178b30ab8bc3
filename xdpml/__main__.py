"""``python -m xdpml``: the same command line as ``xdpml``."""

import sys

from xdpml.cli import main

sys.exit(main())
