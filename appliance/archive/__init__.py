"""The Disk-Server's archive: files, SQLite index, storage management."""
