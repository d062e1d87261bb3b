"""The seams between the network adapters and the Application Entities."""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = ["IServiceClass", "IDataSetConsumer", "IObjectSink", "IObjectWriter"]


class IDataSetConsumer(Interface):
    """Receives a request's data set fragment by fragment, as it arrives.

    A consumer that cannot keep up calls ``request.association.pause_reading()``
    and ``resume_reading()``; the association never buffers a data set itself.
    """

    def write(data):
        """Take the next fragment (bytes) of the data set."""

    def finish():
        """The data set is complete.  Return its result (or a Deferred of it),
        which becomes ``request.data`` for :meth:`IServiceClass.handle`."""

    def abandon(reason):
        """The association ended before the data set was complete (reason: str)."""


class IServiceClass(Interface):
    """Serves the DIMSE requests on the abstract syntaxes it lists, as SCP."""

    abstract_syntaxes = Attribute(
        "Mapping of abstract syntax UID to the tuple of transfer syntax UIDs acceptable for it"
    )
    operations = Attribute(
        "The request command fields it performs (e.g. {0x0001} for C-STORE-RQ); any other request on its "
        "contexts is answered 0211 (unrecognized operation) without reaching it"
    )

    def open_data_set(request):
        """Return the :class:`IDataSetConsumer` for the data set announced by
        ``request`` (a :class:`appliance.net.protocol.DimseRequest`)."""

    def handle(request):
        """Serve ``request``, answering through ``request.respond(...)``.

        Return ``None`` or a Deferred that fires once the final response is
        sent; a failure becomes a C000-class response and is logged.
        """

    def cancel(request):
        """A C-CANCEL-RQ arrived for ``request`` while it was being served."""


class IObjectWriter(Interface):
    """Takes one received data set for a sink, fragment by fragment, and keeps it or refuses it."""

    def write(data):
        """The next fragment (bytes) of the data set."""

    def finish():
        """The data set is complete: a Deferred firing with ``appliance.dataset.checks.Kept`` once it is kept
        (durably, where the sink promises that), or failing with ``appliance.dataset.checks.Refused``."""

    def abandon(reason):
        """The data set will not be completed (the association ended, or it was refused meanwhile)."""


class IObjectSink(Interface):
    """Where a C-STORE SCP puts the objects it receives: the archive, or the memory store."""

    limits = Attribute(
        "appliance.dataset.deflate.InflateLimits: max_object_size for any data set, and how far a deflated one "
        "may inflate"
    )

    def open(description, pause, resume):
        """An :class:`IObjectWriter` for the data set ``description`` (appliance.dataset.checks.ObjectDescription)
        announces; ``pause()`` and ``resume()`` stop and restart reading from the peer (flow control)."""


class ILoadTracker(Interface):
    """What the Memory-Server's sink tells the Memory-Manager about objects arriving for its loads."""

    def expects(description):
        """Whether a running load asked for the object ``description`` (appliance.dataset.checks.ObjectDescription)
        announces: its Move Originator AE Title and Message ID name one of the load's C-MOVEs, or it comes from
        the device a load is moving from."""

    def kept(description):
        """The object was kept in memory."""

    def refused(description, refused):
        """The object was refused (appliance.dataset.checks.Refused): its load says why."""
