"""``[[sink]]``, ``[[inbound]]`` and ``[audit]``: what each reads, and a clear error naming the
key and the fix for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from optsync.config import load_settings
from optsync.engine.models import ChannelType
from optsync.errors import ConfigError
from optsync.sinks.settings import (
    EumSinkSettings,
    PinpointApiSinkSettings,
    WebhookSinkSettings,
    parse_duration,
)

SINKS = """
[[sink]]
name = "eum"
type = "eum-sms"
opt_out_list = "arn:aws:sms-voice:us-east-1:123456789012:opt-out-list/Marketing"
region = "us-east-1"
mirror_opt_in = true

[[sink]]
name = "crm"
type = "webhook"
url = "https://crm.example/hooks/consent/"
secret_env = "CRM_HOOK_SECRET"
timeout = "5s"
channels = ["sms", "EMAIL"]

[[sink]]
name = "remote"
type = "pinpoint-api"
url = "http://10.0.0.5:8080"
app = "optin-demo"
access_key_id = "KEY"
secret_access_key = "SECRET"

[[inbound]]
type = "eum-sms"
interval = "2m"
writeback = "UPDATE optin_status SET optin = 0 WHERE phone = :address"

[audit]
deadline = "2d"
"""


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    path = tmp_path / "optsync.toml"
    path.write_text(text)
    return load_settings(path, env=env or {})


def test_every_kind_is_read_with_its_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path, SINKS, {"CRM_HOOK_SECRET": "s3cret"})
    eum, crm, remote = settings.sinks
    assert isinstance(eum, EumSinkSettings)
    assert eum.opt_out_list.endswith("opt-out-list/Marketing")
    assert eum.mirror_opt_in is True
    assert eum.channels == frozenset({ChannelType.SMS, ChannelType.VOICE})
    assert isinstance(crm, WebhookSinkSettings)
    assert (crm.url, crm.secret, crm.timeout) == ("https://crm.example/hooks/consent", "s3cret", 5)
    assert crm.channels == frozenset({ChannelType.SMS, ChannelType.EMAIL})
    assert isinstance(remote, PinpointApiSinkSettings)
    assert (remote.region, remote.secret_access_key, remote.channels) == (
        "us-east-1",
        "SECRET",
        None,
    )
    (stop,) = settings.inbound
    assert (stop.name, stop.opt_out_list, stop.interval) == ("eum-sms-1", "Default", 120.0)
    assert settings.audit.deadline == 2 * 86400


def test_without_the_sections_nothing_is_delivered_and_the_deadline_is_a_day(
    tmp_path: Path,
) -> None:
    settings = load(tmp_path, "")
    assert (settings.sinks, settings.inbound, settings.audit.deadline) == ((), (), 86400.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[sink]]\nname = "x"\ntype = "sns"', "type = 'sns': use one of eum-sms, webhook"),
        ('[[sink]]\ntype = "webhook"', 'needs name = "..."'),
        ('[[sink]]\nname = "x"\ntype = "eum-sms"\nlist = "Default"', "unknown key 'list'"),
        (
            '[[sink]]\nname = "x"\ntype = "eum-sms"\n[[sink]]\nname = "x"\ntype = "eum-sms"',
            "declared twice",
        ),
        ('[[sink]]\nname = "x"\ntype = "eum-sms"\nopt_out_list = "a b"', "opt_out_list = 'a b'"),
        ('[[sink]]\nname = "x"\ntype = "eum-sms"\nchannels = ["FAX"]', "channels"),
        ('[[sink]]\nname = "x"\ntype = "webhook"\nsecret = "s"', 'needs url = "..."'),
        ('[[sink]]\nname = "x"\ntype = "webhook"\nurl = "ftp://h"\nsecret = "s"', "http://"),
        ('[[sink]]\nname = "x"\ntype = "webhook"\nurl = "http://h"', "secret_env"),
        (
            '[[sink]]\nname = "x"\ntype = "webhook"\nurl = "http://h"\nsecret_env = "NOPE"',
            "'NOPE', but that environment variable is not set",
        ),
        (
            '[[sink]]\nname = "x"\ntype = "webhook"\nurl = "http://h"\nsecret = "s"\n'
            'timeout = "soon"',
            "timeout = 'soon'",
        ),
        ('[sink]\nname = "x"', "write [[sink]]"),
        ('[[inbound]]\ntype = "twilio"', "use 'eum-sms'"),
        (
            '[[inbound]]\ntype = "eum-sms"\nwriteback = "UPDATE t SET optin = 0"',
            "must use :address",
        ),
        (
            '[[inbound]]\ntype = "eum-sms"\nwriteback = "UPDATE t SET o = 0 WHERE p = :address"\n'
            '[[inbound]]\ntype = "eum-sms"\nwriteback = "UPDATE t SET o = 0 WHERE p = :address"',
            "more than one entry",
        ),
        ('[audit]\ndeadline = "-1h"', "[audit] deadline"),
        ('[audit]\nretention = "4y"', "unknown key 'retention'"),
    ],
)
def test_a_mistake_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert message in str(caught.value)


def test_durations() -> None:
    assert parse_duration("500ms", "k") == 0.5
    assert parse_duration("90s", "k") == 90
    assert parse_duration("24h", "k") == 86400
    assert parse_duration(30, "k") == 30
    with pytest.raises(ConfigError, match="k = '1 week'"):
        parse_duration("1 week", "k")
