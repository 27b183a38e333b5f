"""`python -m offq ...` is the same as the `offq` command."""
from .cli import main

raise SystemExit(main())
