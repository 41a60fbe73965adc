"""``python -m fastprune``: the command line (see fastprune.cli)."""
import sys

from .cli import main

sys.exit(main())
