"""Entry point for ``python -m filterd``."""

from filterd.cli import main

raise SystemExit(main())
