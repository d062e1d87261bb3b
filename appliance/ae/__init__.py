"""The Application Entities of the conformance statement, built on :mod:`appliance.net`."""
