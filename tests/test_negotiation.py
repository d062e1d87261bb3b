"""Association negotiation as pure functions: appliance.dicom.negotiation."""

from __future__ import annotations

from pydicom.uid import UID
from twisted.trial import unittest

from appliance.dicom import pdu as P
from appliance.dicom.negotiation import (
    Acceptance,
    AcceptorPolicy,
    Rejection,
    get_proposal,
    negotiate_as_acceptor,
    negotiate_as_requestor,
    propose,
)
from appliance.dicom.uids import (
    APPLICATION_CONTEXT,
    CONFORMANCE_STORAGE_CLASSES,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    GET_COMPRESSED_TRANSFER_SYNTAXES,
    GET_IMAGE_STORAGE_CLASSES,
    GET_OTHER_STORAGE_CLASSES,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    VERIFICATION,
    registry_storage_classes,
)

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
DEFLATED_EXPLICIT_LE = "1.2.840.10008.1.2.1.99"
IMPL_UID = "1.2.826.0.1.3680043.9.9999.1"
PEER_IMPL_UID = "1.2.3.4.5.6"


def make_policy(**overrides) -> AcceptorPolicy:
    values = dict(
        ae_title="DISK_SERVER",
        abstract_syntaxes={
            VERIFICATION: UNCOMPRESSED_TRANSFER_SYNTAXES,
            CT_STORAGE: UNCOMPRESSED_TRANSFER_SYNTAXES + (JPEG_BASELINE, DEFLATED_EXPLICIT_LE),
        },
        max_pdu=32768,
        implementation_class_uid=IMPL_UID,
        implementation_version_name="APPLIANCE_0_1",
    )
    values.update(overrides)
    return AcceptorPolicy(**values)


def make_request(contexts, calling="SCU", called="DISK_SERVER", **user_info) -> P.AssociateRQ:
    """An A-ASSOCIATE-RQ with explicit (id, abstract, transfers) contexts."""
    info = dict(maximum_length=16384, implementation_class_uid=PEER_IMPL_UID, implementation_version_name="PEER_1")
    info.update(user_info)
    return P.AssociateRQ(
        called_ae_title=called,
        calling_ae_title=calling,
        presentation_contexts=tuple(P.PresentationContextRQ(i, a, tuple(t)) for i, a, t in contexts),
        user_information=P.UserInformation(**info),
    )


ECHO_ONLY = [(1, VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN])]


class AcceptorRejectionTests(unittest.TestCase):
    """Whole-association rejections with their exact (result, source, reason)."""

    def assertRejected(self, decision, triple):
        self.assertIsInstance(decision, Rejection)
        rj = decision.rejection
        self.assertEqual((rj.result, rj.source, rj.reason), triple)
        # the RJ encodes to the PS3.8 9.3.4 layout
        self.assertEqual(rj.encode(), bytes((3, 0, 0, 0, 0, 4, 0)) + bytes(triple))

    def test_unsupported_application_context(self):
        """An application context other than 1.2.840.10008.3.1.1.1 is rejected (1, 1, 2)."""
        request = P.AssociateRQ(
            called_ae_title="DISK_SERVER",
            calling_ae_title="SCU",
            application_context="1.2.3.4",
            presentation_contexts=(P.PresentationContextRQ(1, VERIFICATION, (IMPLICIT_VR_LITTLE_ENDIAN,)),),
        )
        decision = negotiate_as_acceptor(request, make_policy())
        self.assertRejected(decision, (1, 1, 2))
        self.assertIn("1.2.3.4", decision.reason)

    def test_calling_ae_not_allowed(self):
        """A calling AE title outside allowed_calling_aets is rejected (1, 1, 3)."""
        policy = make_policy(allowed_calling_aets=frozenset({"MODALITY1", "WORKSTATION"}))
        decision = negotiate_as_acceptor(make_request(ECHO_ONLY, calling="INTRUDER"), policy)
        self.assertRejected(decision, (1, 1, 3))
        self.assertIn("INTRUDER", decision.reason)

    def test_calling_ae_allowed(self):
        """A calling AE title listed in allowed_calling_aets is accepted."""
        policy = make_policy(allowed_calling_aets=frozenset({"MODALITY1", "WORKSTATION"}))
        decision = negotiate_as_acceptor(make_request(ECHO_ONLY, calling="WORKSTATION"), policy)
        self.assertIsInstance(decision, Acceptance)
        self.assertEqual(decision.negotiated.calling_ae_title, "WORKSTATION")

    def test_called_ae_not_ours(self):
        """A called AE title other than this AE's is rejected (1, 1, 7)."""
        decision = negotiate_as_acceptor(make_request(ECHO_ONLY, called="MEMORY_SERVER"), make_policy())
        self.assertRejected(decision, (1, 1, 7))
        self.assertIn("MEMORY_SERVER", decision.reason)

    def test_calling_ae_title_that_is_no_ae_title(self):
        """Issue 9: control characters, a backslash or nothing but spaces in the calling AE title (PS3.5 6.2):
        rejected (1, 1, 3)."""
        for calling in ("EVIL\r\x1b[31m", "A\\B", "    ", "TAB\tAE"):
            with self.subTest(calling=calling):
                self.assertRejected(negotiate_as_acceptor(make_request(ECHO_ONLY, calling=calling), make_policy()),
                                    (1, 1, 3))

    def test_more_than_128_presentation_contexts(self):
        """Issue 9: at most 128 contexts can exist (odd IDs 1-255); more are rejected (1, 2, 1) at once."""
        contexts = [((2 * n + 1) % 256, VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]) for n in range(50001)]
        decision = negotiate_as_acceptor(make_request(contexts), make_policy())
        self.assertRejected(decision, (1, 2, 1))
        self.assertIn("50001 presentation contexts", decision.reason)
        self.assertIsInstance(negotiate_as_acceptor(make_request(contexts[:128]), make_policy()), Acceptance)

    def test_tiny_maximum_pdu_length(self):
        """A requestor announcing a maximum PDU length below 1024 is rejected (1, 1, 1); 0 means no limit."""
        self.assertRejected(negotiate_as_acceptor(make_request(ECHO_ONLY, maximum_length=1), make_policy()),
                            (1, 1, 1))
        for fine in (0, 1024):
            self.assertIsInstance(negotiate_as_acceptor(make_request(ECHO_ONLY, maximum_length=fine), make_policy()),
                                  Acceptance)

    def test_called_ae_survives_encode_decode_padding(self):
        """The called AE title, space padded to 16 bytes on the wire, still matches after decoding."""
        request = P.AssociateRQ.decode(make_request(ECHO_ONLY).encode())
        self.assertIsInstance(negotiate_as_acceptor(request, make_policy()), Acceptance)


class TransferSyntaxChoiceTests(unittest.TestCase):
    """Which transfer syntax an accepted context gets."""

    def choose(self, proposed, **policy_overrides):
        decision = negotiate_as_acceptor(make_request([(1, CT_STORAGE, proposed)]), make_policy(**policy_overrides))
        self.assertIsInstance(decision, Acceptance)
        (context,) = decision.response.presentation_contexts
        self.assertEqual(context.result, 0)
        return context.transfer_syntax

    def test_default_prefers_explicit_big_endian(self):
        """By default Explicit VR Big Endian wins over both little endian syntaxes, whatever the proposed order."""
        proposed = [IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN]
        self.assertEqual(self.choose(proposed), EXPLICIT_VR_BIG_ENDIAN)

    def test_default_then_explicit_little_endian(self):
        """Without big endian, Explicit VR Little Endian wins over Implicit VR Little Endian."""
        self.assertEqual(self.choose([IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN]), EXPLICIT_VR_LITTLE_ENDIAN)

    def test_default_implicit_last(self):
        """Implicit VR Little Endian is chosen when it is the only acceptable syntax proposed."""
        self.assertEqual(self.choose([IMPLICIT_VR_LITTLE_ENDIAN]), IMPLICIT_VR_LITTLE_ENDIAN)

    def test_configured_priority(self):
        """A configured priority replaces the default order."""
        chosen = self.choose(
            [EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN],
            transfer_syntax_priority=(IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN),
        )
        self.assertEqual(chosen, IMPLICIT_VR_LITTLE_ENDIAN)

    def test_ranked_beats_unranked(self):
        """A ranked syntax beats an unranked one proposed before it."""
        self.assertEqual(self.choose([JPEG_BASELINE, IMPLICIT_VR_LITTLE_ENDIAN]), IMPLICIT_VR_LITTLE_ENDIAN)

    def test_unranked_in_proposed_order(self):
        """Among syntaxes the priority does not rank, the first proposed wins."""
        self.assertEqual(self.choose([DEFLATED_EXPLICIT_LE, JPEG_BASELINE]), DEFLATED_EXPLICIT_LE)
        self.assertEqual(self.choose([JPEG_BASELINE, DEFLATED_EXPLICIT_LE]), JPEG_BASELINE)

    def test_unacceptable_syntax_is_skipped(self):
        """A proposed syntax the AE does not accept for the abstract syntax is never chosen."""
        proposed = ["1.2.840.10008.1.2.4.90", IMPLICIT_VR_LITTLE_ENDIAN]
        self.assertEqual(self.choose(proposed), IMPLICIT_VR_LITTLE_ENDIAN)


class ContextResultTests(unittest.TestCase):
    """Per-context results of an accepted association."""

    def negotiate(self, contexts, **user_info):
        decision = negotiate_as_acceptor(make_request(contexts, **user_info), make_policy())
        self.assertIsInstance(decision, Acceptance)
        return decision

    def results(self, decision):
        return [(c.id, c.result, c.transfer_syntax) for c in decision.response.presentation_contexts]

    def test_abstract_syntax_not_supported(self):
        """An abstract syntax the AE does not serve gets result 3 and no transfer syntax."""
        decision = self.negotiate([(1, MR_STORAGE, [IMPLICIT_VR_LITTLE_ENDIAN]), (3, VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN])])
        self.assertEqual(self.results(decision), [(1, 3, None), (3, 0, IMPLICIT_VR_LITTLE_ENDIAN)])
        self.assertEqual(sorted(decision.negotiated.accepted), [3])

    def test_no_acceptable_transfer_syntax(self):
        """A supported abstract syntax offered only unacceptable transfer syntaxes gets result 4."""
        decision = self.negotiate([(1, VERIFICATION, [JPEG_BASELINE, "1.2.840.10008.1.2.5"])])
        self.assertEqual(self.results(decision), [(1, 4, None)])
        self.assertIn("offered", decision.negotiated.contexts[0].reason)

    def test_even_context_id_rejected(self):
        """An even presentation context ID is not accepted (provider rejection, result 2)."""
        decision = self.negotiate([(2, VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]), (3, VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN])])
        self.assertEqual(self.results(decision), [(2, 2, None), (3, 0, IMPLICIT_VR_LITTLE_ENDIAN)])
        self.assertEqual(decision.negotiated.contexts[0].reason, "presentation context ID is not odd")

    def test_duplicate_context_id_rejected(self):
        """A context ID proposed twice: the first is negotiated, the repeat is rejected with result 2."""
        decision = self.negotiate(
            [(5, VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]), (5, CT_STORAGE, [EXPLICIT_VR_LITTLE_ENDIAN])]
        )
        self.assertEqual(self.results(decision), [(5, 0, IMPLICIT_VR_LITTLE_ENDIAN), (5, 2, None)])
        self.assertEqual(decision.negotiated.contexts[1].reason, "presentation context ID proposed twice")
        self.assertEqual(decision.negotiated.accepted[5].abstract_syntax, VERIFICATION)

    def test_rejected_context_encodes_empty_transfer_syntax(self):
        """A rejected context goes on the wire with its result byte and an empty transfer syntax sub-item."""
        decision = self.negotiate([(7, MR_STORAGE, [IMPLICIT_VR_LITTLE_ENDIAN])])
        (item,) = decision.response.presentation_contexts
        self.assertEqual(item.encode(), bytes((0x21, 0, 0, 8, 7, 0, 3, 0, 0x40, 0, 0, 0)))


class RoleSelectionTests(unittest.TestCase):
    """SCP/SCU role selection (PS3.7 D.3.3.4)."""

    def negotiate(self, roles, policy=None):
        request = make_request(
            [(1, CT_STORAGE, [IMPLICIT_VR_LITTLE_ENDIAN]), (3, VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN])],
            role_selections=tuple(roles),
        )
        decision = negotiate_as_acceptor(request, policy or make_policy())
        self.assertIsInstance(decision, Acceptance)
        return decision

    def test_no_role_selection_means_requestor_scu(self):
        """Without a role selection item the requestor is SCU only, and no role item is answered."""
        decision = self.negotiate([])
        context = decision.negotiated.accepted[1]
        self.assertEqual((context.requestor_scu, context.requestor_scp), (True, False))
        self.assertEqual(decision.response.user_information.role_selections, ())

    def test_scu_and_scp_proposed_only_scu_accepted(self):
        """A requestor proposing SCU and SCP roles is answered SCU=1, SCP=0."""
        decision = self.negotiate([P.RoleSelection(CT_STORAGE, True, True)])
        self.assertEqual(decision.response.user_information.role_selections, (P.RoleSelection(CT_STORAGE, True, False),))
        context = decision.negotiated.accepted[1]
        self.assertEqual((context.requestor_scu, context.requestor_scp), (True, False))

    def test_scu_only_proposed(self):
        """A requestor proposing only the SCU role gets SCU=1, SCP=0 back and the context accepted."""
        decision = self.negotiate([P.RoleSelection(CT_STORAGE, True, False)])
        self.assertEqual(decision.response.user_information.role_selections, (P.RoleSelection(CT_STORAGE, True, False),))
        self.assertEqual(decision.response.presentation_contexts[0].result, 0)

    def test_scp_only_rejects_context(self):
        """A requestor proposing only the SCP role has that context rejected with result 1 (user rejection)."""
        decision = self.negotiate([P.RoleSelection(CT_STORAGE, False, True)])
        results = [(c.id, c.result) for c in decision.response.presentation_contexts]
        self.assertEqual(results, [(1, 1), (3, 0)])
        self.assertNotIn(1, decision.negotiated.accepted)

    def test_scp_role_granted_when_configured(self):
        """With the abstract syntax in scu_role_syntaxes, the requestor's SCP role is accepted."""
        policy = make_policy(scu_role_syntaxes=frozenset({CT_STORAGE}))
        decision = self.negotiate([P.RoleSelection(CT_STORAGE, False, True)], policy)
        self.assertEqual(decision.response.user_information.role_selections, (P.RoleSelection(CT_STORAGE, False, True),))
        context = decision.negotiated.accepted[1]
        self.assertEqual((context.requestor_scu, context.requestor_scp), (False, True))

    def test_role_for_unproposed_syntax_not_answered(self):
        """A role selection item for an abstract syntax not proposed in any context is not answered."""
        decision = self.negotiate([P.RoleSelection(MR_STORAGE, True, True)])
        self.assertEqual(decision.response.user_information.role_selections, ())


class UserInformationTests(unittest.TestCase):
    """The user information the AC carries."""

    def negotiate(self, **user_info):
        decision = negotiate_as_acceptor(make_request(ECHO_ONLY, **user_info), make_policy())
        self.assertIsInstance(decision, Acceptance)
        return decision

    def test_async_window_answered_when_proposed(self):
        """A proposed asynchronous operations window is answered with 1/1."""
        decision = self.negotiate(async_operations_window=P.AsyncOperationsWindow(16, 8))
        self.assertEqual(decision.response.user_information.async_operations_window, P.AsyncOperationsWindow(1, 1))
        self.assertIn(bytes((0x53, 0, 0, 4, 0, 1, 0, 1)), decision.response.encode())

    def test_async_window_absent_when_not_proposed(self):
        """Without a proposed window the AC carries no asynchronous operations window item."""
        decision = self.negotiate()
        self.assertIsNone(decision.response.user_information.async_operations_window)
        self.assertNotIn(bytes((0x53, 0, 0, 4)), decision.response.encode())

    def test_user_identity_not_answered(self):
        """A user identity request gets no user identity response, and a note for the log."""
        identity = P.UserIdentityRQ(2, True, b"alice", b"secret")
        decision = self.negotiate(user_identity_rq=identity)
        self.assertIsNone(decision.response.user_information.user_identity_ac)
        self.assertNotIn(bytes((0x59, 0)), decision.response.user_information.encode())
        self.assertEqual(
            decision.negotiated.notes, ("user identity negotiation proposed; not supported, no response sent",)
        )

    def test_no_notes_without_extras(self):
        """A plain request leaves no notes."""
        self.assertEqual(self.negotiate().negotiated.notes, ())

    def test_ac_carries_our_max_length_and_implementation(self):
        """The AC announces our maximum length, implementation class UID and version name."""
        decision = self.negotiate()
        info = decision.response.user_information
        self.assertEqual(info.maximum_length, 32768)
        self.assertEqual(info.implementation_class_uid, IMPL_UID)
        self.assertEqual(info.implementation_version_name, "APPLIANCE_0_1")
        encoded = decision.response.encode()
        self.assertIn(bytes((0x51, 0, 0, 4)) + (32768).to_bytes(4, "big"), encoded)
        self.assertIn(bytes((0x52, 0, 0, len(IMPL_UID))) + IMPL_UID.encode(), encoded)
        self.assertIn(bytes((0x55, 0, 0, 13)) + b"APPLIANCE_0_1", encoded)

    def test_ac_echoes_titles_and_records_peer(self):
        """The AC echoes both AE titles and the negotiated parameters keep the peer's limits."""
        decision = self.negotiate()
        self.assertEqual((decision.response.called_ae_title, decision.response.calling_ae_title), ("DISK_SERVER", "SCU"))
        self.assertEqual(decision.response.application_context, APPLICATION_CONTEXT)
        negotiated = decision.negotiated
        self.assertEqual(negotiated.peer_max_pdu, 16384)
        self.assertEqual(negotiated.peer_implementation_class_uid, PEER_IMPL_UID)
        self.assertEqual(negotiated.peer_implementation_version_name, "PEER_1")

    def test_peer_without_max_length_means_unlimited(self):
        """A request without a maximum length sub-item gives peer_max_pdu 0 (no limit)."""
        decision = self.negotiate(maximum_length=None)
        self.assertEqual(decision.negotiated.peer_max_pdu, 0)


class ProposeTests(unittest.TestCase):
    """propose(): the requestor's A-ASSOCIATE-RQ."""

    def test_ids_are_odd_in_order(self):
        """Contexts get IDs 1, 3, 5, ... in the order given."""
        rq = propose(
            "SCU", "DISK_SERVER",
            [(VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]), (CT_STORAGE, [EXPLICIT_VR_LITTLE_ENDIAN]), (STUDY_ROOT_FIND, [IMPLICIT_VR_LITTLE_ENDIAN])],
            16384, IMPL_UID, "V1",
        )
        self.assertEqual(
            [(c.id, c.abstract_syntax, c.transfer_syntaxes) for c in rq.presentation_contexts],
            [
                (1, VERIFICATION, (IMPLICIT_VR_LITTLE_ENDIAN,)),
                (3, CT_STORAGE, (EXPLICIT_VR_LITTLE_ENDIAN,)),
                (5, STUDY_ROOT_FIND, (IMPLICIT_VR_LITTLE_ENDIAN,)),
            ],
        )
        self.assertEqual((rq.calling_ae_title, rq.called_ae_title), ("SCU", "DISK_SERVER"))
        self.assertEqual(rq.user_information, P.UserInformation(16384, IMPL_UID, "V1"))

    def test_128_contexts_allowed(self):
        """128 contexts are allowed; the last has ID 255."""
        rq = propose("SCU", "DISK_SERVER", [(VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN])] * 128, 16384, IMPL_UID, None)
        self.assertEqual(len(rq.presentation_contexts), 128)
        self.assertEqual(rq.presentation_contexts[-1].id, 255)
        self.assertEqual(P.AssociateRQ.decode(rq.encode()).presentation_contexts[-1].id, 255)

    def test_129_contexts_refused(self):
        """129 contexts cannot be proposed (IDs would pass 255)."""
        self.assertRaises(
            ValueError, propose, "SCU", "DISK_SERVER", [(VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN])] * 129,
            16384, IMPL_UID, None,
        )

    def test_no_contexts_refused(self):
        """At least one context must be proposed."""
        self.assertRaises(ValueError, propose, "SCU", "DISK_SERVER", [], 16384, IMPL_UID, None)


class RequestorNegotiationTests(unittest.TestCase):
    """negotiate_as_requestor(): reading the peer's A-ASSOCIATE-AC."""

    def setUp(self):
        self.request = propose(
            "SCU", "DISK_SERVER",
            [
                (VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]),
                (CT_STORAGE, [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN]),
                (MR_STORAGE, [IMPLICIT_VR_LITTLE_ENDIAN]),
                (STUDY_ROOT_FIND, [IMPLICIT_VR_LITTLE_ENDIAN]),
            ],
            16384, IMPL_UID, "V1",
        )

    def test_outcomes(self):
        """Accepted, rejected, unanswered, and accepted-with-an-unproposed-syntax contexts."""
        response = P.AssociateAC(
            called_ae_title="DISK_SERVER",
            calling_ae_title="SCU",
            presentation_contexts=(
                P.PresentationContextAC(1, 0, IMPLICIT_VR_LITTLE_ENDIAN),
                P.PresentationContextAC(3, 0, EXPLICIT_VR_BIG_ENDIAN),  # never proposed for #3
                P.PresentationContextAC(5, 3),
                # #7 not answered at all
            ),
            user_information=P.UserInformation(maximum_length=65536, implementation_class_uid=PEER_IMPL_UID,
                                               implementation_version_name="PEER_1"),
        )
        negotiated = negotiate_as_requestor(self.request, response)
        self.assertEqual(
            [(c.id, c.result, c.transfer_syntax) for c in negotiated.contexts],
            [(1, 0, IMPLICIT_VR_LITTLE_ENDIAN), (3, 2, None), (5, 3, None), (7, 2, None)],
        )
        self.assertEqual(sorted(negotiated.accepted), [1])
        self.assertIn("unproposed transfer syntax", negotiated.contexts[1].reason)
        self.assertEqual(negotiated.contexts[3].reason, "not answered")
        self.assertEqual(negotiated.peer_max_pdu, 65536)
        self.assertEqual(negotiated.peer_implementation_class_uid, PEER_IMPL_UID)
        self.assertEqual(negotiated.peer_implementation_version_name, "PEER_1")
        self.assertIsNone(negotiated.context_for(CT_STORAGE))
        self.assertEqual(negotiated.context_for(VERIFICATION).id, 1)

    def test_transfer_syntax_lookup(self):
        """context_for() with a transfer syntax finds only the context accepted with it."""
        response = P.AssociateAC(
            called_ae_title="DISK_SERVER",
            calling_ae_title="SCU",
            presentation_contexts=(P.PresentationContextAC(3, 0, IMPLICIT_VR_LITTLE_ENDIAN),),
        )
        negotiated = negotiate_as_requestor(self.request, response)
        self.assertEqual(negotiated.context_for(CT_STORAGE, IMPLICIT_VR_LITTLE_ENDIAN).id, 3)
        self.assertIsNone(negotiated.context_for(CT_STORAGE, EXPLICIT_VR_LITTLE_ENDIAN))
        self.assertEqual(negotiated.peer_max_pdu, 0)

    def test_answer_for_unproposed_id_ignored(self):
        """An answer under an ID we never used is not counted as a context."""
        response = P.AssociateAC(
            called_ae_title="DISK_SERVER",
            calling_ae_title="SCU",
            presentation_contexts=(P.PresentationContextAC(1, 0, IMPLICIT_VR_LITTLE_ENDIAN),
                                   P.PresentationContextAC(9, 0, IMPLICIT_VR_LITTLE_ENDIAN)),
        )
        negotiated = negotiate_as_requestor(self.request, response)
        self.assertEqual([c.id for c in negotiated.contexts], [1, 3, 5, 7])
        self.assertEqual(sorted(negotiated.accepted), [1])


class RoleSelectionRequestorTests(unittest.TestCase):
    """propose(roles=...) and negotiate_as_requestor(): SCP/SCU role selection as a C-GET SCU (PS3.7 D.3.3.4)."""

    CONTEXTS = [
        (STUDY_ROOT_GET, [IMPLICIT_VR_LITTLE_ENDIAN]),
        (CT_STORAGE, [EXPLICIT_VR_LITTLE_ENDIAN]),
        (MR_STORAGE, [EXPLICIT_VR_LITTLE_ENDIAN]),
        (CT_STORAGE, [JPEG_BASELINE]),
    ]

    def propose(self, roles):
        return propose("MANAGER", "ARCHIVE", self.CONTEXTS, 16384, IMPL_UID, "V1", roles)

    def answer(self, request, roles):
        """An A-ASSOCIATE-AC accepting every context, with role selection items ``roles``."""
        return P.AssociateAC(
            called_ae_title="ARCHIVE",
            calling_ae_title="MANAGER",
            presentation_contexts=tuple(
                P.PresentationContextAC(c.id, 0, c.transfer_syntaxes[0]) for c in request.presentation_contexts
            ),
            user_information=P.UserInformation(maximum_length=16384, implementation_class_uid=PEER_IMPL_UID,
                                               role_selections=tuple(roles)),
        )

    def roles(self, negotiated):
        return {c.id: (c.requestor_scu, c.requestor_scp) for c in negotiated.contexts}

    def test_role_items_proposed_once_per_sop_class_in_context_order(self):
        """One role selection item per SOP class named, in the order its first context comes, through the wire."""
        request = self.propose({MR_STORAGE: (False, True), CT_STORAGE: (False, True)})
        expected = (P.RoleSelection(CT_STORAGE, False, True), P.RoleSelection(MR_STORAGE, False, True))
        self.assertEqual(request.user_information.role_selections, expected)
        self.assertEqual(P.AssociateRQ.decode(request.encode()).user_information.role_selections, expected)
        self.assertEqual(self.propose(None).user_information.role_selections, ())

    def test_role_for_a_class_not_proposed_refused(self):
        """A role for a SOP class no context proposes, or one taking neither role, is a programming error."""
        self.assertRaises(ValueError, self.propose, {STUDY_ROOT_FIND: (False, True)})
        self.assertRaises(ValueError, self.propose, {CT_STORAGE: (False, False)})

    def test_scp_role_agreed(self):
        """The peer answers SCP=1: we are SCP only on both CT contexts; context_for() never picks them to send."""
        request = self.propose({CT_STORAGE: (False, True), MR_STORAGE: (False, True)})
        negotiated = negotiate_as_requestor(request, self.answer(request, [
            P.RoleSelection(CT_STORAGE, False, True), P.RoleSelection(MR_STORAGE, False, True)]))
        self.assertEqual(self.roles(negotiated), {1: (True, False), 3: (False, True), 5: (False, True), 7: (False, True)})
        self.assertEqual(negotiated.notes, ())
        self.assertIsNone(negotiated.context_for(CT_STORAGE))
        self.assertEqual(negotiated.context_for(STUDY_ROOT_GET).id, 1)
        self.assertEqual(negotiated.contexts[1].describe(),
                         "#3 CT Image Storage accepted with Explicit VR Little Endian (we are SCP)")

    def test_scp_role_refused(self):
        """The peer answers SCP=0 for MR: the MR context is accepted but says no C-STORE can be received on it,
        and a note names the class."""
        request = self.propose({CT_STORAGE: (False, True), MR_STORAGE: (False, True)})
        negotiated = negotiate_as_requestor(request, self.answer(request, [
            P.RoleSelection(CT_STORAGE, False, True), P.RoleSelection(MR_STORAGE, False, False)]))
        mr = negotiated.contexts[2]
        self.assertTrue(mr.accepted)
        self.assertEqual((mr.requestor_scu, mr.requestor_scp), (False, False))
        self.assertIn("the peer refused our SCP role: no C-STORE sub-operation can be received on it", mr.reason)
        self.assertIn("(the peer refused our SCP role", mr.describe())
        (note,) = negotiated.notes
        self.assertEqual(note, "SCP role not agreed for 1 SOP classes (no C-STORE can be received for them): "
                               "MR Image Storage")

    def test_role_selection_not_answered_means_default_roles(self):
        """An acceptor that does not answer the items keeps the default roles: we are SCU, never SCP."""
        request = self.propose({CT_STORAGE: (False, True)})
        negotiated = negotiate_as_requestor(request, self.answer(request, []))
        self.assertEqual(self.roles(negotiated)[3], (True, False))
        self.assertIn("did not answer our role selection", negotiated.contexts[1].reason)
        self.assertEqual(negotiated.contexts[2].reason, "")  # MR: no role proposed, nothing to say
        self.assertEqual(len(negotiated.notes), 1)

    def test_peer_cannot_grant_a_role_not_proposed(self):
        """An answer of SCU=1, SCP=1 to a proposal of SCU=0, SCP=1 gives us the SCP role only."""
        request = self.propose({CT_STORAGE: (False, True)})
        negotiated = negotiate_as_requestor(request, self.answer(request, [P.RoleSelection(CT_STORAGE, True, True)]))
        self.assertEqual(self.roles(negotiated)[3], (False, True))

    def test_against_our_acceptor(self):
        """Our acceptor grants the SCP role for the classes in scu_role_syntaxes and refuses it for the others."""
        request = self.propose({CT_STORAGE: (False, True), MR_STORAGE: (False, True)})
        policy = make_policy(
            ae_title="ARCHIVE",
            abstract_syntaxes={STUDY_ROOT_GET: UNCOMPRESSED_TRANSFER_SYNTAXES,
                               CT_STORAGE: UNCOMPRESSED_TRANSFER_SYNTAXES + (JPEG_BASELINE,),
                               MR_STORAGE: UNCOMPRESSED_TRANSFER_SYNTAXES},
            scu_role_syntaxes=frozenset({CT_STORAGE}),
        )
        decision = negotiate_as_acceptor(P.AssociateRQ.decode(request.encode()), policy)
        self.assertIsInstance(decision, Acceptance)
        negotiated = negotiate_as_requestor(request, P.AssociateAC.decode(decision.response.encode()))
        # our acceptor rejects the MR context: SCP proposed alone, and it takes no SCU role for MR
        self.assertEqual([(c.id, c.result) for c in negotiated.contexts], [(1, 0), (3, 0), (5, 1), (7, 0)])
        self.assertEqual(self.roles(negotiated)[3], (False, True))
        self.assertEqual(self.roles(negotiated)[7], (False, True))


class GetProposalTests(unittest.TestCase):
    """get_proposal(): what a C-GET load proposes, within PS3.8's 128 contexts."""

    def test_contexts_and_roles(self):
        """The GET model first; image classes uncompressed then compressed; the others uncompressed; every storage
        class SCU=0, SCP=1; no more than 128 contexts, and propose() takes them."""
        contexts, roles = get_proposal()
        self.assertEqual(contexts[0], (STUDY_ROOT_GET, UNCOMPRESSED_TRANSFER_SYNTAXES))
        self.assertEqual(len(contexts), 1 + 2 * len(GET_IMAGE_STORAGE_CLASSES) + len(GET_OTHER_STORAGE_CLASSES))
        self.assertLessEqual(len(contexts), 128)
        self.assertEqual(contexts[1], (GET_IMAGE_STORAGE_CLASSES[0],
                                       (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)))
        self.assertEqual(contexts[2], (GET_IMAGE_STORAGE_CLASSES[0], GET_COMPRESSED_TRANSFER_SYNTAXES))
        storage = set(GET_IMAGE_STORAGE_CLASSES) | set(GET_OTHER_STORAGE_CLASSES)
        self.assertEqual(len(storage), len(GET_IMAGE_STORAGE_CLASSES) + len(GET_OTHER_STORAGE_CLASSES))
        self.assertEqual(roles, {uid: (False, True) for uid in storage})
        self.assertTrue(set(CONFORMANCE_STORAGE_CLASSES) <= storage, "the statement's Table 13 classes")
        request = propose("MANAGER", "ARCHIVE", contexts, 16384, IMPL_UID, None, roles)
        decoded = P.AssociateRQ.decode(request.encode())
        self.assertEqual(len(decoded.user_information.role_selections), len(storage))
        self.assertEqual(decoded.presentation_contexts[-1].id, 2 * len(contexts) - 1)

    def test_every_uid_is_a_registered_storage_class(self):
        """Every class named is a Storage SOP Class in pydicom's registry, every syntax a transfer syntax."""
        registry = set(registry_storage_classes())
        for uid in GET_IMAGE_STORAGE_CLASSES + GET_OTHER_STORAGE_CLASSES:
            self.assertIn(uid, registry)
        for uid in GET_COMPRESSED_TRANSFER_SYNTAXES:
            self.assertTrue(UID(uid).is_transfer_syntax, uid)
            self.assertTrue(UID(uid).is_compressed, uid)

    def test_too_many_refused(self):
        """Classes that would need more than 128 contexts are refused, not cut silently."""
        many = tuple(f"1.2.826.0.1.3680043.9.7777.{n}" for n in range(64))
        self.assertRaises(ValueError, get_proposal, many, ())
        self.assertEqual(len(get_proposal(many[:63], ())[0]), 127)
