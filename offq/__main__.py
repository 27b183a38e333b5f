"""``python -m offq``: the ``offq`` command (:mod:`offq.cli`)."""
import sys

from .cli import main

sys.exit(main())
