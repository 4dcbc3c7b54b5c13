"""Peer links (port 7777): the sans-I/O protocol core, the TLS link, and what a node answers."""
