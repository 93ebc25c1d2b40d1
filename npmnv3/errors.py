"""The exceptions npmnv3 raises for bad input.

Each is a subclass of a built-in type so that ``except ValueError`` keeps working,
and each message names the file or argument at fault and what was expected.
"""


class StateDictError(ValueError):
    """A state dict does not fit the architecture.

    Raised once per load with every missing, unexpected and mis-shaped key listed. The message's
    first line, ``summary``, says in one line what does not fit what (and, where npmnv3 can tell,
    what the weights are); ``found`` holds what they were recognised as (a dict of builder options,
    e.g. ``{"arch": "mobilenet_v3_small", ...}``) or None.
    """

    def __init__(self, message, found=None):
        super().__init__(message)
        self.summary = message.splitlines()[0] if message else ""
        self.found = found


class WeightsFormatError(ValueError):
    """A weights file cannot be read safely: broken, hostile or not a weights file."""


class DownloadError(OSError):
    """Fetching official weights failed; the message says where to put the file by hand."""


class ImageError(ValueError):
    """An image given to preprocess()/predict() cannot be used."""
