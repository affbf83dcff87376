"""Form bodies: ``application/x-www-form-urlencoded`` read with the standard library (no multipart
parser needed), a body over ``MAX_FORM_BYTES`` refused."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import parse_qs

from starlette.requests import Request

__all__ = ("MAX_FORM_BYTES", "Form", "FormError", "checked_form", "read_form")

MAX_FORM_BYTES = 64 * 1024


class FormError(Exception):
    """A form body that cannot be read; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Form:
    """The fields of one submitted form."""

    def __init__(self, fields: Mapping[str, Sequence[str]]) -> None:
        self._fields = {k: list(v) for k, v in fields.items()}

    def get(self, name: str, default: str = "") -> str:
        """The first value of ``name``, stripped of surrounding blanks."""
        values = self._fields.get(name)
        return values[0].strip() if values else default

    def getlist(self, name: str) -> list[str]:
        return [v.strip() for v in self._fields.get(name, [])]

    def __contains__(self, name: object) -> bool:
        return name in self._fields


async def read_form(request: Request) -> Form:
    """Parse an urlencoded body of at most ``MAX_FORM_BYTES``."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind not in ("application/x-www-form-urlencoded", ""):
        raise FormError(415, "Forms are sent as application/x-www-form-urlencoded")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            raise FormError(413, f"The form is over {MAX_FORM_BYTES // 1024} KB")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise FormError(400, "The form is not UTF-8") from None
    return Form(parse_qs(text, keep_blank_values=True, max_num_fields=1000))


def checked_form(request: Request) -> Form:
    """The form of a POST that passed the CSRF check (``auth.CsrfProtection`` put it there)."""
    form = request.scope.get("state", {}).get("form")
    if not isinstance(form, Form):
        raise RuntimeError("a POST reached a view without passing the CSRF middleware")
    return form
