"""The dead-letter queue: the interface and its SQLite implementation (PostgreSQL in
``optsync.apply.dlq.postgres``, loaded only when configured)."""

from optsync.apply.dlq.base import DeadLetter, DeadLetterQueue
from optsync.apply.dlq.sqlite import SQLiteDeadLetterQueue

__all__ = ("DeadLetter", "DeadLetterQueue", "SQLiteDeadLetterQueue")
