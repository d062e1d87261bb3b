"""Coverage-guided fuzzing (atheris, libFuzzer) of what hostile bytes reach first.

    python tools/fuzz.py TARGET [--seconds N] [--corpus DIR]     (make fuzz runs every target)
    python tools/fuzz.py --list

Targets:

* ``pdu``: the PDU framer and decoder (:class:`appliance.dicom.pdu.PDUFramer`,
  :func:`appliance.dicom.pdu.decode_pdu`), and for each decoded
  A-ASSOCIATE-RQ the acceptor's negotiation;
* ``command``: the command-set decoder and the DIMSE provider's checks on
  whatever decodes (:class:`appliance.dicom.provider.DimseProvider`);
* ``dataset``: the ingest scanner and the wholeness check
  (:func:`appliance.dataset.fastscan.scan`,
  :func:`appliance.dataset.structure.problem`) in the three uncompressed
  syntaxes, the first input byte choosing the syntax; and differentially:
  whenever the scanner answers, its answer is what storage's pydicom path
  gives (the metadata, the Pixel Data offset, the 12 bytes there), and the
  head's wholeness as the sinks check it
  (:func:`appliance.dataset.checks.check_head`) is the whole head's walk's
  verdict, in the same words.

A finding is any exception but the decoder's own error (PDUDecodeError,
DimseDecodeError), or a :class:`Disagreement` between two paths that must
agree: libFuzzer stops and writes the input as crash-*. Each
target starts from the corpus kept in ``tools/fuzz_corpus/TARGET`` (golden
PDUs, command sets and data sets) and adds what it finds interesting to a
working copy (``--corpus``, default a temporary folder), so the repository's
corpus changes only when someone copies inputs into it on purpose.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "tools", "fuzz_corpus")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TARGETS = ("pdu", "command", "dataset")


def _pdu_target():
    from appliance.dicom import pdu as P
    from appliance.dicom.errors import PDUDecodeError
    from appliance.dicom.negotiation import AcceptorPolicy, negotiate_as_acceptor
    from appliance.dicom.uids import UNCOMPRESSED_TRANSFER_SYNTAXES, VERIFICATION

    policy = AcceptorPolicy(ae_title="DISK_SERVER", abstract_syntaxes={VERIFICATION: UNCOMPRESSED_TRANSFER_SYNTAXES},
                            max_pdu=16384, implementation_class_uid="1.2.3", implementation_version_name="FUZZ")

    def run(data: bytes) -> None:
        framer = P.PDUFramer(1 << 20)
        framer.feed(data)
        try:
            while True:
                raw = framer.next_pdu()
                if raw is None:
                    return
                pdu = P.decode_pdu(raw)
                if isinstance(pdu, P.AssociateRQ):
                    negotiate_as_acceptor(pdu, policy)
        except PDUDecodeError:
            return

    return run


def _command_target():
    from appliance.dicom import dimse as D
    from appliance.dicom import pdu as P
    from appliance.dicom.errors import DimseDecodeError
    from appliance.dicom.negotiation import ContextOutcome
    from appliance.dicom.provider import DimseProvider
    from appliance.dicom.uids import IMPLICIT_VR_LITTLE_ENDIAN, VERIFICATION

    contexts = {1: ContextOutcome(1, VERIFICATION, 0, IMPLICIT_VR_LITTLE_ENDIAN, "")}
    operations = {VERIFICATION: frozenset({0x0030})}

    def run(data: bytes) -> None:
        try:
            D.Command.decode(data)
        except DimseDecodeError:
            pass
        # whatever decodes, the provider decides on it, and its response encodes (nothing invalid echoed)
        provider = DimseProvider(contexts, operations)
        pdvs = [P.PDV(1, True, True, data)]
        for event in provider.receive(pdvs):
            request = getattr(event, "request", None)
            if request is not None:
                answer = provider.respond(request, 0xC000, ErrorComment="fuzz")
                if answer is not None:
                    answer[1].encode()

    return run


class Disagreement(AssertionError):
    """Two paths that must give the same answer did not."""


def _dataset_target():
    import warnings

    from appliance.dataset import checks, fastscan, structure
    from appliance.dataset.metadata import extract

    syntaxes = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")
    not_whole = "data set not whole: "

    def run(data: bytes) -> None:
        if not data:
            return
        syntax = syntaxes[data[0] % 3]
        implicit, little = syntax == syntaxes[1], syntax != syntaxes[2]
        body = data[1:]
        fast = fastscan.scan(body, 0, syntax)
        structure.problem(body, 0, len(body), implicit, little)
        if fast is None:
            return  # declined: the pydicom path decides, as in storage
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds, offset, header = checks.parse_memory(body, 0, syntax)
                expected = (extract(ds), offset, header)
            except Exception as error:
                raise Disagreement(f"the scanner answered where the pydicom path raised {error!r}") from error
        if fast != expected:
            raise Disagreement(f"the scanner answered {fast!r}, the pydicom path {expected!r}")
        metadata = fast[0]
        description = checks.ObjectDescription(metadata.sop_class_uid, metadata.sop_instance_uid, syntax, "FUZZ")
        try:
            if checks.check_head(body, description) is None:
                return  # no Pixel Data reached: the whole is checked at the end
            answer = None
        except checks.Refused as refusal:
            if not refusal.comment.startswith(not_whole):
                return  # refused before its wholeness is looked at
            answer = refusal.comment[len(not_whole):]
        walked = structure.problem(body, 0, fast[1], implicit, little)
        if answer != walked:
            raise Disagreement(f"the head's check says {answer!r}, the whole head's walk {walked!r}")

    return run


def make_corpus() -> None:
    """(Re)write the seed corpus under tools/fuzz_corpus: valid inputs of each kind, deterministic."""
    from pydicom.dataset import Dataset

    from appliance.compat import encode_dataset
    from appliance.dicom import dimse as D
    from appliance.dicom.negotiation import AcceptorPolicy, negotiate_as_acceptor, propose
    from appliance.dicom.uids import (EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
                                      STUDY_ROOT_FIND, UNCOMPRESSED_TRANSFER_SYNTAXES, VERIFICATION)

    ct_image_storage = "1.2.840.10008.5.1.4.1.1.2"

    def write(target: str, name: str, data: bytes) -> None:
        folder = os.path.join(CORPUS, target)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(data)

    request = propose("FUZZ", "DISK_SERVER", [(VERIFICATION, UNCOMPRESSED_TRANSFER_SYNTAXES),
                                              (STUDY_ROOT_FIND, (IMPLICIT_VR_LITTLE_ENDIAN,))], 16384, "1.2.3", "FUZZ")
    policy = AcceptorPolicy(ae_title="DISK_SERVER", abstract_syntaxes={VERIFICATION: UNCOMPRESSED_TRANSFER_SYNTAXES},
                            max_pdu=16384, implementation_class_uid="1.2.3", implementation_version_name="FUZZ")
    echo = D.Command(CommandField=0x0030, MessageID=1, AffectedSOPClassUID=VERIFICATION,
                     CommandDataSetType=D.NO_DATA_SET)
    write("pdu", "associate-rq", request.encode())
    write("pdu", "associate-ac", negotiate_as_acceptor(request, policy).response.encode())
    write("pdu", "associate-rj", bytes((3, 0, 0, 0, 0, 4, 0, 1, 1, 3)))
    write("pdu", "p-data", b"".join(D.fragment(1, True, echo.encode(), 16384)))
    write("pdu", "release-rq-rp-abort", bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0, 6, 0, 0, 0, 0, 4, 0, 0, 0, 0,
                                               7, 0, 0, 0, 0, 4, 0, 0, 2, 6)))
    commands = {
        "echo": echo,
        "find": D.Command(CommandField=0x0020, MessageID=2, Priority=0, AffectedSOPClassUID=STUDY_ROOT_FIND,
                          CommandDataSetType=0),
        "store": D.Command(CommandField=0x0001, MessageID=3, Priority=0, AffectedSOPClassUID=ct_image_storage,
                           AffectedSOPInstanceUID="1.2.3.4", CommandDataSetType=0,
                           MoveOriginatorApplicationEntityTitle="MOVESCU", MoveOriginatorMessageID=7),
        "move": D.Command(CommandField=0x0021, MessageID=4, Priority=0, AffectedSOPClassUID=STUDY_ROOT_FIND,
                          MoveDestination="DEST", CommandDataSetType=0),
        "cancel": D.Command(CommandField=0x0FFF, MessageIDBeingRespondedTo=2, CommandDataSetType=D.NO_DATA_SET),
        "response": D.Command(CommandField=0x8020, MessageIDBeingRespondedTo=2, Status=0xFF00,
                              CommandDataSetType=0, ErrorComment="pending"),
    }
    for name, command in commands.items():
        write("command", name, command.encode())
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = ct_image_storage, "1.2.826.0.1.13.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.13", "1.2.826.0.1.13.2"
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.Modality = "Doe^John", "P1", "20240102", "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-A0100", "SRT", "Brain"
    ds.ProcedureCodeSequence = [code]
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 2, 2, 16, 1
    ds.PixelData = bytes(8)
    for index, syntax in enumerate((EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)):
        write("dataset", f"image-{index}", bytes((index,)) + encode_dataset(ds, syntax))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", choices=TARGETS)
    parser.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default 60)")
    parser.add_argument("--corpus", default=None, help="working corpus folder (default: a temporary copy)")
    parser.add_argument("--list", action="store_true", help="list the targets")
    parser.add_argument("--make-corpus", action="store_true", help="(re)write the seed corpus in tools/fuzz_corpus")
    args, rest = parser.parse_known_args(argv)
    if args.make_corpus:
        make_corpus()
        return 0
    if args.list or args.target is None:
        print("\n".join(TARGETS))
        return 0 if args.list else 2
    try:
        import atheris
    except ImportError:
        print("fuzz: atheris is not installed (pip install atheris); nothing fuzzed", file=sys.stderr)
        return 0
    seed = os.path.join(CORPUS, args.target)
    work = args.corpus or tempfile.mkdtemp(prefix=f"fuzz-{args.target}-")
    os.makedirs(work, exist_ok=True)
    for name in os.listdir(seed):
        shutil.copy(os.path.join(seed, name), work)
    with atheris.instrument_imports(include=["appliance"]):
        run = {"pdu": _pdu_target, "command": _command_target, "dataset": _dataset_target}[args.target]()

    def test_one_input(data: bytes) -> None:
        run(bytes(data))

    atheris.Setup([sys.argv[0], f"-max_total_time={args.seconds}", "-rss_limit_mb=2048",
                   "-max_len=65536", *rest, work], test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
