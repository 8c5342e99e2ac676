"""``python -m snca``: the same as the ``snca`` command."""

from .cli import main

raise SystemExit(main())
