"""``engine.email.normalize_email``: what an EMAIL endpoint address may be, and the reasons."""

from __future__ import annotations

import pytest

from optsync.engine.email import EmailError, normalize_email


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        (" Ann@Example.COM ", "ann@example.com"),
        ("a.b+tag@mail.example.co.uk", "a.b+tag@mail.example.co.uk"),
        ("o'brien_{x}@example.org", "o'brien_{x}@example.org"),
        ("jöse@bücher.de", "jöse@bücher.de"),  # internationalised: kept in Unicode
        ("x@a-b.example", "x@a-b.example"),
        ("a" * 64 + "@example.com", "a" * 64 + "@example.com"),
    ],
)
def test_routable_addresses_are_stripped_and_lower_cased(text: str, normal: str) -> None:
    assert normalize_email(text) == normal


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("ann.example.com", "exactly one '@'"),
        ("ann@@example.com", "exactly one '@'"),
        ("@example.com", "exactly one '@'"),
        ("ann@", "exactly one '@'"),
        ("a" * 65 + "@example.com", "longer than 64"),
        ("a@" + "b" * 250 + ".com", "longer than 254"),
        ("ann smith@example.com", "a space, a quote"),
        ('"ann"@example.com', "a space, a quote"),
        (".ann@example.com", "doubled dot"),
        ("ann..s@example.com", "doubled dot"),
        ("ann\u00a0s@example.com", "a space, a quote"),
        ("ann@localhost", "no dot"),
        ("ann@192.0.2.1", "all digits"),
        ("ann@[192.0.2.1]", "not a valid host name"),
        ("ann@-example.com", "not a valid host name"),
        ("ann@exa_mple.com", "not a valid host name"),
        ("ann@example..com", "not a valid host name"),
        ("ann@" + "x" * 64 + ".com", "not a valid host name"),
    ],
)
def test_what_mail_would_not_route_is_refused_with_a_reason_without_the_address(
    text: str, reason: str
) -> None:
    with pytest.raises(EmailError) as caught:
        normalize_email(text)
    assert reason in str(caught.value)
    assert text.strip() not in str(caught.value)
