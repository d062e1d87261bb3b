"""Golden DICOM Upper Layer PDUs, written by hand from PS3.8 section 9.3 and
PS3.7 Annex D, each paired with the value object it decodes to.

Every line of bytes carries a comment saying which field it is.  Lengths are
big-endian.  Item headers are: type (1 byte), reserved (1 byte), length
(2 bytes).  PDU headers are: type (1 byte), reserved (1 byte), length (4 bytes).

``CANONICAL`` PDUs are exactly what :mod:`appliance.dicom.pdu` encodes, so they
must decode to their value and the value must encode back to them.
``TOLERATED`` PDUs are legal but non-canonical (padding, non-zero reserved
fields, unknown items, a rejected context without a transfer syntax sub-item):
they must decode to their value, but are not what the encoder produces.
"""

from appliance.dicom.pdu import (
    Abort,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    AsyncOperationsWindow,
    PDataTF,
    PDV,
    PresentationContextAC,
    PresentationContextRQ,
    ReleaseRP,
    ReleaseRQ,
    RoleSelection,
    SOPClassCommonExtended,
    SOPClassExtended,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # 21 characters
VERIFICATION = "1.2.840.10008.1.1"  # 17 characters
IMPLICIT_VR_LE = "1.2.840.10008.1.2"  # 17 characters
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"  # 19 characters
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"  # 25 characters
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"  # 27 characters
STORAGE_SERVICE_CLASS = "1.2.840.10008.4.2"  # 17 characters


# ---------------------------------------------------------------------------
# A-ASSOCIATE-RQ with every item and every requestor sub-item (PS3.8 9.3.2)

ASSOCIATE_RQ = (
    b"\x01"  # PDU type: A-ASSOCIATE-RQ
    b"\x00"  # reserved
    b"\x00\x00\x01\xb9"  # PDU length: 441 = 68 fixed + 25 + 73 + 58 + 217
    b"\x00\x01"  # protocol version: bit 0 set
    b"\x00\x00"  # reserved
    b"ANY-SCP         "  # called AE title, space padded to 16
    b"ECHOSCU         "  # calling AE title, space padded to 16
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # reserved, bytes 43-58
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # reserved, bytes 59-74
    # application context item: 4 + 21 = 25 bytes
    b"\x10\x00\x00\x15"  # item 0x10 application context, length 21
    b"1.2.840.10008.3.1.1.1"  # DICOM application context name
    # presentation context item, ID 1: 4 + 69 = 73 bytes
    b"\x20\x00\x00\x45"  # item 0x20 presentation context (RQ), length 69 = 4 + 21 + 21 + 23
    b"\x01"  # presentation context ID 1
    b"\x00\x00\x00"  # reserved
    b"\x30\x00\x00\x11"  # sub-item 0x30 abstract syntax, length 17
    b"1.2.840.10008.1.1"  # Verification SOP Class
    b"\x40\x00\x00\x11"  # sub-item 0x40 transfer syntax, length 17
    b"1.2.840.10008.1.2"  # Implicit VR Little Endian
    b"\x40\x00\x00\x13"  # sub-item 0x40 transfer syntax, length 19
    b"1.2.840.10008.1.2.1"  # Explicit VR Little Endian
    # presentation context item, ID 3: 4 + 54 = 58 bytes
    b"\x20\x00\x00\x36"  # item 0x20 presentation context (RQ), length 54 = 4 + 29 + 21
    b"\x03"  # presentation context ID 3
    b"\x00\x00\x00"  # reserved
    b"\x30\x00\x00\x19"  # sub-item 0x30 abstract syntax, length 25
    b"1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    b"\x40\x00\x00\x11"  # sub-item 0x40 transfer syntax, length 17
    b"1.2.840.10008.1.2"  # Implicit VR Little Endian
    # user information item: 4 + 213 = 217 bytes
    b"\x50\x00\x00\xd5"  # item 0x50 user information, length 213 = 8+13+8+33+15+34+81+21
    b"\x51\x00\x00\x04"  # sub-item 0x51 maximum length, length 4
    b"\x00\x00\x40\x00"  # maximum length received: 16384
    b"\x52\x00\x00\x09"  # sub-item 0x52 implementation class UID, length 9
    b"1.2.3.4.5"  # implementation class UID (odd length, not padded)
    b"\x53\x00\x00\x04"  # sub-item 0x53 asynchronous operations window, length 4
    b"\x00\x05"  # maximum number of operations invoked: 5
    b"\x00\x03"  # maximum number of operations performed: 3
    b"\x54\x00\x00\x1d"  # sub-item 0x54 SCP/SCU role selection, length 29 = 2 + 25 + 2
    b"\x00\x19"  # SOP class UID length 25
    b"1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    b"\x00"  # SCU role: 0, not proposed
    b"\x01"  # SCP role: 1, proposed
    b"\x55\x00\x00\x0b"  # sub-item 0x55 implementation version name, length 11
    b"APPLIANCE_1"  # implementation version name
    b"\x56\x00\x00\x1e"  # sub-item 0x56 SOP class extended negotiation, length 30 = 2 + 25 + 3
    b"\x00\x19"  # SOP class UID length 25
    b"1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    b"\x01\x00\x01"  # service class application information
    b"\x57\x00\x00\x4d"  # sub-item 0x57 common extended negotiation (version 0), length 77 = 27+19+31
    b"\x00\x19"  # SOP class UID length 25
    b"1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    b"\x00\x11"  # service class UID length 17
    b"1.2.840.10008.4.2"  # Storage Service Class
    b"\x00\x1d"  # related general SOP class identification length 29 = 2 + 27
    b"\x00\x1b"  # related general SOP class UID length 27
    b"1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    b"\x58\x00\x00\x11"  # sub-item 0x58 user identity (RQ), length 17 = 2 + 7 + 8
    b"\x02"  # user identity type 2: username and passcode
    b"\x01"  # positive response requested
    b"\x00\x05"  # primary field length 5
    b"alice"  # primary field: username
    b"\x00\x06"  # secondary field length 6
    b"s3cret"  # secondary field: passcode
)

ASSOCIATE_RQ_VALUE = AssociateRQ(
    called_ae_title="ANY-SCP",
    calling_ae_title="ECHOSCU",
    application_context=APPLICATION_CONTEXT,
    user_information=UserInformation(
        maximum_length=16384,
        implementation_class_uid="1.2.3.4.5",
        implementation_version_name="APPLIANCE_1",
        async_operations_window=AsyncOperationsWindow(invoked=5, performed=3),
        role_selections=(RoleSelection(CT_IMAGE_STORAGE, scu_role=False, scp_role=True),),
        sop_class_extended=(SOPClassExtended(CT_IMAGE_STORAGE, b"\x01\x00\x01"),),
        sop_class_common_extended=(
            SOPClassCommonExtended(CT_IMAGE_STORAGE, STORAGE_SERVICE_CLASS, (ENHANCED_CT_IMAGE_STORAGE,)),
        ),
        user_identity_rq=UserIdentityRQ(2, True, b"alice", b"s3cret"),
    ),
    protocol_version=1,
    presentation_contexts=(
        PresentationContextRQ(1, VERIFICATION, (IMPLICIT_VR_LE, EXPLICIT_VR_LE)),
        PresentationContextRQ(3, CT_IMAGE_STORAGE, (IMPLICIT_VR_LE,)),
    ),
)


# ---------------------------------------------------------------------------
# A-ASSOCIATE-RQ with no presentation context and an empty user information item

ASSOCIATE_RQ_MINIMAL = (
    b"\x01"  # PDU type: A-ASSOCIATE-RQ
    b"\x00"  # reserved
    b"\x00\x00\x00\x61"  # PDU length: 97 = 68 fixed + 25 + 4
    b"\x00\x01"  # protocol version: bit 0 set
    b"\x00\x00"  # reserved
    b"SCP             "  # called AE title, space padded to 16
    b"SCU             "  # calling AE title, space padded to 16
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # reserved, bytes 43-58
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # reserved, bytes 59-74
    b"\x10\x00\x00\x15"  # item 0x10 application context, length 21
    b"1.2.840.10008.3.1.1.1"  # DICOM application context name
    b"\x50\x00\x00\x00"  # item 0x50 user information, length 0: no sub-item
)

ASSOCIATE_RQ_MINIMAL_VALUE = AssociateRQ(called_ae_title="SCP", calling_ae_title="SCU")


# ---------------------------------------------------------------------------
# A-ASSOCIATE-AC with every acceptor sub-item (PS3.8 9.3.3)

ASSOCIATE_AC = (
    b"\x02"  # PDU type: A-ASSOCIATE-AC
    b"\x00"  # reserved
    b"\x00\x00\x01\x08"  # PDU length: 264 = 68 fixed + 25 + 31 + 12 + 128
    b"\x00\x01"  # protocol version: bit 0 set
    b"\x00\x00"  # reserved
    b"ANY-SCP         "  # called AE title echoed, space padded to 16
    b"ECHOSCU         "  # calling AE title echoed, space padded to 16
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # reserved, bytes 43-58
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # reserved, bytes 59-74
    # application context item: 25 bytes
    b"\x10\x00\x00\x15"  # item 0x10 application context, length 21
    b"1.2.840.10008.3.1.1.1"  # DICOM application context name
    # presentation context item, ID 1, accepted: 4 + 27 = 31 bytes
    b"\x21\x00\x00\x1b"  # item 0x21 presentation context (AC), length 27 = 4 + 23
    b"\x01"  # presentation context ID 1
    b"\x00"  # reserved
    b"\x00"  # result: 0 acceptance
    b"\x00"  # reserved
    b"\x40\x00\x00\x13"  # sub-item 0x40 transfer syntax, length 19
    b"1.2.840.10008.1.2.1"  # Explicit VR Little Endian
    # presentation context item, ID 3, rejected: 4 + 8 = 12 bytes
    b"\x21\x00\x00\x08"  # item 0x21 presentation context (AC), length 8 = 4 + 4
    b"\x03"  # presentation context ID 3
    b"\x00"  # reserved
    b"\x03"  # result: 3 abstract-syntax-not-supported (provider rejection)
    b"\x00"  # reserved
    b"\x40\x00\x00\x00"  # sub-item 0x40 transfer syntax, length 0 (not significant when rejected)
    # user information item: 4 + 124 = 128 bytes
    b"\x50\x00\x00\x7c"  # item 0x50 user information, length 124 = 8+15+8+33+15+34+11
    b"\x51\x00\x00\x04"  # sub-item 0x51 maximum length, length 4
    b"\x00\x00\x80\x00"  # maximum length received: 32768
    b"\x52\x00\x00\x0b"  # sub-item 0x52 implementation class UID, length 11
    b"1.2.3.4.5.6"  # implementation class UID
    b"\x53\x00\x00\x04"  # sub-item 0x53 asynchronous operations window, length 4
    b"\x00\x01"  # maximum number of operations invoked: 1
    b"\x00\x01"  # maximum number of operations performed: 1
    b"\x54\x00\x00\x1d"  # sub-item 0x54 SCP/SCU role selection, length 29 = 2 + 25 + 2
    b"\x00\x19"  # SOP class UID length 25
    b"1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    b"\x00"  # SCU role: 0, rejected
    b"\x01"  # SCP role: 1, accepted
    b"\x55\x00\x00\x0b"  # sub-item 0x55 implementation version name, length 11
    b"APPLIANCE_2"  # implementation version name
    b"\x56\x00\x00\x1e"  # sub-item 0x56 SOP class extended negotiation, length 30 = 2 + 25 + 3
    b"\x00\x19"  # SOP class UID length 25
    b"1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    b"\x01\x00\x00"  # service class application information
    b"\x59\x00\x00\x07"  # sub-item 0x59 user identity (AC), length 7 = 2 + 5
    b"\x00\x05"  # server response length 5
    b"token"  # server response
)

ASSOCIATE_AC_VALUE = AssociateAC(
    called_ae_title="ANY-SCP",
    calling_ae_title="ECHOSCU",
    application_context=APPLICATION_CONTEXT,
    user_information=UserInformation(
        maximum_length=32768,
        implementation_class_uid="1.2.3.4.5.6",
        implementation_version_name="APPLIANCE_2",
        async_operations_window=AsyncOperationsWindow(invoked=1, performed=1),
        role_selections=(RoleSelection(CT_IMAGE_STORAGE, scu_role=False, scp_role=True),),
        sop_class_extended=(SOPClassExtended(CT_IMAGE_STORAGE, b"\x01\x00\x00"),),
        user_identity_ac=UserIdentityAC(b"token"),
    ),
    protocol_version=1,
    presentation_contexts=(
        PresentationContextAC(1, PresentationContextAC.ACCEPTANCE, EXPLICIT_VR_LE),
        PresentationContextAC(3, PresentationContextAC.ABSTRACT_SYNTAX_NOT_SUPPORTED, None),
    ),
)


# ---------------------------------------------------------------------------
# A-ASSOCIATE-RJ (PS3.8 9.3.4)

ASSOCIATE_RJ = (
    b"\x03"  # PDU type: A-ASSOCIATE-RJ
    b"\x00"  # reserved
    b"\x00\x00\x00\x04"  # PDU length: 4
    b"\x00"  # reserved
    b"\x02"  # result: 2 rejected-transient
    b"\x03"  # source: 3 service-provider (presentation related function)
    b"\x01"  # reason/diag: 1 temporary-congestion
)

ASSOCIATE_RJ_VALUE = AssociateRJ(result=2, source=3, reason=1)


# ---------------------------------------------------------------------------
# P-DATA-TF with four PDVs, one per message control header combination (PS3.8 9.3.5, E.2)

P_DATA_TF = (
    b"\x04"  # PDU type: P-DATA-TF
    b"\x00"  # reserved
    b"\x00\x00\x00\x23"  # PDU length: 35 = 12 + 10 + 6 + 7
    b"\x00\x00\x00\x08"  # PDV item length 8 = 2 + 6
    b"\x01"  # presentation context ID 1
    b"\x03"  # message control header: command, last fragment
    b"\x00\x00\x02\x00\x00\x00"  # PDV data, 6 bytes
    b"\x00\x00\x00\x06"  # PDV item length 6 = 2 + 4
    b"\x03"  # presentation context ID 3
    b"\x00"  # message control header: data set, not last fragment
    b"\xde\xad\xbe\xef"  # PDV data, 4 bytes
    b"\x00\x00\x00\x02"  # PDV item length 2: header only
    b"\x05"  # presentation context ID 5
    b"\x02"  # message control header: data set, last fragment
    b"\x00\x00\x00\x03"  # PDV item length 3 = 2 + 1
    b"\x07"  # presentation context ID 7
    b"\x01"  # message control header: command, not last fragment
    b"\xaa"  # PDV data, 1 byte
)

P_DATA_TF_VALUE = PDataTF(
    (
        PDV(context_id=1, is_command=True, is_last=True, data=b"\x00\x00\x02\x00\x00\x00"),
        PDV(context_id=3, is_command=False, is_last=False, data=b"\xde\xad\xbe\xef"),
        PDV(context_id=5, is_command=False, is_last=True, data=b""),
        PDV(context_id=7, is_command=True, is_last=False, data=b"\xaa"),
    )
)


# ---------------------------------------------------------------------------
# A-RELEASE-RQ, A-RELEASE-RP, A-ABORT (PS3.8 9.3.6, 9.3.7, 9.3.8)

RELEASE_RQ = (
    b"\x05"  # PDU type: A-RELEASE-RQ
    b"\x00"  # reserved
    b"\x00\x00\x00\x04"  # PDU length: 4
    b"\x00\x00\x00\x00"  # reserved
)

RELEASE_RP = (
    b"\x06"  # PDU type: A-RELEASE-RP
    b"\x00"  # reserved
    b"\x00\x00\x00\x04"  # PDU length: 4
    b"\x00\x00\x00\x00"  # reserved
)

ABORT = (
    b"\x07"  # PDU type: A-ABORT
    b"\x00"  # reserved
    b"\x00\x00\x00\x04"  # PDU length: 4
    b"\x00"  # reserved
    b"\x00"  # reserved
    b"\x02"  # source: 2 service-provider
    b"\x06"  # reason/diag: 6 invalid-PDU-parameter value
)

ABORT_VALUE = Abort(source=2, reason=6)

ABORT_BY_USER = (
    b"\x07"  # PDU type: A-ABORT
    b"\x00"  # reserved
    b"\x00\x00\x00\x04"  # PDU length: 4
    b"\x00"  # reserved
    b"\x00"  # reserved
    b"\x00"  # source: 0 service-user
    b"\x00"  # reason/diag: 0 (not significant for a user abort)
)


#: (name, golden bytes, decoded value): decode and encode are exact inverses.
CANONICAL = (
    ("A-ASSOCIATE-RQ", ASSOCIATE_RQ, ASSOCIATE_RQ_VALUE),
    ("A-ASSOCIATE-RQ minimal", ASSOCIATE_RQ_MINIMAL, ASSOCIATE_RQ_MINIMAL_VALUE),
    ("A-ASSOCIATE-AC", ASSOCIATE_AC, ASSOCIATE_AC_VALUE),
    ("A-ASSOCIATE-RJ", ASSOCIATE_RJ, ASSOCIATE_RJ_VALUE),
    ("P-DATA-TF", P_DATA_TF, P_DATA_TF_VALUE),
    ("A-RELEASE-RQ", RELEASE_RQ, ReleaseRQ()),
    ("A-RELEASE-RP", RELEASE_RP, ReleaseRP()),
    ("A-ABORT", ABORT, ABORT_VALUE),
    ("A-ABORT by user", ABORT_BY_USER, Abort()),
)


# ---------------------------------------------------------------------------
# Tolerated, non-canonical input


ASSOCIATE_RQ_TOLERATED = (
    b"\x01"  # PDU type: A-ASSOCIATE-RQ
    b"\xff"  # reserved, non-zero: not tested
    b"\x00\x00\x00\xc4"  # PDU length: 196 = 68 fixed + 7 + 26 + 58 + 33 + 4
    b"\x00\x01"  # protocol version: bit 0 set
    b"\xff\xff"  # reserved, non-zero: not tested
    b"  ANY-SCP       "  # called AE title: leading spaces are not significant
    b"ECHOSCU         "  # calling AE title, space padded to 16
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"  # reserved, non-zero, bytes 43-58
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"  # reserved, non-zero, bytes 59-74
    # unknown item: 4 + 3 = 7 bytes, skipped
    b"\x7f\x00\x00\x03"  # item 0x7F (not defined), length 3
    b"\x01\x02\x03"  # its content
    # application context item, NUL padded: 4 + 22 = 26 bytes
    b"\x10\x00\x00\x16"  # item 0x10 application context, length 22
    b"1.2.840.10008.3.1.1.1\x00"  # DICOM application context name + NUL pad
    # presentation context item, ID 1: 4 + 54 = 58 bytes
    b"\x20\x00\x00\x36"  # item 0x20 presentation context (RQ), length 54 = 4 + 22 + 6 + 22
    b"\x01"  # presentation context ID 1
    b"\xff\xff\xff"  # reserved, non-zero: not tested
    b"\x30\x00\x00\x12"  # sub-item 0x30 abstract syntax, length 18
    b"1.2.840.10008.1.1\x00"  # Verification SOP Class + NUL pad
    b"\x3f\x00\x00\x02"  # sub-item 0x3F (not defined), length 2: skipped
    b"\xab\xcd"  # its content
    b"\x40\x00\x00\x12"  # sub-item 0x40 transfer syntax, length 18
    b"1.2.840.10008.1.2 "  # Implicit VR Little Endian + space pad
    # user information item: 4 + 29 = 33 bytes
    b"\x50\x00\x00\x1d"  # item 0x50 user information, length 29 = 8 + 7 + 14
    b"\x51\x00\x00\x04"  # sub-item 0x51 maximum length, length 4
    b"\x00\x00\x40\x00"  # maximum length received: 16384
    b"\x5f\x00\x00\x03"  # sub-item 0x5F (not defined), length 3: skipped
    b"ABC"  # its content
    b"\x52\x00\x00\x0a"  # sub-item 0x52 implementation class UID, length 10
    b"1.2.3.4.5\x00"  # implementation class UID + NUL pad
    # unknown item after the user information: 4 bytes, skipped
    b"\xf0\x00\x00\x00"  # item 0xF0 (not defined), length 0
)

ASSOCIATE_RQ_TOLERATED_VALUE = AssociateRQ(
    called_ae_title="ANY-SCP",
    calling_ae_title="ECHOSCU",
    application_context=APPLICATION_CONTEXT,
    user_information=UserInformation(maximum_length=16384, implementation_class_uid="1.2.3.4.5"),
    protocol_version=1,
    presentation_contexts=(PresentationContextRQ(1, VERIFICATION, (IMPLICIT_VR_LE,)),),
)


ASSOCIATE_AC_TOLERATED = (
    b"\x02"  # PDU type: A-ASSOCIATE-AC
    b"\x00"  # reserved
    b"\x00\x00\x00\xae"  # PDU length: 174 = 68 fixed + 25 + 32 + 8 + 29 + 12
    b"\x00\x01"  # protocol version: bit 0 set
    b"\x00\x00"  # reserved
    b"ANY-SCP         "  # called AE title echoed, space padded to 16
    b"ECHOSCU         "  # calling AE title echoed, space padded to 16
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # reserved, bytes 43-58
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # reserved, bytes 59-74
    b"\x10\x00\x00\x15"  # item 0x10 application context, length 21
    b"1.2.840.10008.3.1.1.1"  # DICOM application context name
    # presentation context ID 1, accepted, transfer syntax NUL padded: 4 + 28 = 32 bytes
    b"\x21\x00\x00\x1c"  # item 0x21 presentation context (AC), length 28 = 4 + 24
    b"\x01"  # presentation context ID 1
    b"\x00"  # reserved
    b"\x00"  # result: 0 acceptance
    b"\x00"  # reserved
    b"\x40\x00\x00\x14"  # sub-item 0x40 transfer syntax, length 20
    b"1.2.840.10008.1.2.1\x00"  # Explicit VR Little Endian + NUL pad
    # presentation context ID 3, rejected, no transfer syntax sub-item at all: 8 bytes
    b"\x21\x00\x00\x04"  # item 0x21 presentation context (AC), length 4
    b"\x03"  # presentation context ID 3
    b"\x00"  # reserved
    b"\x02"  # result: 2 no-reason (provider rejection)
    b"\x00"  # reserved
    # presentation context ID 5, rejected, with a transfer syntax that is not significant: 29 bytes
    b"\x21\x00\x00\x19"  # item 0x21 presentation context (AC), length 25 = 4 + 21
    b"\x05"  # presentation context ID 5
    b"\x00"  # reserved
    b"\x04"  # result: 4 transfer-syntaxes-not-supported (provider rejection)
    b"\x00"  # reserved
    b"\x40\x00\x00\x11"  # sub-item 0x40 transfer syntax, length 17
    b"1.2.840.10008.1.2"  # Implicit VR Little Endian, ignored
    # user information: 12 bytes
    b"\x50\x00\x00\x08"  # item 0x50 user information, length 8
    b"\x51\x00\x00\x04"  # sub-item 0x51 maximum length, length 4
    b"\x00\x00\x80\x00"  # maximum length received: 32768
)

ASSOCIATE_AC_TOLERATED_VALUE = AssociateAC(
    called_ae_title="ANY-SCP",
    calling_ae_title="ECHOSCU",
    application_context=APPLICATION_CONTEXT,
    user_information=UserInformation(maximum_length=32768),
    protocol_version=1,
    presentation_contexts=(
        PresentationContextAC(1, PresentationContextAC.ACCEPTANCE, EXPLICIT_VR_LE),
        PresentationContextAC(3, PresentationContextAC.NO_REASON, None),
        PresentationContextAC(5, PresentationContextAC.TRANSFER_SYNTAXES_NOT_SUPPORTED, None),
    ),
)


P_DATA_TF_TOLERATED = (
    b"\x04"  # PDU type: P-DATA-TF
    b"\xff"  # reserved, non-zero: not tested
    b"\x00\x00\x00\x11"  # PDU length: 17 = 10 + 7
    b"\x00\x00\x00\x06"  # PDV item length 6 = 2 + 4
    b"\x01"  # presentation context ID 1
    b"\xfd"  # message control header 11111101: command, not last; bits 2-7 not tested
    b"\xde\xad\xbe\xef"  # PDV data, 4 bytes
    b"\x00\x00\x00\x03"  # PDV item length 3 = 2 + 1
    b"\xff"  # presentation context ID 255
    b"\xfe"  # message control header 11111110: data set, last; bits 2-7 not tested
    b"\x00"  # PDV data, 1 byte
)

P_DATA_TF_TOLERATED_VALUE = PDataTF(
    (
        PDV(context_id=1, is_command=True, is_last=False, data=b"\xde\xad\xbe\xef"),
        PDV(context_id=255, is_command=False, is_last=True, data=b"\x00"),
    )
)


ASSOCIATE_RJ_TOLERATED = (
    b"\x03"  # PDU type: A-ASSOCIATE-RJ
    b"\xff"  # reserved, non-zero: not tested
    b"\x00\x00\x00\x04"  # PDU length: 4
    b"\xff"  # reserved, non-zero: not tested
    b"\x01"  # result: 1 rejected-permanent
    b"\x01"  # source: 1 service-user
    b"\x07"  # reason/diag: 7 called-AE-title-not-recognized
)

RELEASE_RQ_TOLERATED = (
    b"\x05"  # PDU type: A-RELEASE-RQ
    b"\xff"  # reserved, non-zero: not tested
    b"\x00\x00\x00\x04"  # PDU length: 4
    b"\xff\xff\xff\xff"  # reserved, non-zero: not tested
)

RELEASE_RP_TOLERATED = (
    b"\x06"  # PDU type: A-RELEASE-RP
    b"\xff"  # reserved, non-zero: not tested
    b"\x00\x00\x00\x04"  # PDU length: 4
    b"\xff\xff\xff\xff"  # reserved, non-zero: not tested
)

ABORT_TOLERATED = (
    b"\x07"  # PDU type: A-ABORT
    b"\xff"  # reserved, non-zero: not tested
    b"\x00\x00\x00\x04"  # PDU length: 4
    b"\xaa"  # reserved, non-zero: not tested
    b"\xbb"  # reserved, non-zero: not tested
    b"\x02"  # source: 2 service-provider
    b"\x01"  # reason/diag: 1 unrecognized-PDU
)


#: (name, golden bytes, decoded value): decodes to the value; re-encoding differs.
TOLERATED = (
    ("A-ASSOCIATE-RQ tolerated", ASSOCIATE_RQ_TOLERATED, ASSOCIATE_RQ_TOLERATED_VALUE),
    ("A-ASSOCIATE-AC tolerated", ASSOCIATE_AC_TOLERATED, ASSOCIATE_AC_TOLERATED_VALUE),
    ("P-DATA-TF tolerated", P_DATA_TF_TOLERATED, P_DATA_TF_TOLERATED_VALUE),
    ("A-ASSOCIATE-RJ tolerated", ASSOCIATE_RJ_TOLERATED, AssociateRJ(result=1, source=1, reason=7)),
    ("A-RELEASE-RQ tolerated", RELEASE_RQ_TOLERATED, ReleaseRQ()),
    ("A-RELEASE-RP tolerated", RELEASE_RP_TOLERATED, ReleaseRP()),
    ("A-ABORT tolerated", ABORT_TOLERATED, Abort(source=2, reason=1)),
)


# ---------------------------------------------------------------------------
# Single items and sub-items, header included.  Each decodes (with the
# class's ``decode(data, body_start, body_end)``) to its value and its value
# encodes back to it.

LEGACY_CONVERTED_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"  # 27 characters

PRESENTATION_CONTEXT_RQ_ITEM = (
    b"\x20\x00\x00\x2e"  # item 0x20 presentation context (RQ), length 46 = 4 + 21 + 21
    b"\x05"  # presentation context ID 5
    b"\x00\x00\x00"  # reserved
    b"\x30\x00\x00\x11"  # sub-item 0x30 abstract syntax, length 17
    b"1.2.840.10008.1.1"  # Verification SOP Class
    b"\x40\x00\x00\x11"  # sub-item 0x40 transfer syntax, length 17
    b"1.2.840.10008.1.2"  # Implicit VR Little Endian
)

PRESENTATION_CONTEXT_AC_ACCEPTED_ITEM = (
    b"\x21\x00\x00\x19"  # item 0x21 presentation context (AC), length 25 = 4 + 21
    b"\x05"  # presentation context ID 5
    b"\x00"  # reserved
    b"\x00"  # result: 0 acceptance
    b"\x00"  # reserved
    b"\x40\x00\x00\x11"  # sub-item 0x40 transfer syntax, length 17
    b"1.2.840.10008.1.2"  # Implicit VR Little Endian
)

PRESENTATION_CONTEXT_AC_REJECTED_ITEM = (
    b"\x21\x00\x00\x08"  # item 0x21 presentation context (AC), length 8 = 4 + 4
    b"\x07"  # presentation context ID 7
    b"\x00"  # reserved
    b"\x01"  # result: 1 user-rejection
    b"\x00"  # reserved
    b"\x40\x00\x00\x00"  # sub-item 0x40 transfer syntax, length 0 (not significant)
)

ROLE_SELECTION_ITEM = (
    b"\x54\x00\x00\x15"  # sub-item 0x54 SCP/SCU role selection, length 21 = 2 + 17 + 2
    b"\x00\x11"  # SOP class UID length 17
    b"1.2.840.10008.1.1"  # Verification SOP Class
    b"\x01"  # SCU role: 1
    b"\x01"  # SCP role: 1
)

ASYNC_OPERATIONS_WINDOW_ITEM = (
    b"\x53\x00\x00\x04"  # sub-item 0x53 asynchronous operations window, length 4
    b"\x00\x00"  # maximum number of operations invoked: 0, unlimited
    b"\xff\xff"  # maximum number of operations performed: 65535
)

SOP_CLASS_EXTENDED_ITEM = (
    b"\x56\x00\x00\x13"  # sub-item 0x56 SOP class extended negotiation, length 19 = 2 + 17
    b"\x00\x11"  # SOP class UID length 17
    b"1.2.840.10008.1.1"  # Verification SOP Class
    # service class application information: empty
)

SOP_CLASS_COMMON_EXTENDED_ITEM = (
    b"\x57\x00\x00\x6a"  # sub-item 0x57 common extended (version 0), length 106 = 29 + 19 + 58
    b"\x00\x1b"  # SOP class UID length 27
    b"1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    b"\x00\x11"  # service class UID length 17
    b"1.2.840.10008.4.2"  # Storage Service Class
    b"\x00\x38"  # related general SOP class identification length 56 = 27 + 29
    b"\x00\x19"  # related general SOP class UID length 25
    b"1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    b"\x00\x1b"  # related general SOP class UID length 27
    b"1.2.840.10008.5.1.4.1.1.2.2"  # Legacy Converted Enhanced CT Image Storage
)

SOP_CLASS_COMMON_EXTENDED_NO_RELATED_ITEM = (
    b"\x57\x00\x00\x30"  # sub-item 0x57 common extended (version 0), length 48 = 27 + 19 + 2
    b"\x00\x19"  # SOP class UID length 25
    b"1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    b"\x00\x11"  # service class UID length 17
    b"1.2.840.10008.4.2"  # Storage Service Class
    b"\x00\x00"  # related general SOP class identification length 0: none
)

USER_IDENTITY_RQ_ITEM = (
    b"\x58\x00\x00\x09"  # sub-item 0x58 user identity (RQ), length 9 = 2 + 5 + 2
    b"\x01"  # user identity type 1: username
    b"\x00"  # no positive response requested
    b"\x00\x03"  # primary field length 3
    b"bob"  # primary field: username
    b"\x00\x00"  # secondary field length 0: none
)

USER_IDENTITY_AC_ITEM = (
    b"\x59\x00\x00\x02"  # sub-item 0x59 user identity (AC), length 2
    b"\x00\x00"  # server response length 0
)

USER_INFORMATION_ITEM = (
    b"\x50\x00\x00\x63"  # item 0x50 user information, length 99 = 8+9+25+33+5+13+6
    b"\x51\x00\x00\x04"  # sub-item 0x51 maximum length, length 4
    b"\x00\x00\x00\x00"  # maximum length received: 0, unlimited
    b"\x52\x00\x00\x05"  # sub-item 0x52 implementation class UID, length 5
    b"1.2.3"  # implementation class UID
    b"\x54\x00\x00\x15"  # sub-item 0x54 SCP/SCU role selection, length 21 = 2 + 17 + 2
    b"\x00\x11"  # SOP class UID length 17
    b"1.2.840.10008.1.1"  # Verification SOP Class
    b"\x01"  # SCU role: 1
    b"\x00"  # SCP role: 0
    b"\x54\x00\x00\x1d"  # sub-item 0x54 SCP/SCU role selection, length 29 = 2 + 25 + 2
    b"\x00\x19"  # SOP class UID length 25
    b"1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    b"\x00"  # SCU role: 0
    b"\x01"  # SCP role: 1
    b"\x55\x00\x00\x01"  # sub-item 0x55 implementation version name, length 1
    b"X"  # implementation version name
    b"\x58\x00\x00\x09"  # sub-item 0x58 user identity (RQ), length 9 = 2 + 5 + 2
    b"\x01"  # user identity type 1: username
    b"\x00"  # no positive response requested
    b"\x00\x03"  # primary field length 3
    b"bob"  # primary field: username
    b"\x00\x00"  # secondary field length 0
    b"\x59\x00\x00\x02"  # sub-item 0x59 user identity (AC), length 2
    b"\x00\x00"  # server response length 0
)

#: The same sub-items as USER_INFORMATION_ITEM in another order (the two role
#: selections keep theirs): decoding does not depend on sub-item order.
USER_INFORMATION_REORDERED_ITEM = (
    b"\x50\x00\x00\x63"  # item 0x50 user information, length 99
    b"\x59\x00\x00\x02"  # sub-item 0x59 user identity (AC), length 2
    b"\x00\x00"  # server response length 0
    b"\x58\x00\x00\x09"  # sub-item 0x58 user identity (RQ), length 9
    b"\x01"  # user identity type 1: username
    b"\x00"  # no positive response requested
    b"\x00\x03"  # primary field length 3
    b"bob"  # primary field: username
    b"\x00\x00"  # secondary field length 0
    b"\x55\x00\x00\x01"  # sub-item 0x55 implementation version name, length 1
    b"X"  # implementation version name
    b"\x54\x00\x00\x15"  # sub-item 0x54 SCP/SCU role selection, length 21
    b"\x00\x11"  # SOP class UID length 17
    b"1.2.840.10008.1.1"  # Verification SOP Class
    b"\x01"  # SCU role: 1
    b"\x00"  # SCP role: 0
    b"\x54\x00\x00\x1d"  # sub-item 0x54 SCP/SCU role selection, length 29
    b"\x00\x19"  # SOP class UID length 25
    b"1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    b"\x00"  # SCU role: 0
    b"\x01"  # SCP role: 1
    b"\x52\x00\x00\x05"  # sub-item 0x52 implementation class UID, length 5
    b"1.2.3"  # implementation class UID
    b"\x51\x00\x00\x04"  # sub-item 0x51 maximum length, length 4
    b"\x00\x00\x00\x00"  # maximum length received: 0
)

USER_INFORMATION_VALUE = UserInformation(
    maximum_length=0,
    implementation_class_uid="1.2.3",
    implementation_version_name="X",
    role_selections=(
        RoleSelection(VERIFICATION, scu_role=True, scp_role=False),
        RoleSelection(CT_IMAGE_STORAGE, scu_role=False, scp_role=True),
    ),
    user_identity_rq=UserIdentityRQ(1, False, b"bob", b""),
    user_identity_ac=UserIdentityAC(b""),
)

#: (name, class, golden item bytes, decoded value)
ITEMS = (
    ("presentation context RQ", PresentationContextRQ, PRESENTATION_CONTEXT_RQ_ITEM,
     PresentationContextRQ(5, VERIFICATION, (IMPLICIT_VR_LE,))),
    ("presentation context AC accepted", PresentationContextAC, PRESENTATION_CONTEXT_AC_ACCEPTED_ITEM,
     PresentationContextAC(5, PresentationContextAC.ACCEPTANCE, IMPLICIT_VR_LE)),
    ("presentation context AC rejected", PresentationContextAC, PRESENTATION_CONTEXT_AC_REJECTED_ITEM,
     PresentationContextAC(7, PresentationContextAC.USER_REJECTION, None)),
    ("role selection", RoleSelection, ROLE_SELECTION_ITEM, RoleSelection(VERIFICATION, True, True)),
    ("asynchronous operations window", AsyncOperationsWindow, ASYNC_OPERATIONS_WINDOW_ITEM,
     AsyncOperationsWindow(invoked=0, performed=65535)),
    ("SOP class extended", SOPClassExtended, SOP_CLASS_EXTENDED_ITEM, SOPClassExtended(VERIFICATION, b"")),
    ("SOP class common extended", SOPClassCommonExtended, SOP_CLASS_COMMON_EXTENDED_ITEM,
     SOPClassCommonExtended(ENHANCED_CT_IMAGE_STORAGE, STORAGE_SERVICE_CLASS,
                            (CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT))),
    ("SOP class common extended, no related class", SOPClassCommonExtended,
     SOP_CLASS_COMMON_EXTENDED_NO_RELATED_ITEM,
     SOPClassCommonExtended(CT_IMAGE_STORAGE, STORAGE_SERVICE_CLASS, ())),
    ("user identity RQ", UserIdentityRQ, USER_IDENTITY_RQ_ITEM, UserIdentityRQ(1, False, b"bob", b"")),
    ("user identity AC", UserIdentityAC, USER_IDENTITY_AC_ITEM, UserIdentityAC(b"")),
    ("user information", UserInformation, USER_INFORMATION_ITEM, USER_INFORMATION_VALUE),
)
