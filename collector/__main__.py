"""``python -m collector``: the same as ``xdpml collector``."""
import sys

from collector.cli import main

sys.exit(main())
