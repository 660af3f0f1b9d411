"""`python -m ltm`: the same CLI as the `ltm` command (`ltm.cli`)."""

import sys

from ltm.cli import main

sys.exit(main())
