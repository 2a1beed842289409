"""`python -m framework`: the same command as the `framework` console script."""

from __future__ import annotations

import sys

from framework.cli import main

sys.exit(main())
