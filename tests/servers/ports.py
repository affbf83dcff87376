"""A free TCP port on the loopback address, for the private servers and optsync processes the
tests and benchmarks start."""

from __future__ import annotations

import socket

__all__ = ("free_port",)


def free_port() -> int:
    """A port no process listens on now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
