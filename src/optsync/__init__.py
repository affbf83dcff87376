"""optsync: keep messaging opt-in/opt-out state in sync with the database that owns it."""

__all__ = ("__version__",)

__version__ = "0.1.0"
