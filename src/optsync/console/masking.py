"""Addresses as the console shows them until the operator asks to see them.

A phone number keeps its first five and last two characters (``+1234•••••11``), an e-mail
address the first letter of its local part and its domain (``j•••@example.com``), anything
else (push tokens) its first four and last two characters.
"""

from __future__ import annotations

import re

__all__ = ("DOT", "mask_address", "mask_text")

DOT = "\u2022"

_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
_PHONE = re.compile(r"\+\d{7,15}(?!\d)|(?<![\d.])\d{10,}(?![\d.])")


def mask_address(address: str | None) -> str:
    """The address with its middle hidden (empty text for no address)."""
    if not address:
        return ""
    if "@" in address:
        local, _, domain = address.rpartition("@")
        return f"{local[:1]}{DOT * 3}@{domain}"
    keep_head = 5 if address[:1] == "+" or address[:1].isdigit() else 4
    if len(address) <= keep_head + 2:
        return DOT * max(len(address) - 2, 1) + address[-2:]
    hidden = len(address) - keep_head - 2
    return address[:keep_head] + DOT * min(hidden, 12) + address[-2:]


def mask_text(text: str) -> str:
    """``text`` with every phone number and e-mail address in it masked (endpoint ids)."""
    text = _EMAIL.sub(lambda m: mask_address(m.group(0)), text)
    return _PHONE.sub(lambda m: mask_address(m.group(0)), text)
