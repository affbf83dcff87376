"""The sample "home-grown app" at ``/prefs``: users turn SMS (and e-mail) messages on or off.

It writes to the source database, never to the engine, so each change travels the whole
pipeline. ``optsync up`` serves it; ``optsync run`` only with ``--prefs``.

Addresses are shown masked everywhere on the page, as the console shows them
(``+1234•••••11``, ``o•••@example.com``): in the list, in each switch's accessible name and in
the "Saved" message. The full address is not in the page at all, not even in a hidden field:
a switch's form names its row (the rowid, checked against the signed-in user) instead. The
only thing shown as typed is what the user types, the user id on the sign-in form; the page
has no field where a phone number is typed.
"""

from optsync.prefcenter.app import PrefsContext, create_prefcenter, prefs_context

__all__ = ("PrefsContext", "create_prefcenter", "prefs_context")
