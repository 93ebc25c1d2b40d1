"""ImageNet-1k class names and WordNet IDs, in class-index order.

Data files shipped in ``npmnv3/data/`` (read with importlib.resources, cached):

* ``imagenet_classes.txt``: the 1000 English names torchvision uses
  (``torchvision.models._meta._IMAGENET_CATEGORIES``), one per line.
* ``imagenet_synsets.txt``: the 1000 WordNet IDs (``n01440764`` ... ``n15075141``),
  sorted, which is the class-index order of the ImageNet-1k weights (taken from
  the ``timm`` wheel's ``timm/data/_info/imagenet_synsets.txt``).

Names are torchvision's exactly.  Where the original ImageNet labels collide,
torchvision already disambiguated them: "crane" is the machine (517) and
"crane bird" the bird (134); "maillot" is 638 and "maillot tank suit" 639.  So
every name is unique as written, and ``class_index`` matches it exactly first.
Only ignoring case creates a collision: "Cardigan" (264, the corgi) and
"cardigan" (474, the sweater).  ``class_index`` therefore tries, in order:

1. a WordNet ID (``n`` + 8 digits; always unique);
2. the exact name;
3. the name ignoring case and surrounding/multiple spaces, if that is unique.

An ambiguous name raises ``KeyError`` listing every candidate index and WordNet
ID; an unknown one raises ``KeyError`` with close matches, if any.
"""

from __future__ import annotations

import difflib
import functools
import re
from importlib import resources
from typing import Dict, List, Tuple

__all__ = ["categories", "synsets", "class_index"]

NUM_CLASSES = 1000
_WNID = re.compile(r"n\d{8}")


@functools.lru_cache(maxsize=None)
def _lines(filename: str) -> Tuple[str, ...]:
    text = resources.files(__package__).joinpath("data", filename).read_text(encoding="utf-8")
    lines = tuple(text.splitlines())
    if len(lines) != NUM_CLASSES or any(not line or line != line.strip() for line in lines):
        raise RuntimeError(
            f"npmnv3 data file data/{filename} is damaged: expected {NUM_CLASSES} non-empty lines, "
            f"got {len(lines)}; reinstall npmnv3"
        )
    return lines


@functools.lru_cache(maxsize=None)
def _synsets() -> Tuple[str, ...]:
    ids = _lines("imagenet_synsets.txt")
    if not all(_WNID.fullmatch(s) for s in ids) or list(ids) != sorted(set(ids)):
        raise RuntimeError("npmnv3 data file data/imagenet_synsets.txt is damaged; reinstall npmnv3")
    return ids


def categories() -> List[str]:
    """The 1000 ImageNet-1k English class names (torchvision's), in class-index order.

    A new list each call; the file is read once.
    """
    return list(_lines("imagenet_classes.txt"))


def synsets() -> List[str]:
    """The 1000 ImageNet-1k WordNet IDs (e.g. ``"n01440764"``), in class-index order."""
    return list(_synsets())


def _normalise(name: str) -> str:
    return " ".join(name.split()).casefold()


@functools.lru_cache(maxsize=None)
def _indices() -> Tuple[Dict[str, List[int]], Dict[str, List[int]], Dict[str, int]]:
    exact: Dict[str, List[int]] = {}
    loose: Dict[str, List[int]] = {}
    for i, name in enumerate(_lines("imagenet_classes.txt")):
        exact.setdefault(name, []).append(i)
        loose.setdefault(_normalise(name), []).append(i)
    by_wnid = {w: i for i, w in enumerate(_synsets())}
    return exact, loose, by_wnid


def _ambiguous(query: str, found: List[int]) -> KeyError:
    names, ids = _lines("imagenet_classes.txt"), _synsets()
    options = ", ".join(f"{i} ({names[i]!r}, {ids[i]})" for i in found)
    return KeyError(
        f"ImageNet class name {query!r} is ambiguous: it matches classes {options}; "
        f"pass the exact name or the WordNet ID"
    )


def class_index(name_or_wnid: str) -> int:
    """Index (0..999) of an ImageNet-1k class given its English name or WordNet ID.

    >>> class_index("tench"), class_index("n01440764")
    (0, 0)

    Raises KeyError for an unknown or ambiguous name (the message lists the
    candidates), TypeError for a non-string.
    """
    if not isinstance(name_or_wnid, str):
        raise TypeError(f"class_index() takes a class name or WordNet ID string, got {type(name_or_wnid).__name__}")
    exact, loose, by_wnid = _indices()
    query = name_or_wnid
    stripped = query.strip()

    if _WNID.fullmatch(stripped):
        if stripped in by_wnid:
            return by_wnid[stripped]
        raise KeyError(f"{stripped!r} looks like a WordNet ID but is not one of the {NUM_CLASSES} ImageNet-1k synsets")

    found = exact.get(query)
    if found is None:
        found = loose.get(_normalise(query))
    if found is not None:
        if len(found) == 1:
            return found[0]
        raise _ambiguous(query, found)

    close = difflib.get_close_matches(_normalise(query), list(loose), n=3, cutoff=0.75)
    names = _lines("imagenet_classes.txt")
    suggestions = [names[i] for key in close for i in loose[key]]
    hint = f"; did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    raise KeyError(f"{query!r} is not an ImageNet-1k class name or WordNet ID{hint}")
