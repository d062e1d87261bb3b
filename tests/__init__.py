"""Tests of the appliance, run with ``trial tests``."""
