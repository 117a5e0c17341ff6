"""vitexp: train, distill and prune Vision Transformers from Hydra configs."""

__version__ = "0.1.0"


class VitexpError(Exception):
    """A user-facing error: the message names the problem and the fix, and is printed as one line."""
