"""`python -m cbir …` is the `cbir` command."""

import sys

from .cli import main

sys.exit(main())
