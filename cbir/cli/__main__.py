"""`python -m cbir.cli`, the same as the `cbir` command."""

import sys

from . import main

sys.exit(main())
