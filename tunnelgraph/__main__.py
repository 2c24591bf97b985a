"""``python -m tunnelgraph``: the command line (see :mod:`tunnelgraph.cli`)."""

import sys

from tunnelgraph.cli import main

sys.exit(main())
