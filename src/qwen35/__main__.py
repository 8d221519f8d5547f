"""`python -m qwen35 ...` is the `qwen35` command (what torchrun's `-m qwen35 serve ...` runs on every rank)."""

import sys

from qwen35.cli import main

sys.exit(main())
