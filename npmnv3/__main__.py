"""``python -m npmnv3 ...``: the same as the installed ``npmnv3`` command."""

import sys

from .cli import main

sys.exit(main())
