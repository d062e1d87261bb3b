"""Storage management policy, pure: which studies to evict, and when.

The archive evicts the least recently accessed studies (accessed = stored,
retrieved or viewed) when storing an object would cross ``max_archive_size``
or leave less than ``min_free_space`` on the file system, down to a
low-water mark: ``low_water`` of the size limit, and ``min_free_space``
plus the same fraction of headroom for free space.  Protected studies and
studies being written or retrieved (pinned) are never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Set, Tuple

__all__ = ["StorageLimits", "Shortfall", "shortfall", "plan"]


@dataclass(frozen=True)
class StorageLimits:
    max_archive_size: int = 0  # bytes; 0 = no limit
    min_free_space: int = 1 << 30
    low_water: float = 0.9
    auto_delete: bool = True


@dataclass(frozen=True)
class Shortfall:
    """Bytes to free so that an object fits (``needed``) and down to the low-water mark (``target``)."""

    needed: int
    target: int
    reason: str


def shortfall(limits: StorageLimits, archive_size: int, free_space: int, incoming: int) -> Shortfall:
    """How much must go before ``incoming`` more bytes may be stored (zero needed: nothing)."""
    needed = target = 0
    reasons = []
    if limits.max_archive_size:
        over = archive_size + incoming - limits.max_archive_size
        if over > 0:
            needed = over
            target = archive_size + incoming - round(limits.max_archive_size * limits.low_water)
            reasons.append(
                f"archive would hold {archive_size + incoming} bytes, max_archive_size is {limits.max_archive_size}"
            )
    if limits.min_free_space:
        short = limits.min_free_space - (free_space - incoming)
        if short > 0:
            headroom = round(limits.min_free_space * (1 - limits.low_water))
            needed = max(needed, short)
            target = max(target, short + headroom)
            reasons.append(
                f"{free_space - incoming} bytes would be left free, min_free_space is {limits.min_free_space}"
            )
    return Shortfall(needed, max(target, needed), "; ".join(reasons))


def plan(candidates: Iterable[Tuple[str, int, float]], pinned: Set[str], target: int) -> Tuple[List[str], int]:
    """Studies to evict, least recently accessed first, until ``target`` bytes are freed.

    ``candidates`` are (study UID, size, accessed at) in eviction order
    (unprotected only); pinned studies are skipped.  Returns the chosen UIDs
    and the bytes they free (less than ``target`` if there is not enough).
    """
    chosen: List[str] = []
    freed = 0
    for study_uid, size, _ in candidates:
        if freed >= target:
            break
        if study_uid in pinned:
            continue
        chosen.append(study_uid)
        freed += size
    return chosen, freed
