"""The appliance's HTTP server (twisted.web): the local JSON API of the Memory-Manager and the memory store."""
