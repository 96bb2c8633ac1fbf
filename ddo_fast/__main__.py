"""``python -m ddo_fast``: the same command line as ``ddo-fast``."""

from .cli import main

raise SystemExit(main())
