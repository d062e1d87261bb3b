"""Association negotiation as pure functions (PS3.8 7.1, PS3.7 Annex D).

:func:`negotiate_as_acceptor` turns an A-ASSOCIATE-RQ and an AE's
:class:`AcceptorPolicy` into either an :class:`Acceptance` (the AC to send and
the agreed :class:`Negotiated` parameters) or a :class:`Rejection` (the RJ to
send and the reason in words, for the log).  :func:`propose` and
:func:`negotiate_as_requestor` are the requestor's side, with SCP/SCU role
selection (PS3.7 D.3.3.4) for a C-GET's storage sub-operations;
:func:`get_proposal` is what a C-GET load proposes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from . import pdu as P
from .uids import (
    APPLICATION_CONTEXT,
    DEFAULT_TRANSFER_SYNTAX_PRIORITY,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    GET_COMPRESSED_TRANSFER_SYNTAXES,
    GET_IMAGE_STORAGE_CLASSES,
    GET_OTHER_STORAGE_CLASSES,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STUDY_ROOT_GET,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    uid_name,
)

__all__ = [
    "RejectResult",
    "RejectSource",
    "AcceptorPolicy",
    "ContextOutcome",
    "Negotiated",
    "Acceptance",
    "Rejection",
    "negotiate_as_acceptor",
    "propose",
    "negotiate_as_requestor",
    "get_proposal",
    "Roles",
    "describe_rejection",
    "CONTEXT_RESULTS",
]

#: PS3.8 Table 9-21 A-ASSOCIATE-RJ reasons, keyed by (source, reason).
_RJ_REASONS = {
    (1, 1): "no-reason-given",
    (1, 2): "application-context-name-not-supported",
    (1, 3): "calling-AE-title-not-recognized",
    (1, 7): "called-AE-title-not-recognized",
    (2, 1): "no-reason-given",
    (2, 2): "protocol-version-not-supported",
    (3, 1): "temporary-congestion",
    (3, 2): "local-limit-exceeded",
}
_RJ_SOURCES = {1: "service-user", 2: "service-provider (ACSE)", 3: "service-provider (presentation)"}
_RJ_RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}

#: PS3.8 Table 9-18 presentation context results.
CONTEXT_RESULTS = {
    0: "acceptance",
    1: "user-rejection",
    2: "no-reason (provider rejection)",
    3: "abstract-syntax-not-supported (provider rejection)",
    4: "transfer-syntaxes-not-supported (provider rejection)",
}


class RejectResult:
    PERMANENT = 1
    TRANSIENT = 2


class RejectSource:
    SERVICE_USER = 1
    PROVIDER_ACSE = 2
    PROVIDER_PRESENTATION = 3


def describe_rejection(rejection: P.AssociateRJ) -> str:
    """PS3.8 words for an A-ASSOCIATE-RJ, e.g. 'rejected-permanent by service-user: called-AE-title-not-recognized'."""
    result = _RJ_RESULTS.get(rejection.result, f"result {rejection.result}")
    source = _RJ_SOURCES.get(rejection.source, f"source {rejection.source}")
    reason = _RJ_REASONS.get((rejection.source, rejection.reason), f"reason {rejection.reason}")
    return f"{result} by {source}: {reason} ({rejection.result},{rejection.source},{rejection.reason})"


@dataclass(frozen=True)
class AcceptorPolicy:
    """What one listening AE accepts.

    ``abstract_syntaxes`` maps each abstract syntax to the transfer syntaxes
    acceptable for it.  ``transfer_syntax_priority`` ranks transfer syntaxes
    when a context offers several; those not ranked come after, in the order
    proposed.  ``scu_role_syntaxes`` lists the abstract syntaxes for which
    this AE may act as SCU on an association it accepts (SCP/SCU role
    selection); none by default.
    """

    ae_title: str
    abstract_syntaxes: Mapping[str, Tuple[str, ...]]
    max_pdu: int
    implementation_class_uid: str
    implementation_version_name: Optional[str]
    transfer_syntax_priority: Tuple[str, ...] = DEFAULT_TRANSFER_SYNTAX_PRIORITY
    allowed_calling_aets: FrozenSet[str] = frozenset()
    scu_role_syntaxes: FrozenSet[str] = frozenset()
    #: SOP class UID -> function from the proposed service-class application
    #: information to our reply (None: not supported), PS3.7 D.3.3.5
    extended_negotiation: Mapping[str, Callable[[bytes], Optional[bytes]]] = field(default_factory=dict)


@dataclass(frozen=True)
class ContextOutcome:
    """The outcome of one presentation context, with a reason for the log."""

    id: int
    abstract_syntax: str
    result: int
    transfer_syntax: Optional[str] = None
    reason: str = ""
    #: roles of the *requestor* on this context
    requestor_scu: bool = True
    requestor_scp: bool = False

    @property
    def accepted(self) -> bool:
        return self.result == P.PresentationContextAC.ACCEPTANCE

    def describe(self) -> str:
        name = uid_name(self.abstract_syntax)
        if self.accepted:
            return f"#{self.id} {name} accepted with {uid_name(self.transfer_syntax or '')}" + (
                f" ({self.reason})" if self.reason else ""
            )
        return f"#{self.id} {name} rejected: {CONTEXT_RESULTS.get(self.result, self.result)}" + (
            f" ({self.reason})" if self.reason else ""
        )


@dataclass(frozen=True)
class Negotiated:
    """The agreed parameters of an established association."""

    calling_ae_title: str
    called_ae_title: str
    contexts: Tuple[ContextOutcome, ...]
    #: the longest P-DATA-TF PDU the peer takes (0: no limit)
    peer_max_pdu: int
    peer_implementation_class_uid: Optional[str] = None
    peer_implementation_version_name: Optional[str] = None
    notes: Tuple[str, ...] = ()
    #: SOP class extended negotiation as agreed: SOP class UID -> the acceptor's application information
    extended: Mapping[str, bytes] = field(default_factory=dict)

    @cached_property
    def accepted(self) -> Dict[int, ContextOutcome]:
        """Accepted contexts by ID (looked up for every PDV received)."""
        return {c.id: c for c in self.contexts if c.accepted}

    def context_for(self, abstract_syntax: str, transfer_syntax: Optional[str] = None) -> Optional[ContextOutcome]:
        """The first accepted context for ``abstract_syntax`` (and ``transfer_syntax`` if given) on which the
        requestor may send requests (its SCU role)."""
        for context in self.contexts:
            if context.accepted and context.requestor_scu and context.abstract_syntax == abstract_syntax:
                if transfer_syntax is None or context.transfer_syntax == transfer_syntax:
                    return context
        return None


@dataclass(frozen=True)
class Acceptance:
    response: P.AssociateAC
    negotiated: Negotiated


@dataclass(frozen=True)
class Rejection:
    rejection: P.AssociateRJ
    reason: str


def _choose_transfer_syntax(proposed: Sequence[str], acceptable: Iterable[str], priority: Sequence[str]) -> Optional[str]:
    acceptable_set = set(acceptable)
    candidates = [ts for ts in proposed if ts in acceptable_set]
    if not candidates:
        return None
    rank = {ts: index for index, ts in enumerate(priority)}
    return min(candidates, key=lambda ts: (rank.get(ts, len(rank)), candidates.index(ts)))


#: PS3.8 9.3.2.2: presentation context IDs are odd integers from 1 to 255.
MAX_PRESENTATION_CONTEXTS = 128
#: A requestor announcing a smaller maximum PDU length could not take our responses in sensible pieces.
MIN_PEER_PDU = 1024


def _is_ae_title(title: str) -> bool:
    """PS3.5 6.2 (AE): up to 16 characters of ISO 646 without control characters or backslash, not all spaces."""
    return bool(title.strip()) and all(" " <= char <= "~" and char != "\\" for char in title)


def negotiate_as_acceptor(
    request: P.AssociateRQ,
    policy: AcceptorPolicy,
) -> Union[Acceptance, Rejection]:
    """Decide on an A-ASSOCIATE-RQ as the AE ``policy`` describes."""
    if request.application_context != APPLICATION_CONTEXT:
        return Rejection(
            P.AssociateRJ(1, 1, 2),
            f"application context {request.application_context!r} is not the DICOM application context",
        )
    if request.called_ae_title != policy.ae_title:
        return Rejection(
            P.AssociateRJ(1, 1, 7),
            f"called AE title {request.called_ae_title!r} is not this AE's ({policy.ae_title!r})",
        )
    if not _is_ae_title(request.calling_ae_title):
        return Rejection(
            P.AssociateRJ(1, 1, 3),
            "calling AE title holds control characters or a backslash, or is blank (PS3.5 6.2)",
        )
    if len(request.presentation_contexts) > MAX_PRESENTATION_CONTEXTS:
        return Rejection(
            P.AssociateRJ(1, 2, 1),
            f"{len(request.presentation_contexts)} presentation contexts proposed; at most "
            f"{MAX_PRESENTATION_CONTEXTS} can exist (odd IDs 1 to 255, PS3.8 9.3.2.2)",
        )
    peer_max = request.user_information.maximum_length
    if peer_max and peer_max < MIN_PEER_PDU:
        return Rejection(
            P.AssociateRJ(1, 1, 1),
            f"the requestor's maximum PDU length {peer_max} is below {MIN_PEER_PDU}: too small for DIMSE messages",
        )
    if policy.allowed_calling_aets and request.calling_ae_title not in policy.allowed_calling_aets:
        return Rejection(
            P.AssociateRJ(1, 1, 3),
            f"calling AE title {request.calling_ae_title!r} is not in allowed_calling_aets",
        )

    user_info = request.user_information
    proposed_roles = {role.sop_class_uid: role for role in user_info.role_selections}
    outcomes: List[ContextOutcome] = []
    seen_ids = set()
    for context in request.presentation_contexts:
        outcomes.append(_negotiate_context(context, policy, proposed_roles, seen_ids))
        seen_ids.add(context.id)

    proposed_syntaxes = {c.abstract_syntax for c in request.presentation_contexts}
    role_replies = tuple(
        P.RoleSelection(uid, role.scu_role, role.scp_role and uid in policy.scu_role_syntaxes)
        for uid, role in proposed_roles.items()
        if uid in proposed_syntaxes
    )
    notes: List[str] = []
    if user_info.user_identity_rq is not None:
        notes.append("user identity negotiation proposed; not supported, no response sent")
    extended_replies: List[P.SOPClassExtended] = []
    for item in user_info.sop_class_extended:
        handler = policy.extended_negotiation.get(item.sop_class_uid)
        reply = handler(item.application_information) if handler and item.sop_class_uid in proposed_syntaxes else None
        if reply is None:
            notes.append(f"SOP class extended negotiation for {uid_name(item.sop_class_uid)} proposed; not supported")
        else:
            extended_replies.append(P.SOPClassExtended(item.sop_class_uid, reply))
    if user_info.sop_class_common_extended:
        notes.append("SOP class common extended negotiation proposed; not supported")
    response_info = P.UserInformation(
        maximum_length=policy.max_pdu,
        implementation_class_uid=policy.implementation_class_uid,
        implementation_version_name=policy.implementation_version_name,
        # one outstanding operation each way (statement 3.x.1.3)
        async_operations_window=P.AsyncOperationsWindow(1, 1) if user_info.async_operations_window else None,
        role_selections=role_replies,
        sop_class_extended=tuple(extended_replies),
    )
    response = P.AssociateAC(
        called_ae_title=request.called_ae_title,
        calling_ae_title=request.calling_ae_title,
        application_context=APPLICATION_CONTEXT,
        presentation_contexts=tuple(
            P.PresentationContextAC(o.id, o.result, o.transfer_syntax) for o in outcomes
        ),
        user_information=response_info,
    )
    negotiated = Negotiated(
        calling_ae_title=request.calling_ae_title,
        called_ae_title=request.called_ae_title,
        contexts=tuple(outcomes),
        peer_max_pdu=user_info.maximum_length or 0,
        peer_implementation_class_uid=user_info.implementation_class_uid,
        peer_implementation_version_name=user_info.implementation_version_name,
        notes=tuple(notes),
        extended={item.sop_class_uid: item.application_information for item in extended_replies},
    )
    return Acceptance(response, negotiated)


def _negotiate_context(
    context: P.PresentationContextRQ,
    policy: AcceptorPolicy,
    proposed_roles: Mapping[str, P.RoleSelection],
    seen_ids: set,
) -> ContextOutcome:
    def reject(result: int, reason: str) -> ContextOutcome:
        return ContextOutcome(context.id, context.abstract_syntax, result, None, reason)

    if context.id % 2 == 0:
        return reject(P.PresentationContextAC.NO_REASON, "presentation context ID is not odd")
    if context.id in seen_ids:
        return reject(P.PresentationContextAC.NO_REASON, "presentation context ID proposed twice")
    acceptable = policy.abstract_syntaxes.get(context.abstract_syntax)
    if acceptable is None:
        return reject(P.PresentationContextAC.ABSTRACT_SYNTAX_NOT_SUPPORTED, "not supported by this AE")
    chosen = _choose_transfer_syntax(context.transfer_syntaxes, acceptable, policy.transfer_syntax_priority)
    if chosen is None:
        offered = ", ".join(uid_name(ts) for ts in context.transfer_syntaxes) or "none"
        return reject(P.PresentationContextAC.TRANSFER_SYNTAXES_NOT_SUPPORTED, f"offered: {offered}")
    requestor_scu, requestor_scp = True, False
    role = proposed_roles.get(context.abstract_syntax)
    if role is not None:
        requestor_scu = role.scu_role
        requestor_scp = role.scp_role and context.abstract_syntax in policy.scu_role_syntaxes
        if not requestor_scu and not requestor_scp:
            return reject(
                P.PresentationContextAC.USER_REJECTION,
                "requestor proposed only the SCP role, which this AE does not take as SCU",
            )
    return ContextOutcome(
        context.id, context.abstract_syntax, P.PresentationContextAC.ACCEPTANCE, chosen, "", requestor_scu, requestor_scp
    )


#: SOP class UID -> (SCU role, SCP role) the requestor proposes for itself (PS3.7 D.3.3.4).
Roles = Mapping[str, Tuple[bool, bool]]


def propose(
    calling_ae_title: str,
    called_ae_title: str,
    contexts: Sequence[Tuple[str, Sequence[str]]],
    max_pdu: int,
    implementation_class_uid: str,
    implementation_version_name: Optional[str],
    roles: Optional[Roles] = None,
) -> P.AssociateRQ:
    """An A-ASSOCIATE-RQ proposing ``(abstract syntax, transfer syntaxes)`` pairs as contexts 1, 3, 5...

    ``roles`` proposes SCP/SCU role selection: for each SOP class, whether we
    take the SCU role and the SCP role on its contexts (a C-GET SCU proposes
    ``(False, True)`` for the storage classes it is to receive, PS3.4 C.4.3).
    Each must name an abstract syntax proposed, with at least one role.
    """
    if not 0 < len(contexts) <= 128:
        raise ValueError(f"between 1 and 128 presentation contexts may be proposed, not {len(contexts)}")
    role_items: List[P.RoleSelection] = []
    if roles:
        proposed = list(dict.fromkeys(abstract for abstract, _ in contexts))
        unknown = [uid for uid in roles if uid not in proposed]
        if unknown:
            raise ValueError(f"role selection for {', '.join(unknown)}, proposed in no presentation context")
        for uid in proposed:
            if uid not in roles:
                continue
            scu, scp = roles[uid]
            if not scu and not scp:
                raise ValueError(f"role selection for {uid} takes neither the SCU nor the SCP role")
            role_items.append(P.RoleSelection(uid, bool(scu), bool(scp)))
    return P.AssociateRQ(
        called_ae_title=called_ae_title,
        calling_ae_title=calling_ae_title,
        presentation_contexts=tuple(
            P.PresentationContextRQ(2 * index + 1, abstract, tuple(transfers))
            for index, (abstract, transfers) in enumerate(contexts)
        ),
        user_information=P.UserInformation(
            maximum_length=max_pdu,
            implementation_class_uid=implementation_class_uid,
            implementation_version_name=implementation_version_name,
            role_selections=tuple(role_items),
        ),
    )


def get_proposal(
    image_classes: Sequence[str] = GET_IMAGE_STORAGE_CLASSES,
    other_classes: Sequence[str] = GET_OTHER_STORAGE_CLASSES,
    query_model: str = STUDY_ROOT_GET,
) -> Tuple[Tuple[Tuple[str, Tuple[str, ...]], ...], Dict[str, Tuple[bool, bool]]]:
    """``(contexts, roles)`` for :func:`propose` on an association that loads by C-GET.

    The query/retrieve model first (uncompressed syntaxes, default roles:
    we are its SCU); then each image class twice, uncompressed (explicit VR
    little endian first) and compressed (:data:`GET_COMPRESSED_TRANSFER_SYNTAXES`,
    for an archive that keeps it compressed and would otherwise decompress
    it), and each other class uncompressed; every storage class with role
    selection SCU=0, SCP=1: the peer stores into us on this association.
    """
    uncompressed = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)
    contexts: List[Tuple[str, Tuple[str, ...]]] = [(query_model, tuple(UNCOMPRESSED_TRANSFER_SYNTAXES))]
    for uid in image_classes:
        contexts.append((uid, uncompressed))
        contexts.append((uid, GET_COMPRESSED_TRANSFER_SYNTAXES))
    contexts.extend((uid, uncompressed) for uid in other_classes)
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts for a C-GET load; at most "
                         f"{MAX_PRESENTATION_CONTEXTS} can be proposed (PS3.8 9.3.2.2)")
    roles = {uid: (False, True) for uid in dict.fromkeys(tuple(image_classes) + tuple(other_classes))}
    return tuple(contexts), roles


def negotiate_as_requestor(request: P.AssociateRQ, response: P.AssociateAC) -> Negotiated:
    """The agreed parameters from our A-ASSOCIATE-RQ and the peer's A-ASSOCIATE-AC.

    A context the peer accepted with a transfer syntax we did not propose, or
    under an ID we did not use, is counted as rejected.

    Roles (PS3.7 D.3.3.4): without a role selection item of ours for its SOP
    class, we are SCU on an accepted context.  With one, the peer's answer
    decides: a role is ours when we proposed it and the peer answered 1; no
    answer at all means the default roles (SCU only).  An accepted context on
    which we proposed the SCP role and did not get it carries the reason
    (no C-STORE sub-operation can be received on it), and a note says which
    SOP classes.
    """
    proposed = {c.id: c for c in request.presentation_contexts}
    answered = {c.id: c for c in response.presentation_contexts}
    proposed_roles = {role.sop_class_uid: role for role in request.user_information.role_selections}
    answered_roles = {role.sop_class_uid: role for role in response.user_information.role_selections}
    outcomes: List[ContextOutcome] = []
    for context_id, context in proposed.items():
        answer = answered.get(context_id)
        if answer is None:
            outcomes.append(ContextOutcome(context_id, context.abstract_syntax, P.PresentationContextAC.NO_REASON, None, "not answered"))
        elif answer.result != P.PresentationContextAC.ACCEPTANCE:
            outcomes.append(ContextOutcome(context_id, context.abstract_syntax, answer.result))
        elif answer.transfer_syntax not in context.transfer_syntaxes:
            outcomes.append(
                ContextOutcome(
                    context_id, context.abstract_syntax, P.PresentationContextAC.NO_REASON, None,
                    f"peer accepted unproposed transfer syntax {answer.transfer_syntax}",
                )
            )
        else:
            scu, scp, reason = _requestor_roles(proposed_roles.get(context.abstract_syntax),
                                                answered_roles.get(context.abstract_syntax))
            outcomes.append(ContextOutcome(context_id, context.abstract_syntax, 0, answer.transfer_syntax,
                                           reason, scu, scp))
    refused = list(dict.fromkeys(
        o.abstract_syntax for o in outcomes
        if o.accepted and not o.requestor_scp and getattr(proposed_roles.get(o.abstract_syntax), "scp_role", False)
    ))
    notes: List[str] = []
    if refused:
        shown = ", ".join(uid_name(uid) for uid in refused[:8])
        if len(refused) > 8:
            shown += f" and {len(refused) - 8} more"
        notes.append(f"SCP role not agreed for {len(refused)} SOP classes (no C-STORE can be received for them): "
                     f"{shown}")
    info = response.user_information
    return Negotiated(
        calling_ae_title=request.calling_ae_title,
        called_ae_title=request.called_ae_title,
        contexts=tuple(outcomes),
        peer_max_pdu=info.maximum_length or 0,
        peer_implementation_class_uid=info.implementation_class_uid,
        peer_implementation_version_name=info.implementation_version_name,
        notes=tuple(notes),
        extended={item.sop_class_uid: item.application_information for item in info.sop_class_extended},
    )


def _requestor_roles(proposal: Optional[P.RoleSelection],
                     answer: Optional[P.RoleSelection]) -> Tuple[bool, bool, str]:
    """(our SCU role, our SCP role, reason) on an accepted context, from our role proposal and the peer's answer."""
    if proposal is None:
        return True, False, ""
    if answer is None:
        # PS3.7 D.3.3.4: an acceptor that does not answer the item keeps the default roles
        scu, scp, why = True, False, "the peer did not answer our role selection: default roles, we are SCU only"
    else:
        scu, scp = proposal.scu_role and answer.scu_role, proposal.scp_role and answer.scp_role
        why = "the peer refused our SCP role"
    if proposal.scp_role and not scp:
        return scu, scp, f"{why}: no C-STORE sub-operation can be received on it"
    if not scu and not scp:
        return scu, scp, "the peer refused our SCU role, and we proposed no other: unusable"
    return scu, scp, "we are SCP" if scp and not scu else ("we are SCU and SCP" if scp else "")
