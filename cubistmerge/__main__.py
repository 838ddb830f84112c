"""``python -m cubistmerge <command>``: same as the ``cubistmerge`` console script."""

from .cli import main

raise SystemExit(main())
