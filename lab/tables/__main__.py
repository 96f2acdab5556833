"""``python -m lab.tables ...`` = ``detlab tables ...``."""

from lab.tables.command import main

raise SystemExit(main())
