"""``python -m fastprune``: the command line (see fastprune.bench.cli)."""
import sys

from .bench.cli import main

sys.exit(main())
