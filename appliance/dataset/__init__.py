"""Received data sets, whatever keeps them (the archive, memory): read, checked and described without I/O of
their own beyond the file or bytes they are given."""
