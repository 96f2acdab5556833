"""``python -m lab.sweep ...`` = ``detlab sweep ...``."""

from lab.sweep.command import main

raise SystemExit(main())
