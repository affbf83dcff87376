"""What the console works on: the engine's store, the sign-in key pairs and, when the process
runs a pipeline, its status and dead-letter queue.

``optsync serve`` has no pipeline: ``status``, ``dead_letters`` and ``replay`` are None there and
the pipeline page says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from optsync.apply.dlq import DeadLetter, DeadLetterQueue
from optsync.apply.mapping import Mapper
from optsync.apply.worker import ApplyWorker
from optsync.backends import mapping_rules, open_dlq, open_stream
from optsync.config import Settings
from optsync.credentials import load_or_create_credentials
from optsync.engine.store import EndpointStore
from optsync.pipeline import ensure_app
from optsync.status import Status, read_status
from optsync.stream.base import ChangeStream
from optsync.web.session import load_or_create_secret

__all__ = ("ConsoleContext", "DeadLetterSource", "ReplayDeadLetters", "console_context")

StatusProvider = Callable[[], Status]
DeadLetterSource = Callable[[int], Sequence[DeadLetter]]
"""Up to n dead letters not replayed yet, oldest first."""
ReplayDeadLetters = Callable[[Sequence[int] | None], tuple[int, int]]
"""Replay the given dead letters (None: all); returns (replayed, still failing)."""


@dataclass(frozen=True)
class ConsoleContext:
    store: EndpointStore
    credentials: Mapping[str, str]
    """Access key id -> secret: the pairs an operator may sign in with (the API's own)."""
    secret: str
    """Signs the session cookies."""
    status: StatusProvider | None = None
    dead_letters: DeadLetterSource | None = None
    replay: ReplayDeadLetters | None = None
    default_app: str | None = None
    """Name of the app the console opens first (the one the pipeline writes into)."""
    secure_cookies: bool = False
    """Mark cookies ``Secure`` (only when the console is reached over HTTPS)."""
    poll_seconds: float = 1.0
    """How often the live estimate asks for new counts."""

    @property
    def has_pipeline(self) -> bool:
        return self.status is not None


def console_context(
    settings: Settings,
    store: EndpointStore,
    *,
    pipeline: bool,
    stream: ChangeStream | None = None,
    dlq: DeadLetterQueue | None = None,
    capture_waiting: Callable[[], str | None] | None = None,
) -> ConsoleContext:
    """The console of an ``optsync serve`` (``pipeline=False``) or ``up``/``run`` process.

    Operators sign in with the API's key pairs: the configured ones, else ``DATA_DIR/credentials``.
    ``stream`` and ``dlq``: the running pipeline's own (else each page opens them anew).
    Sessions are signed with ``[api] console_secret`` when set, so they hold across API servers.
    """
    credentials = dict(settings.api.credentials)
    if not credentials:
        credentials, _ = load_or_create_credentials(settings.data_dir)
    context = ConsoleContext(
        store=store,
        credentials=credentials,
        secret=settings.api.console_secret or load_or_create_secret(settings.data_dir),
        default_app=settings.app,
    )
    if not pipeline:
        return context

    def status() -> Status:
        found = read_status(settings, store, stream, dlq)
        if capture_waiting is None:
            return found
        return dataclasses.replace(found, capture_waiting=capture_waiting())

    def dead_letters(limit: int) -> Sequence[DeadLetter]:
        if dlq is not None:
            return dlq.list(limit=limit)
        queue = open_dlq(settings)
        try:
            return queue.list(limit=limit)
        finally:
            queue.close()

    def replay(ids: Sequence[int] | None) -> tuple[int, int]:
        # As `optsync dlq replay` does: the position guard makes this safe beside the running
        # apply thread.
        own_stream = open_stream(settings) if stream is None else stream
        queue = open_dlq(settings) if dlq is None else dlq
        try:
            app = ensure_app(store, settings.app)
            rules = mapping_rules(settings.mappings)
            worker = ApplyWorker(own_stream, Mapper(rules), store, app.id, queue)
            return worker.replay_dead_letters(ids)
        finally:
            if dlq is None:
                queue.close()
            if stream is None:
                own_stream.close()

    return dataclasses.replace(context, status=status, dead_letters=dead_letters, replay=replay)
