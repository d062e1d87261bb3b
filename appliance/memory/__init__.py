"""The Memory-Server's store: received objects held in memory, and the sink that puts them there."""
