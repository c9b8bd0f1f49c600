"""`python -m fiona` is the `fiona` command."""

import sys

from .cli import main

sys.exit(main())
