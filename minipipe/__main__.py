"""`python -m minipipe ...` is the same as the `minipipe` command."""

import sys

from .cli import main

sys.exit(main())
