"""``python -m cluster.checkpoint verify PATH...`` / ``latest ROOT [--good]`` (see ``cluster.checkpoint.store``)."""

import sys

from .store import main

sys.exit(main())
