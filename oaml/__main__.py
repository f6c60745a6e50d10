"""``python -m oaml``: the same as the installed ``oaml`` command."""

from oaml.cli import main

raise SystemExit(main())
