"""`python -m benchmarks [--quick] [--only NAME]`: run the benchmarks and write the report."""

import sys

from benchmarks.run import main

sys.exit(main())
