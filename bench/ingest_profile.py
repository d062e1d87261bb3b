#!/usr/bin/env python3
"""Where one C-STORE's time goes in the Disk-Server: phase timers around the ingest path, medians per object.

Usage (from the repository root; ``make bench`` runs it after store_bench.py)::

    .venv/bin/python bench/ingest_profile.py [--corpus small|large] [--senders N]

Starts the appliance (twistd, as ``store_bench.py`` does, on a fresh folder
and a free port of 127.0.0.1) with timers wrapped around the functions an
object goes through, sends the corpus with DCMTK ``storescu`` (files in
order, ``TCP_NODELAY=1``) and prints, per object, the median time of each
phase on the way from its command to its response, and of the work inside
them (file creation, write, fsync, rename, directory fsync, index
transaction, the head's check), with the thread each runs on.  Timers cost
a few microseconds each: the total is a little longer than without them,
its parts are what to compare.  The wrapped names are the code's own: a
refactoring that renames one makes this tool say which it cannot find.

Then the floor: the same objects put on disk as durably by a loop doing
nothing else (each an unnamed file created, written, fsynced, linked into a
directory, the directory fsynced: the system calls alone, on the same file
system), what no code around those steps can go below.  It runs right after
the appliance's files were removed, as every benchmark run follows another's
removal: on ext4 without a journal a creation then walks past the inodes
just freed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import store_bench as sb  # noqa: E402  (servers, corpora, tools)
from store_bench import BenchError  # noqa: E402

#: (module, class or None, functions, label, kind): "mark" records the moment the first of ``functions`` found is
#: entered and left (the phases between marks), "time" its duration (work inside a phase).  Several names: the
#: same step in earlier versions of the code (``_install`` before group commit), so that a checkout of those can
#: be profiled the same way.
PROBES = (
    ("appliance.ae.storage", "StorageService", ("open_data_set",), "command", "mark"),
    ("appliance.archive.sink", "ArchiveWriter", ("finish",), "finish", "mark"),
    ("appliance.archive.archive", "Archive", ("commit",), "commit", "mark"),
    ("appliance.archive.archive", "Archive", ("_install_group", "_install"), "group", "mark"),
    ("appliance.ae.storage", "StorageService", ("handle",), "respond", "mark"),
    ("appliance.archive.sink", "ArchiveWriter", ("_look_at_head",), "the head's check (scan, wholeness)", "time"),
    ("appliance.archive.sink", None, ("inspect_memory",), "the whole object's check (scan, wholeness)", "time"),
    ("appliance.archive.store", "ObjectStore", ("open_temp",), "temporary file taken and written", "time"),
    ("appliance.archive.store", "ObjectStore", ("seal",), "fsync of the file", "time"),
    ("appliance.archive.store", "ObjectStore", ("place", "install"), "link (or rename) into place (before group "
     "commit: and the directory's fsync)", "time"),
    ("appliance.archive.store", "ObjectStore", ("sync_directories",), "fsync of the directories", "time"),
    ("appliance.archive.index", "ArchiveIndex", ("add_group", "add"), "index transaction", "time"),
    ("appliance.archive.store", "ObjectStore", ("write",), "file write", "time"),
)

#: the phases, between consecutive marks of one object (and from its response to the next command)
PHASES = (
    ("command", "finish", "reactor: command and data set received (head checked)"),
    ("finish", "finish_end", "reactor: the rest checked, handed over"),
    ("finish_end", "commit", "waiting for the chunks being written, then to the archive's commit (before group "
     "commit: the I/O jobs writing, fsyncing and checking it)"),
    ("commit", "group", "to the database thread's install (the thread hop; before group commit, also the "
     "hop back from the I/O jobs)"),
    ("group", "group_end", "database thread: the install (now: write, fsync, link or rename, directory fsync, index)"),
    ("group_end", "respond", "back on the reactor: callbacks up to the response"),
    ("respond", "respond_end", "reactor: response encoded and sent"),
)


# --------------------------------------------------------------------------- inside the appliance's process


def serve(argv) -> None:
    """The appliance's process: wrap the probes, run twistd, write the records when it stops."""
    import importlib
    import threading

    events = []  # (label, start, end, object number or None)
    state = {"object": -1}
    clock = time.perf_counter
    missing = []

    def wrap(owner, name, label, kind):
        original = getattr(owner, name)
        static = isinstance(owner.__dict__.get(name), staticmethod)

        def timed(*args, **kwargs):
            if label == "command":
                state["object"] += 1
            started = clock()
            try:
                return original(*args, **kwargs)
            finally:
                events.append((label, kind, started, clock(), state["object"], threading.current_thread().name))

        setattr(owner, name, staticmethod(timed) if static else timed)

    for module_name, class_name, functions, label, kind in PROBES:
        module = importlib.import_module(module_name)
        owner = getattr(module, class_name) if class_name else module
        found = [function for function in functions if function in vars(owner)]
        if not found:
            missing.append(f"{module_name}.{class_name or ''}.{'/'.join(functions)}")
            continue
        wrap(owner, found[0], label, kind)
    output = argv[0]

    def write_records():
        with open(output, "w") as handle:
            json.dump({"events": events, "missing": missing}, handle)

    from twisted.internet import reactor

    reactor.addSystemEventTrigger("before", "shutdown", write_records)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd"] + argv[1:]
    run()


# --------------------------------------------------------------------------- the driver


class ProfiledAppliance(sb.ApplianceServer):
    def __init__(self, tools, workdir, records: str) -> None:
        super().__init__(tools, workdir)
        self.records = records

    def command(self):
        command = super().command()
        return [sys.executable, os.path.abspath(__file__), "--serve", self.records] + command[1:]


def analyse(records: dict, objects: int) -> list:
    marks = {}  # (object, label) -> (start, end)
    times = {}  # label -> [durations]
    threads = {}
    for label, kind, start, end, number, thread in records["events"]:
        if kind == "mark":
            marks.setdefault((number, label), (start, end))
        else:
            times.setdefault(label, []).append(end - start)
            threads[label] = thread
    phases = []
    for first, second, description in PHASES:
        durations = []
        for number in range(objects):
            def at(label):
                base = label[:-4] if label.endswith("_end") else label
                found = marks.get((number, base))
                if found is None:
                    return None
                return found[1] if label.endswith("_end") else found[0]
            a, b = at(first), at(second)
            if a is not None and b is not None:
                durations.append(b - a)
        phases.append((description, durations))
    turn = []
    for number in range(1, objects):
        previous, this = marks.get((number - 1, "respond")), marks.get((number, "command"))
        if previous and this:
            turn.append(this[0] - previous[1])
    phases.insert(0, ("the sender's turn: response to next command (storescu reads its next file)", turn))
    work = [(f"{label} [{threads[label]}]", durations) for label, durations in times.items()]
    return phases, work


def durable_floor(corpus: dict, workdir: str) -> dict:
    """The corpus's objects put on disk with nothing but the durable steps (unnamed file made, written,
    fsynced, linked into a directory three deep as the archive's are, the directory fsynced; a named file renamed
    where unnamed ones cannot be made), timed per step: {step: [seconds per object]}."""
    objects = []
    for name in sorted(name for name in os.listdir(corpus["dir"]) if name.endswith(".dcm")):
        with open(os.path.join(corpus["dir"], name), "rb") as handle:
            objects.append(handle.read())
    directory = os.path.join(workdir, "floor", "ab", "c" * 40, "d" * 40)
    os.makedirs(directory)
    tmp = os.path.join(workdir, "floor", "tmp")
    os.makedirs(tmp)
    try:
        os.close(os.open(tmp, os.O_TMPFILE | os.O_WRONLY, 0o640))
        unnamed = True
    except (AttributeError, OSError):  # no O_TMPFILE here, or not on this file system
        unnamed = False
    proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY) if unnamed else None
    handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    steps: dict = {"file created": [], "written": [], "fsync of the file": [], "link (or rename)": [],
                   "fsync of the directory": []}
    clock = time.perf_counter
    try:
        for number, data in enumerate(objects):
            target = os.path.join(directory, f"{number:05d}.dcm")
            started = clock()
            if unnamed:
                fd = os.open(tmp, os.O_TMPFILE | os.O_WRONLY, 0o640)
            else:
                fd = os.open(os.path.join(tmp, f"{number}.part"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
            created = clock()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            written = clock()
            os.fsync(fd)
            synced = clock()
            if unnamed:
                os.link(str(fd), target, src_dir_fd=proc, follow_symlinks=True)
            else:
                os.rename(os.path.join(tmp, f"{number}.part"), target)
            os.close(fd)
            placed = clock()
            os.fsync(handle)
            done = clock()
            for step, seconds in zip(steps, (created - started, written - created, synced - written, placed - synced,
                                             done - placed)):
                steps[step].append(seconds)
    finally:
        os.close(handle)
        if proc is not None:
            os.close(proc)
    return steps


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--serve"]:
        serve(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=("small", "large"), default="small")
    parser.add_argument("--senders", type=int, default=1)
    args = parser.parse_args(argv)
    return sb.run_guarded("ingest_profile", _run, args)


def _run(args) -> int:
    tools = sb.find_tools(["appliance"])
    corpora = sb.ensure_corpora([args.corpus])
    corpus = corpora[args.corpus]
    sb.warm_page_cache(corpus)
    with tempfile.TemporaryDirectory(prefix="ingest-profile-") as workdir:
        records_path = os.path.join(workdir, "records.json")
        server = ProfiledAppliance(tools, workdir, records_path)
        try:
            server.start()
            seconds = sb.store(tools, server, corpus, args.senders)
        finally:
            server.stop()
        try:
            with open(records_path) as handle:
                records = json.load(handle)
        except (OSError, ValueError) as error:
            raise BenchError(f"the appliance wrote no timings ({error}):\n{server.log_tail()}") from None
    if records["missing"]:
        print("not timed (no such function in this version of the code): " + ", ".join(records["missing"]))
    phases, work = analyse(records, corpus["files"])
    print(f"{corpus['label']}: {corpus['files']} objects, {args.senders} sender(s), {seconds:.3f} s with timers "
          f"({seconds / corpus['files'] * 1e3:.2f} ms per object)")
    print("\nper object, median (mean) in microseconds:")
    for description, durations in phases:
        if durations:
            print(f"  {statistics.median(durations) * 1e6:8.0f} ({statistics.mean(durations) * 1e6:6.0f})  "
                  f"{description}")
    print("\nwork inside those phases, per call:")
    for label, durations in work:
        print(f"  {statistics.median(durations) * 1e6:8.0f} ({statistics.mean(durations) * 1e6:6.0f})  {label}"
              f"  [{len(durations)} calls]")
    with tempfile.TemporaryDirectory(prefix="ingest-floor-") as workdir:
        steps = durable_floor(corpus, workdir)
    totals = [sum(parts) for parts in zip(*steps.values())]
    print(f"\nthe floor: the same objects each in a file made, written, fsynced, linked and its directory fsynced "
          f"by a loop doing nothing else, {sum(totals):.3f} s in all; per object, median (mean) in microseconds:")
    for step, durations in list(steps.items()) + [("all of it", totals)]:
        print(f"  {statistics.median(durations) * 1e6:8.0f} ({statistics.mean(durations) * 1e6:6.0f})  {step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
