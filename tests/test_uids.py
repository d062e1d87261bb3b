"""What is taken for a UID in what peers send (PS3.5 9.1), and what is a valid one."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from appliance.dicom.uids import is_received_uid, is_valid_uid


class ReceivedUidTests(SynchronousTestCase):

    def test_received(self):
        """Digits in dot-separated components, 1 to 64 characters; leading zeros (some devices send them) pass."""
        for uid in ("1", "1.2.840.10008.1.2.1", "01.2", "1.0.3", "1" * 64, "1." + "2" * 62):
            self.assertTrue(is_received_uid(uid), uid)

    def test_not_received(self):
        """Anything else is not a UID at all: nothing of it is echoed or used as one."""
        for uid in ("", ".1", "1.", "1..2", "1.2\n", "1.2 ", " 1.2", "1.2.a", "../x", "1\x002", "1" * 65,
                    "\uff11.2", "1.\u0662", "1.2.3\u00b2", "-1.2", "+1"):
            self.assertFalse(is_received_uid(uid), repr(uid))

    def test_valid_is_stricter(self):
        """A valid UID has no zero-led component; every valid one is received."""
        for uid in ("01.2", "1.02", "1.00"):
            self.assertTrue(is_received_uid(uid) and not is_valid_uid(uid), uid)
        for uid in ("1.2.840.10008.5.1.4.1.1.2", "0.0", "1.20.3"):
            self.assertTrue(is_valid_uid(uid) and is_received_uid(uid), uid)
