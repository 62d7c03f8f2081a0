"""``python -m cli ...``: the ``tide`` command line."""

import sys

from cli.main import main

sys.exit(main())
