"""`python -m trainer`: see trainer/cli.py."""

import os
import sys

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) is noise on a command line; users can
# still raise it by setting TF_CPP_MIN_LOG_LEVEL themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from trainer.cli import main  # noqa: E402  (after the environment is set)

sys.exit(main())
