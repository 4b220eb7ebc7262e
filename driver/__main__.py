"""`python -m driver` is the `unidra` command."""

import sys

from driver.cli import main

sys.exit(main())
