"""`python -m handoff` runs the command line, as the `handoff` command does."""

import sys

from handoff.cli import main

sys.exit(main())
