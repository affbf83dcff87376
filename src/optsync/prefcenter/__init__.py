"""The sample "home-grown app" at ``/prefs``: users turn SMS (and e-mail) messages on or off.

It writes to the source database, never to the engine, so each change travels the whole
pipeline. ``optsync up`` serves it; ``optsync run`` only with ``--prefs``.
"""

from optsync.prefcenter.app import PrefsContext, create_prefcenter, prefs_context

__all__ = ("PrefsContext", "create_prefcenter", "prefs_context")
