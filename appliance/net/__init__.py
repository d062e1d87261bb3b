"""Twisted adapters: the only code that touches sockets and timers."""
