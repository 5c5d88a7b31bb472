"""``python -m embedder``: the local TF-Serving-compatible model server and client tools."""

import sys

from embedder.cli import main

sys.exit(main())
