"""editguard: find, reverse and block knowledge edits (ROME, MEMIT) in transformer checkpoints."""

__version__ = "0.1.0"


def load_locked(reference: str, **kwargs):
    """Load an editguard-locked checkpoint with its mask kept in the forward pass (see harden/lock.py)."""
    from .harden.lock import load_locked as _load_locked

    return _load_locked(reference, **kwargs)
