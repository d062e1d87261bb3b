"""``appliance-archive``: the statement's Archive Manager application.

    appliance-archive [--config PATH] list [--patients]
    appliance-archive [--config PATH] delete STUDY_UID
    appliance-archive [--config PATH] protect STUDY_UID | unprotect STUDY_UID
    appliance-archive [--config PATH] evict --dry-run [--bytes N]
    appliance-archive [--config PATH] verify
    appliance-archive [--config PATH] conflicts [--clear STUDY_UID | --clear-all]

It works on the archive's files and index directly, safely beside a running
appliance (SQLite's locking; files are removed before their rows).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from .. import config as configuration
from ..archive.archive import Archive, read_object
from ..archive.eviction import plan, shortfall
from ..dataset.deflate import InflateLimits
from ..net.threads import synchronous_runner

__all__ = ["main"]


class _WallClock:
    @staticmethod
    def seconds() -> float:
        return time.time()


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"  # pragma: no cover


def _run(deferred):
    """The synchronous runners make every Deferred fire at once; unwrap it."""
    results = []
    deferred.addBoth(results.append)
    result = results[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def _list(archive: Archive, patients: bool, out) -> int:
    if patients:
        rows = archive.index.patients()
        # the names the patient's studies carry, most recently stored first (more than one: see `conflicts`)
        print(f"{'PATIENT ID':<20} {'ISSUER':<16} {'STUDIES':>7} {'SIZE':>10}  NAMES", file=out)
        for patient_id, issuer, names, studies, size in rows:
            print(f"{patient_id or '-':<20} {issuer or '-':<16} {studies:>7} {_size(size):>10}  {' | '.join(names)}",
                  file=out)
        return 0
    print(f"{'STUDY INSTANCE UID':<64} {'PATIENT ID':<16} {'DATE':<8} {'SER':>4} {'INST':>6} {'SIZE':>10} "
          f"{'STORED':<19} {'ACCESSED':<19} PROTECTED", file=out)
    for study in archive.index.studies():
        print(f"{study.study_uid:<64} {study.patient_id:<16} {study.study_date:<8} {study.num_series:>4} "
              f"{study.num_instances:>6} {_size(study.size):>10} {_when(study.stored_at):<19} "
              f"{_when(study.accessed_at):<19} {'yes' if study.protected else 'no'}", file=out)
    total = archive.index.total_size()
    patients_n, studies_n, series_n, instances_n = archive.index.counts()
    print(f"{patients_n} patients, {studies_n} studies, {series_n} series, {instances_n} instances, {_size(total)}",
          file=out)
    return 0


def _evict_dry_run(archive: Archive, wanted: Optional[int], out) -> int:
    limits = archive.limits
    free = archive.store.free_space()
    size = archive.index.total_size()
    short = shortfall(limits, size, free, 0)
    target = wanted if wanted is not None else short.target
    candidates = list(archive.index.eviction_order())
    if target <= 0:
        print(f"within limits ({_size(size)} stored, {_size(free)} free); next in eviction order:", file=out)
        chosen = [uid for uid, _, _ in candidates[:10]]
    else:
        chosen, freed = plan(candidates, set(), target)
        reason = short.reason if wanted is None else f"{wanted} bytes asked for"
        print(f"eviction would remove {len(chosen)} studies, {_size(freed)} ({reason}):", file=out)
    sizes = {uid: (size, accessed) for uid, size, accessed in candidates}
    for uid in chosen:
        study_size, accessed = sizes[uid]
        print(f"  {uid}  {_size(study_size)}  last accessed {_when(accessed)}", file=out)
    return 0


def _verify(archive: Archive, out) -> int:
    problems = 0
    checked = 0
    for row in archive.index.all_instances():
        checked += 1
        path = archive.store.absolute(row.path)
        try:
            actual = os.path.getsize(path)
        except FileNotFoundError:
            print(f"MISSING  {row.sop_uid}: {row.path}", file=out)
            problems += 1
            continue
        if actual != row.size:
            print(f"SIZE     {row.sop_uid}: {row.path} is {actual} bytes, index says {row.size}", file=out)
            problems += 1
            continue
        try:
            # pixel data never read; a deflated data set inflated as a stream, within the limits
            meta, _, _ = read_object(path, archive.inflate_limits, archive.store.tmp)
            if meta.sop_instance_uid != row.sop_uid:
                raise ValueError(f"holds SOP instance {meta.sop_instance_uid}")
        except Exception as error:  # any parse problem is a finding, not a crash
            print(f"CORRUPT  {row.sop_uid}: {row.path}: {error}", file=out)
            problems += 1
    for relative, _ in archive.store.stored_files():
        if not archive.index.has_path(relative):
            print(f"ORPHAN   {relative} (not in the index)", file=out)
            problems += 1
    print(f"verified {checked} instances: {problems} problems", file=out)
    return 1 if problems else 0


def _conflicts(archive: Archive, out) -> int:
    """Patient attributes that differ between studies of one Patient ID, or within one study."""
    rows = archive.index.conflicts()
    for row in rows:
        issuer = f" (issuer {row.issuer})" if row.issuer else ""
        against = f"study {row.other_study_uid}" if row.other_study_uid else "its own earlier objects"
        times = f"{row.occurrences} times, last {_when(row.last_seen)}" if row.occurrences > 1 else "once"
        print(f"{_when(row.first_seen)}  Patient ID {row.patient_id or '(none)'}{issuer}: study {row.study_uid} "
              f"differs from {against} in {', '.join(row.attributes)} (seen {times})", file=out)
    print(f"{len(rows)} conflicts", file=out)
    return 0


def main(argv: Optional[List[str]] = None, out=None) -> int:
    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="appliance-archive", description="Manage the Disk-Server's archive.")
    parser.add_argument("--config", default=configuration.DEFAULT_CONFIG_PATH, help="configuration file (TOML)")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list studies (or patients) with sizes and access times")
    listing.add_argument("--patients", action="store_true")
    for name in ("delete", "protect", "unprotect"):
        command = commands.add_parser(name, help=f"{name} a study")
        command.add_argument("study_uid")
    evict = commands.add_parser("evict", help="show what eviction would remove next")
    evict.add_argument("--dry-run", action="store_true", required=True)
    evict.add_argument("--bytes", type=int, default=None, help="bytes to free (default: what the limits need now)")
    commands.add_parser("verify", help="check the archive's files against its index")
    conflicts = commands.add_parser(
        "conflicts", help="list studies whose patient attributes differ from another study of the same Patient ID "
                          "or within the study")
    clearing = conflicts.add_mutually_exclusive_group()
    clearing.add_argument("--clear", metavar="STUDY_UID", help="forget the conflicts of this study (once fixed)")
    clearing.add_argument("--clear-all", action="store_true", help="forget every recorded conflict")
    args = parser.parse_args(argv)

    try:
        config = configuration.load(args.config)
    except configuration.ConfigError as error:
        print(f"appliance-archive: {error}", file=sys.stderr)
        return 2
    settings = config.archive
    archive = Archive(settings.path, settings.limits, settings.on_duplicate, _WallClock(),
                      synchronous_runner, synchronous_runner,
                      InflateLimits(settings.max_object_size, settings.max_inflation_ratio))
    try:
        if args.command == "list":
            return _list(archive, args.patients, out)
        if args.command == "delete":
            freed = _run(_deferred(archive.delete_study(args.study_uid, why="deleted with appliance-archive")))
            if not freed:
                print(f"appliance-archive: no study {args.study_uid}", file=sys.stderr)
                return 1
            print(f"deleted study {args.study_uid} ({_size(freed)})", file=out)
            return 0
        if args.command in ("protect", "unprotect"):
            if not archive.index.set_protected(args.study_uid, args.command == "protect"):
                print(f"appliance-archive: no study {args.study_uid}", file=sys.stderr)
                return 1
            print(f"study {args.study_uid} {args.command}ed", file=out)
            return 0
        if args.command == "evict":
            return _evict_dry_run(archive, args.bytes, out)
        if args.command == "conflicts":
            if args.clear or args.clear_all:
                cleared = archive.index.clear_conflicts(None if args.clear_all else args.clear)
                print(f"forgot {cleared} conflicts", file=out)
                return 0
            return _conflicts(archive, out)
        return _verify(archive, out)
    finally:
        archive.close()


def _deferred(coroutine):
    from twisted.internet import defer

    return defer.ensureDeferred(coroutine)


def entry_point() -> None:
    """The ``appliance-archive`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
