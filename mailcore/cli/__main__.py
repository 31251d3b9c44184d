"""`python -m mailcore.cli`: the admin command without the console script."""

from mailcore.cli import main

raise SystemExit(main())
