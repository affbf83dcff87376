"""What the console and the preference center share as web pages: forms, paths, templates,
security headers, sessions and CSRF protection. Neither imports the other.

- ``forms``: urlencoded form bodies (size-capped), ``Form``, ``checked_form``.
- ``paths``: the mount path, redirects inside it, ``safe_next`` (no open redirects).
- ``templates``: Jinja2 with autoescaping and the pages' filters.
- ``headers``: ``SecurityHeaders`` (CSP, no framing, no caching of pages).
- ``session``: the cookie-signing secret (``DATA_DIR/console-secret``), per-purpose keys,
  ``rotate_session``.
- ``csrf``: the session's form token and ``CsrfProtection``, the middleware that checks every POST.
"""
