"""`python -m quickstart demo|up|down|status`."""

import sys

from quickstart.cli import main

sys.exit(main())
