"""E-mail addresses: the check and normal form of EMAIL endpoint addresses from mapped rows.

A source column is not a sign-up form: it may hold a name, a phone number, a typo or two
addresses. ``normalize_email`` accepts what a mail server would route and refuses the rest with
a reason that never repeats the address (reasons go to the DLQ and the log). Decisions:

- Surrounding white space is stripped and the whole address lower-cased. RFC 5321 lets the local
  part be case-sensitive, but no provider treats it so, and two endpoints for ``Ann@x`` and
  ``ann@x`` would split one person's consent in two.
- Exactly one ``@``; a local part of 1 to 64 characters and an address of at most 254 (RFC 5321's
  path limits). The local part takes RFC 5322's dot-atom (letters, digits and
  ``!#$%&'*+/=?^_`{|}~-``, dots between them, never leading, trailing or doubled) and any
  non-ASCII letter (RFC 6531, internationalised mail); quoted local parts (``"a b"@x``) are
  refused: real lists do not hold them and they are a common sign of a broken export.
- The domain is a host name of at least two labels: labels of 1 to 63 letters, digits or
  hyphens, not starting or ending with a hyphen, and a top-level label that is not all digits.
  A non-ASCII domain must encode to IDNA (Python's ``idna`` codec) and is kept in Unicode. IP
  literals (``user@[192.0.2.1]``) are refused.
- Nothing looks up DNS: whether the domain takes mail is the sender's business.
"""

from __future__ import annotations

import re

__all__ = ("EmailError", "normalize_email")

MAX_ADDRESS = 254
MAX_LOCAL = 64
MAX_LABEL = 63

_ATOM_ASCII = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+/=?^_`{|}~-")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")


class EmailError(ValueError):
    """Why a text is not an e-mail address; the message never holds the address."""


def normalize_email(text: str) -> str:
    """The address in its normal form (stripped, lower-cased); ``EmailError`` if it is not one."""
    address = text.strip().lower()
    if address.count("@") != 1:
        raise EmailError("exactly one '@' with text on both sides")
    if len(address) > MAX_ADDRESS:
        raise EmailError(f"longer than {MAX_ADDRESS} characters")
    local, domain = address.split("@")
    if not local or not domain:
        raise EmailError("exactly one '@' with text on both sides")
    if len(local) > MAX_LOCAL:
        raise EmailError(f"the part before '@' is longer than {MAX_LOCAL} characters")
    if not all(_atom(atom) for atom in local.split(".")):
        raise EmailError(
            "the part before '@' holds a space, a quote or another character mail does not "
            "route, or a leading, trailing or doubled dot"
        )
    _check_domain(domain)
    return address


def _atom(atom: str) -> bool:
    """A dot-atom's atom: RFC 5322 atext, or a non-ASCII letter or digit."""
    return bool(atom) and all(c in _ATOM_ASCII or (c > "\x7f" and c.isalnum()) for c in atom)


def _check_domain(domain: str) -> None:
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise EmailError("the domain is not a valid host name") from None
    labels = ascii_domain.split(".")
    if len(labels) < 2:
        raise EmailError("the domain has no dot (a host name such as example.com)")
    for label in labels:
        if len(label) > MAX_LABEL or not _LABEL.fullmatch(label):
            raise EmailError(
                "the domain is not a valid host name (letters, digits and inner hyphens "
                "between dots)"
            )
    if labels[-1].isdigit():
        raise EmailError("the domain's last label is all digits (an IP address is not taken)")
