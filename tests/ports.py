"""Ports for tests that start servers or process groups: taken free at call time, since fixed numbers collide with
another run of the suite on the same machine."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    """Whether something listens on the port."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
