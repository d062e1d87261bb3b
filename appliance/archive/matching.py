"""C-FIND attribute matching (PS3.4 C.2.2.2), pure functions on decoded (Unicode) values.

Single value, list of UID, universal, wildcard, range (DA, TM, DT, and
combined date-time) and sequence matching.  Values are compared after
pydicom has decoded them with their own Specific Character Set, so a request
in one character set matches names stored in another.

Person names are matched case-sensitively as the standard says, or
ignoring case and accents when the archive is configured with
``pn_matching = "insensitive"``.  A query name without ``=`` matches any of
the stored name's component groups (alphabetic, ideographic, phonetic);
with ``=``, each non-empty query group must match the stored group in its
place.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Callable, List, Optional, Tuple

from ..dataset.metadata import normalize_name

__all__ = [
    "normalize_name",
    "fold",
    "fold_chars",
    "name_groups",
    "has_wildcard",
    "glob_match",
    "glob_pattern",
    "parse_range",
    "time_bounds",
    "date_bounds",
    "datetime_bounds",
    "Matcher",
    "make_matcher",
    "UNIVERSAL",
]

WILDCARDS = ("*", "?")
TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT", "UR"})
#: VRs whose value is one string in which a backslash is an ordinary character (PS3.5 6.2)
SINGLE_VALUED_VRS = frozenset({"LT", "ST", "UT", "UR"})


def fold(text: str) -> str:
    """Case- and accent-insensitive form: NFKD, combining marks removed, casefolded.

    What the index keeps of each name (``patient_names.folded``) for the SQL
    prefilter.  It may change a name's length (Hangul syllables decompose into
    jamo, "ß" becomes "ss"), so matching itself uses :func:`fold_chars`.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def fold_chars(text: str) -> str:
    """:func:`fold`, one character for one character, so that ``?`` still means one character.

    Each character (after NFC composition) becomes its fold when that is one
    character ("É" -> "e", "Σ" -> "σ"), else its lower case ("ß", a Hangul
    syllable, a ligature stay whole).
    """
    out = []
    for char in unicodedata.normalize("NFC", text):
        folded = fold(char)
        if len(folded) != 1:
            folded = char.lower() if len(char.lower()) == 1 else char
        out.append(folded)
    return "".join(out)


def name_groups(name: str) -> List[str]:
    """The non-empty component groups of a normalized person name."""
    return [group for group in normalize_name(name).split("=") if group]


def has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


@lru_cache(maxsize=1024)
def _segments(pattern: str) -> Tuple[str, ...]:
    """A wildcard pattern split at its ``*``: fixed-length segments, in which ``?`` is any one character."""
    return tuple(pattern.split("*"))


def _segment_at(text: str, segment: str, start: int) -> bool:
    """Whether ``segment`` (``?`` any character) matches ``text`` at ``start``."""
    if "?" not in segment:
        return text.startswith(segment, start)
    if start + len(segment) > len(text):
        return False
    for offset, char in enumerate(segment):
        if char != "?" and text[start + offset] != char:
            return False
    return True


def _find_segment(text: str, segment: str, start: int, end: int) -> int:
    """The leftmost position from ``start`` where ``segment`` matches and ends by ``end``; -1 if none."""
    if "?" not in segment:
        return text.find(segment, start, end)
    # anchor on the segment's longest literal run, found by str.find; '?' positions are then checked
    literal = max(segment.split("?"), key=len)
    offset = segment.find(literal) if literal else 0
    position = start
    last = end - len(segment)
    while position <= last:
        if literal:
            found = text.find(literal, position + offset, last + offset + len(literal))
            if found < 0:
                return -1
            position = found - offset
        if _segment_at(text, segment, position):
            return position
        position += 1
    return -1


def glob_match(pattern: str, text: str) -> bool:
    """C-FIND wildcard matching (PS3.4 C.2.2.2.4): ``*`` any run, ``?`` one character, everything else literal.

    Never backtracks: the segments between ``*`` have fixed lengths, so the
    first is anchored at the start, the last at the end, and each one between
    is placed at its leftmost match after the one before (placing it further
    right can only leave less room for the rest).  Time is bounded by the
    text's length times the pattern's, whatever the pattern; literal
    segments are found by ``str.find``.
    """
    segments = _segments(pattern)
    if len(segments) == 1:
        return len(text) == len(pattern) and _segment_at(text, pattern, 0)
    head, tail = segments[0], segments[-1]
    end = len(text) - len(tail)
    if end < len(head) or not _segment_at(text, head, 0) or not _segment_at(text, tail, end):
        return False
    position = len(head)
    for segment in segments[1:-1]:
        if not segment:
            continue
        found = _find_segment(text, segment, position, end)
        if found < 0:
            return False
        position = found + len(segment)
    return True


def glob_pattern(pattern: str) -> str:
    """The same pattern for SQLite's GLOB (case-sensitive, index-friendly prefix)."""
    out = []
    for char in pattern:
        if char in "[]":
            out.append(f"[{char}]")
        else:
            out.append(char)  # * and ? mean the same in GLOB
    return "".join(out)


UNIVERSAL = None


#: a DT value as a C-FIND key may hold it: digits, fraction, UTC offset (PS3.5 6.2)
_DT_VALUE = r"\d{1,14}(?:\.\d{1,6})?(?:[+-](?:0\d|1[0-4])[0-5]\d)?"
_DT_SINGLE = re.compile(rf"\s*{_DT_VALUE}\s*")
_DT_RANGE = re.compile(rf"\s*({_DT_VALUE})?\s*-\s*({_DT_VALUE})?\s*")


def parse_range(value: str, vr: str = "DA") -> Optional[Tuple[str, str]]:
    """``"a-b"``, ``"a-"``, ``"-b"`` -> (a, b) with '' for an open end; None if not a range.

    A DT value may end with a UTC offset whose sign is a hyphen
    (``"20240102101500-0500-20240103"``): for DT the hyphen that separates
    two DT values is found by the value's syntax (an offset is -1400 to
    +1459), and a single DT with a negative offset (``"20240102-0500"``) is
    no range, while ``"2023-2024"`` (no such offset) is one.
    """
    if "-" not in value:
        return None
    if vr == "DT":
        if _DT_SINGLE.fullmatch(value):
            return None
        found = _DT_RANGE.fullmatch(value)
        return (found.group(1) or "", found.group(2) or "") if found else None
    if value.count("-") != 1:
        return None
    low, high = value.split("-")
    return low.strip(), high.strip()


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def date_bounds(low: str, high: str) -> Tuple[str, str]:
    """Comparable bounds for DA values (YYYYMMDD; the legacy YYYY.MM.DD accepted)."""
    low_digits, high_digits = _digits(low)[:8], _digits(high)[:8]
    # a partial upper bound ("202401") covers its whole span, like TM and DT bounds
    return (low_digits.ljust(8, "0"), high_digits.ljust(8, "9"))


def time_bounds(low: str, high: str) -> Tuple[str, str]:
    """Comparable bounds for TM values: HHMMSS.FFFFFF, a partial value covering its whole span."""
    return (_time_key(low, fill="0") if low else "000000.000000", _time_key(high, fill="9") if high else "999999.999999")


def _time_key(value: str, fill: str) -> str:
    value = value.replace(":", "").strip()
    whole, _, fraction = value.partition(".")
    whole = whole[:6]
    if fill == "9":
        # an upper bound of "10" means up to 10:59:59.999999
        whole = whole + "595959"[len(whole):]
    else:
        whole = whole.ljust(6, "0")
    fraction = (fraction + fill * 6)[:6] if fraction or fill == "9" else "000000"
    return f"{whole}.{fraction}"


def time_key(value: str) -> str:
    """A stored TM value in comparable form."""
    return _time_key(value, fill="0")


def datetime_bounds(low: str, high: str) -> Tuple[str, str]:
    """Comparable bounds for DT values (offsets ignored): YYYYMMDDHHMMSS.FFFFFF."""
    def key(value: str, fill: str) -> str:
        value = re.sub(r"[+-]\d{4}$", "", value.strip())  # the UTC offset is not compared
        digits, _, fraction = value.partition(".")
        digits = _digits(digits)[:14]
        pad = "99991231235959" if fill == "9" else "00000101000000"
        digits = digits + pad[len(digits):]
        fraction = (fraction + fill * 6)[:6] if fraction or fill == "9" else "000000"
        return f"{digits}.{fraction}"

    return (key(low, "0") if low else "00000101000000.000000", key(high, "9") if high else "99991231235959.999999")


def datetime_key(date: str, time: str) -> str:
    """A stored date and time as a comparable DT key."""
    digits = _digits(date)[:8].ljust(8, "0")
    return digits + time_key(time or "000000")


# --- matchers -------------------------------------------------------------------------

Matcher = Callable[[object], bool]


def _values(stored) -> List[str]:
    """Stored value(s) as a list of strings (multi-valued attributes match on any value)."""
    if stored is None:
        return []
    if isinstance(stored, (list, tuple)):
        return [str(v) for v in stored]
    return [str(stored)]


def make_matcher(vr: str, query: str, insensitive_names: bool = False) -> Optional[Matcher]:
    """A predicate on stored values for a non-sequence key, or None for universal matching.

    ``query`` is the decoded value of the key in the identifier (a backslash
    separates multiple values, except in LT, ST, UT and UR, whose one value
    may hold backslashes).
    """
    query = query.strip() if vr != "PN" else query
    if query == "" or query == "*":
        return UNIVERSAL
    if vr == "UI":
        wanted = {uid.strip().rstrip("\x00") for uid in query.split("\\") if uid.strip()}
        return lambda stored: any(v in wanted for v in _values(stored))
    if vr == "DA":
        return _range_matcher(query, vr, date_bounds, lambda v: _digits(v))
    if vr == "TM":
        return _range_matcher(query, vr, time_bounds, time_key)
    if vr == "DT":
        return _range_matcher(query, vr, datetime_bounds, lambda v: datetime_bounds(v, v)[0])
    if vr == "PN":
        return _name_matcher(query, insensitive_names)
    if vr in ("IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "SV", "UV"):
        return _number_matcher(query)
    alternatives = [query] if vr in SINGLE_VALUED_VRS else query.split("\\")
    predicates = [_text_predicate(alternative.strip()) for alternative in alternatives]
    return lambda stored: any(p(v.strip()) for v in _values(stored) for p in predicates)


def _text_predicate(pattern: str) -> Callable[[str], bool]:
    if has_wildcard(pattern):
        return lambda value: glob_match(pattern, value)
    return lambda value: value == pattern


def _range_matcher(query: str, vr: str, bounds, key) -> Matcher:
    checks = []
    for alternative in query.split("\\"):
        span = parse_range(alternative, vr)
        if span is None:
            low, high = bounds(alternative, alternative)
        else:
            low, high = bounds(*span)
        checks.append((low, high))

    def match(stored) -> bool:
        for value in _values(stored):
            if not value.strip():
                continue
            k = key(value.strip())
            if any(low <= k <= high for low, high in checks):
                return True
        return False

    return match


def _number_matcher(query: str) -> Matcher:
    wanted = []
    for alternative in query.split("\\"):
        try:
            wanted.append(float(alternative))
        except ValueError:
            wanted.append(alternative.strip())

    def match(stored) -> bool:
        for value in _values(stored):
            try:
                number = float(value)
            except ValueError:
                number = value.strip()
            if number in wanted:
                return True
        return False

    return match


def _name_matcher(query: str, insensitive: bool) -> Optional[Matcher]:
    """Person name matching: any of the query's values (backslash) against any stored value."""
    matchers = []
    for alternative in query.split("\\"):
        matcher = _one_name_matcher(alternative, insensitive)
        if matcher is UNIVERSAL:
            return UNIVERSAL
        matchers.append(matcher)
    if len(matchers) == 1:
        return matchers[0]
    return lambda stored: any(matcher(stored) for matcher in matchers)


def _one_name_matcher(query: str, insensitive: bool) -> Optional[Matcher]:
    prepare = fold_chars if insensitive else (lambda text: text)
    query_name = normalize_name(query)
    if not query_name or query_name == "*":
        return UNIVERSAL
    if "=" in query_name:
        query_groups = [prepare(group) for group in query_name.split("=")]
        predicates = [(index, _text_predicate(group)) for index, group in enumerate(query_groups) if group]

        def by_group(stored) -> bool:
            for value in _values(stored):
                groups = [prepare(g) for g in normalize_name(value).split("=")]
                # a group the stored name lacks is empty: only "*" matches it
                if all(predicate(groups[index] if index < len(groups) else "") for index, predicate in predicates):
                    return True
            return False

        return by_group
    predicate = _text_predicate(prepare(query_name))

    def any_group(stored) -> bool:
        return any(predicate(prepare(group)) for value in _values(stored) for group in name_groups(value))

    return any_group
