"""``optsync.redaction``: what logs, the console and error texts show of personal data."""

import random
import re
import uuid

import pytest

from optsync.redaction import DOT, mask, mask_address, mask_text, redact_url


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("endpoint user1_+12341111111 written", "endpoint user1_***11 written"),
        ("raw 2065550142 seen", "raw ***42 seen"),
        ("mail bob@example.com", "mail ***@example.com"),
        ("listening on 127.0.0.1:8080", "listening on 127.0.0.1:8080"),
        ("at 2026-11-27 14:25:27 took 12.5 ms", "at 2026-11-27 14:25:27 took 12.5 ms"),
        ('invalid dsn "postgresql://u:S3cret@h/db"', 'invalid dsn "postgresql://u:***@h/db"'),
        ("mysql://root@db:3306/app", "mysql://root@db:3306/app"),
        ("call (555) 123-4567 now", "call ***67 now"),
        ("call 555-123-4567 or 555.123.4568", "call ***67 or ***68"),
        ("to +1 234 111 1116.", "to ***16."),
        ("to +1 (234) 111-1116, +44 20 7123 4567", "to ***16, ***67"),
        ("to 1-555-123-4567", "to ***67"),
        ("request_id=12345678-1234-4234-8234-123456789012", None),
        ("request_id=5f0c1d2e-8a7b-4b44d-9d2e-a1b2c3d457fb", None),
        ("trace=0a1234567890ff span=5F0C1D2E8A7B4B44", None),
        ("at 2026-12-03T06:45:49.123Z and 2026-12-03T06:45:49+00:00", None),
        ("user1_2065550142 and id=7-2065550142", "user1_***42 and id=7-***42"),
        ("x=ab-555-123-4567 y=12-555-123-4567", "x=ab-***67 y=12-***67"),
        ("GET /v1/apps/a/endpoints/u1_%2B12065550101", "GET /v1/apps/a/endpoints/u1_%2B***01"),
        ("url=/e/u1_%2b12065550101?x=1", "url=/e/u1_%2B***01?x=1"),
    ],
)
def test_mask(text: str, expected: str | None) -> None:
    """``expected`` None: the text is left as it is."""
    assert mask(text) == (text if expected is None else expected)


def test_request_ids_survive_masking() -> None:
    """Issue 13: a UUID with ten digits in a row lost them, so it no longer matched the client's."""
    rng = random.Random(13)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(2000)]
    assert any(re.search(r"\d{10}", i) for i in ids)  # the case that was mangled is here
    line = " ".join(f"request_id={i}" for i in ids)
    assert mask(line) == line


def test_redact_url_hides_passwords_in_urls_and_dsn_keywords() -> None:
    assert redact_url("postgresql://app:S3cret@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert redact_url("host=db password=S3cret user=app") == "host=db password=*** user=app"
    assert redact_url("mysql://root@db:3306/app") == "mysql://root@db:3306/app"


def test_console_masks_keep_a_hint_of_the_address() -> None:
    assert mask_address("+12065550142") == f"+1206{DOT * 5}42"
    assert mask_address("jane@example.com") == f"j{DOT * 3}@example.com"
    assert mask_text("user1_+12065550142") == f"user1_+1206{DOT * 5}42"
