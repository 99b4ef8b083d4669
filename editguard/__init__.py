"""editguard: find, reverse and block knowledge edits (ROME, MEMIT) in transformer checkpoints."""

__version__ = "0.1.0"
