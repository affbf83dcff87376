"""The web console at ``/console``: apps and channels, endpoints with their consent history,
segments with a live estimate, and the pipeline's status and dead-letter queue.

Served by ``optsync serve``, ``up`` and ``run`` beside the API; operators sign in with one of
the API's key pairs.
"""

from optsync.console.app import create_console
from optsync.console.context import ConsoleContext, console_context

__all__ = ("ConsoleContext", "console_context", "create_console")
