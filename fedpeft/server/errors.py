"""The error that ends a federated run: the server loop, the handshake and a resume raise it."""


class RunError(RuntimeError):
    """The run cannot go on (too few nodes, every client failed, ...); the message says why."""
