"""Tool names an upstream may use, and the look-alikes it may not.

A grant ``tool:db.read_*`` is matched by ``fnmatch``; a server that lists ``read_r\u043ews``
(a Cyrillic o) next to ``read_rows`` would get the look-alike matched by the same grant,
and a model cannot tell the two apart. So:

* a tool name must be 1-128 characters of ``A-Z a-z 0-9 _ - .`` (the MCP 2025-11-25 naming
  guidance); anything else is refused outright;
* two names on one server whose *skeletons* are equal are both refused: the server is lying
  or confused, and Tether cannot tell which one is real. The skeleton is NFKC, then casefold,
  then a map of common look-alikes to one Latin letter (Cyrillic and Greek homoglyphs, ``0``/
  ``o``, ``1``/``l``/``i``, ``rn``/``m``, ``vv``/``w``), with ``-`` and ``.`` read as ``_``.

No I/O.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["TOOL_NAME", "collisions", "name_problem", "skeleton"]

TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

# Look-alikes folded to one representative (after NFKC + casefold). Not the whole Unicode
# confusables table: the common Latin look-alikes that survive NFKC, which is what a server
# would use to pass for one of its own tools.
_CONFUSABLE = str.maketrans(
    {
        # Cyrillic
        0x0430: "a",  # cyrillic small letter a
        0x0432: "b",  # cyrillic small letter ve
        0x0435: "e",  # cyrillic small letter ie
        0x0451: "e",  # cyrillic small letter io
        0x043A: "k",  # cyrillic small letter ka
        0x043C: "m",  # cyrillic small letter em
        0x043D: "h",  # cyrillic small letter en
        0x043E: "o",  # cyrillic small letter o
        0x0440: "p",  # cyrillic small letter er
        0x0441: "c",  # cyrillic small letter es
        0x0442: "t",  # cyrillic small letter te
        0x0443: "y",  # cyrillic small letter u
        0x0445: "x",  # cyrillic small letter ha
        0x0456: "i",  # cyrillic small letter byelorussian-ukrainian i
        0x0457: "i",  # cyrillic small letter yi
        0x0458: "j",  # cyrillic small letter je
        0x0455: "s",  # cyrillic small letter dze
        0x0501: "d",  # cyrillic small letter komi de
        0x051B: "q",  # cyrillic small letter qa
        0x051D: "w",  # cyrillic small letter we
        0x04BB: "h",  # cyrillic small letter shha
        0x04CF: "l",  # cyrillic small letter palochka
        # Greek
        0x03B1: "a",  # greek small letter alpha
        0x03B2: "b",  # greek small letter beta
        0x03B3: "y",  # greek small letter gamma
        0x03B5: "e",  # greek small letter epsilon
        0x03B7: "n",  # greek small letter eta
        0x03B9: "i",  # greek small letter iota
        0x03BA: "k",  # greek small letter kappa
        0x03BD: "v",  # greek small letter nu
        0x03BF: "o",  # greek small letter omicron
        0x03C1: "p",  # greek small letter rho
        0x03C4: "t",  # greek small letter tau
        0x03C5: "u",  # greek small letter upsilon
        0x03C7: "x",  # greek small letter chi
        0x03C9: "w",  # greek small letter omega
        0x03F2: "c",  # greek lunate sigma symbol
        # digits and Latin look-alikes
        ord("0"): "o",
        ord("1"): "l",
        ord("i"): "l",
        ord("|"): "l",
        ord("5"): "s",
        0x0131: "l",  # latin small letter dotless i
        0x0269: "l",  # latin small letter iota
        0x2113: "l",  # script small l
        # separators
        ord("-"): "_",
        ord("."): "_",
        0x2010: "_",  # hyphen
        0x2011: "_",  # non-breaking hyphen
        0x2013: "_",  # en dash
        0x2014: "_",  # em dash
    }
)
_MULTI = (("rn", "m"), ("vv", "w"))


def skeleton(name: str) -> str:
    """The form two look-alike names share."""
    s = unicodedata.normalize("NFKC", name).casefold().translate(_CONFUSABLE)
    # Strip combining marks that NFKC left standing (e.g. a dot above on a Latin letter).
    s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))
    for a, b in _MULTI:
        s = s.replace(a, b)
    return s


def name_problem(name: str) -> str | None:
    """Why ``name`` is refused on its own, or ``None``."""
    if TOOL_NAME.match(name):
        return None
    if not name:
        return "the tool name is empty"
    if len(name) > 128:
        return "the tool name is longer than 128 characters"
    odd = sorted({c for c in name if not re.match(r"[A-Za-z0-9_.-]", c)})
    shown = ", ".join(f"U+{ord(c):04X}" for c in odd[:5])
    return f"the tool name has characters outside A-Z a-z 0-9 _ - . ({shown})"


def collisions(names: list[str]) -> dict[str, list[str]]:
    """For each name that shares its skeleton with another, the others (sorted)."""
    by: dict[str, list[str]] = {}
    for n in names:
        by.setdefault(skeleton(n), []).append(n)
    out: dict[str, list[str]] = {}
    for group in by.values():
        distinct = sorted(set(group))
        if len(distinct) > 1:
            for n in distinct:
                out[n] = [m for m in distinct if m != n]
    return out
