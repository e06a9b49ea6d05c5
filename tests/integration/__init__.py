"""Integration tests: the real server on loopback sockets, driven by pytest-twisted (run them with pytest)."""
