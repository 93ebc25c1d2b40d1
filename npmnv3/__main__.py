"""``python -m npmnv3 ...``: the same as the installed ``npmnv3`` command."""

from .cli import console

console()
