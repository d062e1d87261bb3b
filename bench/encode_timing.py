#!/usr/bin/env python3
"""In-process timing of C-FIND response encoding, per match.

Usage (from the repository root)::

    PYTHONPATH=. .venv/bin/python bench/encode_timing.py [--rounds N] [--scale-matches N]

It builds the tests' C-FIND corpus (tests/support_query.py: 9 studies, 13
series, 27 instances) in a temporary folder, runs queries at STUDY, SERIES
and IMAGE level on it with :class:`appliance.archive.query.QueryRun`, and
times, per match:

* ``fetch``: QueryRun.fetch alone (matching, the JSON identifiers);
* ``pydicom``: the pydicom path (``FindService._encode``: Dataset.from_json,
  response_character_set, write_dataset);
* ``fast``: :func:`appliance.archive.encode.encode_identifier` alone (when
  the module exists), and how many matches it answered itself;
* ``encoder``: what the service now runs on the worker thread per match
  (fast path, pydicom when it declines).

With the benchmark's 1M index (bench/.corpus/query-1m/index.sqlite, made by
query_bench.py) it also times the benchmark's universal STUDY query on its
first ``--scale-matches`` matches.  Nothing is sent over a network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from pydicom.dataset import Dataset  # noqa: E402

from appliance.ae.query import FindService  # noqa: E402
from appliance.archive.query import QueryRun, build_query  # noqa: E402
from appliance.dicom.uids import EXPLICIT_VR_LITTLE_ENDIAN  # noqa: E402

try:
    from appliance.archive.encode import encode_identifier
except ImportError:  # before the fast path existed
    encode_identifier = None
try:
    from appliance.ae.query import response_encoder
except ImportError:
    response_encoder = None

SCALE_INDEX = os.path.join(HERE, ".corpus", "query-1m", "index.sqlite")
#: query_bench.py's keys
BENCH_KEYS = dict(PatientName="", PatientID="", StudyDate="", StudyInstanceUID="", ModalitiesInStudy="",
                  NumberOfStudyRelatedInstances="")


def identifier(level: str, **keys) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def queries():
    from tests.support_query import series_uid, study_uid

    many_study = dict(BENCH_KEYS, PatientBirthDate="", PatientSex="", StudyTime="", AccessionNumber="", StudyID="",
                      ReferringPhysicianName="", StudyDescription="", NumberOfStudyRelatedSeries="",
                      SOPClassesInStudy="", NumberOfPatientRelatedStudies="", RetrieveAETitle="",
                      InstanceAvailability="", PatientAge="", PatientWeight="")
    return [
        ("STUDY, the benchmark's keys", identifier("STUDY", **BENCH_KEYS)),
        ("STUDY, 20 keys", identifier("STUDY", **many_study)),
        ("SERIES, 10 keys", identifier("SERIES", StudyInstanceUID=study_uid(5), SeriesInstanceUID="", Modality="",
                                       SeriesNumber="", SeriesDate="", SeriesTime="", SeriesDescription="",
                                       BodyPartExamined="", NumberOfSeriesRelatedInstances="",
                                       PerformedProcedureStepStartDate="")),
        ("IMAGE, 12 keys", identifier("IMAGE", StudyInstanceUID=study_uid(5), SeriesInstanceUID=series_uid(5, 0),
                                      SOPInstanceUID="", SOPClassUID="", InstanceNumber="", ContentDate="",
                                      ContentTime="", AcquisitionDateTime="", ImageType="", Rows=None, Columns=None,
                                      BitsAllocated=None, PhotometricInterpretation="", NumberOfFrames="")),
    ]


def fetch_all(index_path: str, query, limit: int = 0):
    run = QueryRun(index_path, query)
    results = []
    try:
        while not run.done and (not limit or len(results) < limit):
            results.extend(run.fetch(64))
    finally:
        run.close()
    return results[:limit] if limit else results


def per_match(function, results, rounds: int) -> float:
    """Microseconds per match of ``function(result)``, best of ``rounds`` passes."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for result in results:
            function(result)
        best = min(best, time.perf_counter() - start)
    return best / len(results) * 1e6


def measure(label: str, index_path: str, ds: Dataset, rounds: int, limit: int = 0) -> None:
    query = build_query(ds, retrieve_ae_title="DISK_SERVER")
    level, syntax = query.level, EXPLICIT_VR_LITTLE_ENDIAN
    fetch_start = time.perf_counter()
    results = fetch_all(index_path, query, limit)
    fetch_us = (time.perf_counter() - fetch_start) / len(results) * 1e6
    line = f"{label:32} {len(results):6} matches  fetch {fetch_us:6.1f} us"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = per_match(lambda r: FindService._encode(r, level, None, syntax), results, rounds)
        line += f"  pydicom {old:6.1f} us"
        if encode_identifier is not None:
            fast = per_match(lambda r: encode_identifier(r, level, None, syntax), results, rounds)
            taken = sum(encode_identifier(r, level, None, syntax) is not None for r in results)
            line += f"  fast {fast:5.1f} us ({taken}/{len(results)} fast)"
        if response_encoder is not None:
            encoder = response_encoder(level, None, syntax)
            both = per_match(encoder, results, rounds)
            line += f"  encoder {both:5.1f} us  ({old / both:4.1f}x)"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50, help="passes over the test corpus's matches (best kept)")
    parser.add_argument("--scale-matches", type=int, default=4000,
                        help="matches of the universal query on the 1M index (0 skips it)")
    options = parser.parse_args()
    from tests.support_query import archive_copy, fill_corpus

    work = tempfile.mkdtemp(prefix="encode-timing-")
    cwd = os.getcwd()
    try:
        os.chdir(work)  # archive_copy's template goes in the working folder
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            archive = archive_copy(os.path.join(work, "archive"), fill_corpus)
        try:
            for label, ds in queries():
                measure(label, archive.index_path, ds, options.rounds)
        finally:
            archive.close()
        if options.scale_matches and os.path.exists(SCALE_INDEX):
            measure("1M index, universal STUDY", SCALE_INDEX, identifier("STUDY", **BENCH_KEYS), 3,
                    options.scale_matches)
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
