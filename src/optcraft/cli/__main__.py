"""`python -m optcraft.cli ...` is the `optcraft` command."""
import sys

from . import main

sys.exit(main())
