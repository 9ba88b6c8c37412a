"""`python -m daemon ...` is `iseg ...` (the supervisor starts roles this way)."""

import sys

from daemon.cli import main

sys.exit(main())
