"""Property-based tests of the codecs hostile bytes reach first (issue 9), with hypothesis.

Whatever bytes arrive, the PDU decoder raises only PDUDecodeError, the
command-set decoder only DimseDecodeError, and the data-set scanners
(``fastscan.scan``, ``structure.problem``) never raise; commands round-trip.
Every case has a time bound (hypothesis's deadline).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from appliance.dataset import fastscan, structure
from appliance.dataset.checks import ObjectDescription, Refused, check_head
from appliance.dicom import dimse as D
from appliance.dicom import pdu as P
from appliance.dicom.errors import DimseDecodeError, PDUDecodeError
from appliance.dicom.uids import EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN

from .support_data import CT_IMAGE_STORAGE, encode_dataset, make_dataset

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

SYNTAXES = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)


def _sample(syntax: str) -> bytes:
    ds = make_dataset(sop="1.2.826.0.1.12.1", pixels=bytes(range(64)))
    ds.ImageComments = "properties"
    return encode_dataset(ds, syntax)


SAMPLES = {syntax: _sample(syntax) for syntax in SYNTAXES}


def _nested_sample(syntax: str) -> bytes:
    from .test_structure import with_sequences
    return encode_dataset(with_sequences(), syntax)


NESTED_SAMPLES = {syntax: _nested_sample(syntax) for syntax in SYNTAXES}


def _whole_by_the_general_walk(data: bytes, syntax: str):
    """structure.problem with its loop over plain elements turned off: every element through the general walk."""
    saved = structure._plain_explicit, structure._plain_implicit
    structure._plain_explicit = structure._plain_implicit = lambda data, position, bound, little: position
    try:
        return structure.problem(data, 0, len(data), syntax == IMPLICIT_VR_LITTLE_ENDIAN,
                                 syntax != EXPLICIT_VR_BIG_ENDIAN)
    finally:
        structure._plain_explicit, structure._plain_implicit = saved


def _mutate(sample: bytes, data) -> bytes:
    """``sample`` with a few bytes overwritten, inserted or cut, as hypothesis draws them."""
    sample = bytearray(sample)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(sample) - 1))
        kind = data.draw(st.sampled_from(["overwrite", "insert", "cut"]))
        chunk = data.draw(st.binary(min_size=1, max_size=8))
        if kind == "overwrite":
            sample[at:at + len(chunk)] = chunk
        elif kind == "insert":
            sample[at:at] = chunk
        else:
            del sample[at:at + len(chunk)]
    return bytes(sample)


class CodecPropertyTests(SynchronousTestCase):

    skip = None if given is not None else "hypothesis is not installed"

    if given is not None:

        @settings(max_examples=2000, deadline=1000)
        @given(st.binary(max_size=400))
        def test_pdu_decoder_raises_only_its_error(self, data):
            try:
                P.decode_pdu(data)
            except PDUDecodeError:
                pass

        @settings(max_examples=1000, deadline=1000)
        @given(st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07]), st.binary(max_size=300))
        def test_pdu_decoder_on_each_type(self, pdu_type, body):
            data = bytes((pdu_type, 0)) + len(body).to_bytes(4, "big") + body
            try:
                P.decode_pdu(data)
            except PDUDecodeError:
                pass

        @settings(max_examples=2000, deadline=1000)
        @given(st.binary(max_size=300))
        def test_command_decoder_raises_only_its_error(self, data):
            try:
                D.Command.decode(data)
            except DimseDecodeError:
                pass

        @settings(max_examples=500, deadline=1000)
        @given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.sampled_from([0x0101, 0x0000]),
               st.text("0123456789.", min_size=1, max_size=64), st.text("ABCDEFGHIJ_ ", max_size=16))
        def test_command_round_trip(self, field, message_id, data_set_type, uid, ae_title):
            command = D.Command(CommandField=field, MessageID=message_id, CommandDataSetType=data_set_type,
                                AffectedSOPClassUID=uid, MoveDestination=ae_title.strip() or None)
            decoded = D.Command.decode(command.encode())
            self.assertEqual(decoded.CommandField, field)
            self.assertEqual((decoded.MessageID, decoded.AffectedSOPClassUID), (message_id, uid))

        @settings(max_examples=1500, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
        @given(st.sampled_from(SYNTAXES), st.data())
        def test_scanners_never_raise_on_mutated_data_sets(self, syntax, data):
            """A valid data set with bytes overwritten, inserted or cut: the scanners answer, never raise."""
            mutated = _mutate(SAMPLES[syntax], data)
            fastscan.scan(mutated, 0, syntax)
            structure.problem(mutated, 0, len(mutated), syntax == IMPLICIT_VR_LITTLE_ENDIAN,
                              syntax != EXPLICIT_VR_BIG_ENDIAN)

        @settings(max_examples=1500, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
        @given(st.sampled_from(SYNTAXES), st.booleans(), st.data())
        def test_plain_element_loop_answers_as_the_general_walk(self, syntax, nested, data):
            """The wholeness check's fast loop over plain elements changes no answer, on mutated data sets with
            and without sequences (and on the intact ones)."""
            sample = (NESTED_SAMPLES if nested else SAMPLES)[syntax]
            for candidate in (sample, _mutate(sample, data)):
                expected = _whole_by_the_general_walk(candidate, syntax)
                self.assertEqual(structure.problem(candidate, 0, len(candidate), syntax == IMPLICIT_VR_LITTLE_ENDIAN,
                                                   syntax != EXPLICIT_VR_BIG_ENDIAN), expected)

        @settings(max_examples=1500, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
        @given(st.sampled_from(SYNTAXES), st.booleans(), st.data())
        def test_head_then_rest_answers_as_the_whole(self, syntax, nested, data):
            """Wholeness checked in two runs, the head (up to where the fast scanner finds Pixel Data) as it
            arrives and the rest once whole, says what the whole says, on mutated data sets."""
            implicit, little = syntax == IMPLICIT_VR_LITTLE_ENDIAN, syntax != EXPLICIT_VR_BIG_ENDIAN
            sample = (NESTED_SAMPLES if nested else SAMPLES)[syntax]
            for candidate in (sample, _mutate(sample, data)):
                fast = fastscan.scan(candidate, 0, syntax)
                if fast is None:
                    continue
                offset = fast[1]
                whole = structure.problem(candidate, 0, len(candidate), implicit, little)
                head = structure.problem(candidate, 0, offset, implicit, little)
                rest = structure.problem(candidate, offset, len(candidate), implicit, little, origin=0)
                self.assertEqual(head is None and rest is None, whole is None, (head, rest, whole))
                if head is None:
                    self.assertEqual(rest, whole)

        @settings(max_examples=1500, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
        @given(st.sampled_from(SYNTAXES), st.booleans(), st.data())
        def test_head_check_answers_as_the_head_walk(self, syntax, nested, data):
            """A head's wholeness as the sinks check it (only the elements the scan says hold others walked, the
            whole head only when one of them is not whole) is the whole head's walk's verdict and words, on
            mutated data sets with and without sequences."""
            implicit, little = syntax == IMPLICIT_VR_LITTLE_ENDIAN, syntax != EXPLICIT_VR_BIG_ENDIAN
            sample = (NESTED_SAMPLES if nested else SAMPLES)[syntax]
            description = ObjectDescription(CT_IMAGE_STORAGE, "1.2.826.0.1.11.1" if nested else "1.2.826.0.1.12.1",
                                            syntax, "SCU")
            prefix = "data set not whole: "
            checked = 0
            for candidate in (sample, _mutate(sample, data)):
                fast = fastscan.scan(candidate, 0, syntax)
                if fast is None:
                    continue
                try:
                    if check_head(candidate, description) is None:
                        continue  # the scan ran to the end: no Pixel Data, the whole is checked at the end
                    answer = None
                except Refused as refusal:
                    if not refusal.comment.startswith(prefix):
                        continue  # not the command's object: refused before its wholeness is looked at
                    answer = refusal.comment[len(prefix):]
                self.assertEqual(answer, structure.problem(candidate, 0, fast[1], implicit, little))
                checked += 1
            self.assertGreater(checked, 0)  # the intact sample at least
