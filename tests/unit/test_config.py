import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from optsync.backends import check_settings, mapping_rules, segment_definition, store_settings
from optsync.config import PHONE_POLICIES, Settings, SourceSettings, load_settings, parse_mappings
from optsync.credentials import load_or_create_credentials
from optsync.engine.models import ChannelType
from optsync.engine.phone import PhonePolicy
from optsync.engine.segments import definition_from_wire, definition_to_wire
from optsync.errors import ConfigError


def test_defaults() -> None:
    settings = load_settings(None, env={})
    assert settings.api.host == "127.0.0.1"
    assert settings.api.port == 8080
    assert settings.data_dir == Path("optsync-data")
    assert settings.engine.derive_country
    assert settings.engine.phone_policy == "possible"
    assert store_settings(settings).country.enabled
    assert store_settings(settings).country.policy is PhonePolicy.POSSIBLE


def test_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "optsync.toml"
    path.write_text(
        'data_dir = "d"\n[api]\nlisten = "0.0.0.0:9000"\n'
        '[engine]\nphone_policy = "valid"\nderive_country = false\n'
    )
    settings = load_settings(path, env={"OPTSYNC_API_CREDENTIALS": "K1:s1, K2:s2"})
    assert settings.data_dir == Path("d")
    assert (settings.api.host, settings.api.port) == ("0.0.0.0", 9000)
    assert dict(settings.api.credentials) == {"K1": "s1", "K2": "s2"}
    assert store_settings(settings).country.policy is PhonePolicy.VALID
    assert not store_settings(settings).country.enabled
    overridden = load_settings(path, env={"OPTSYNC_API_LISTEN": "127.0.0.1:7000"})
    assert overridden.api.port == 7000


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[api]\nlisten = "nonsense"', "[api] listen"),
        ('[engine]\nphone_policy = "strict"', "[engine] phone_policy"),
        ("[engine]\nderive_country = 1", "[engine] derive_country"),
        ('[engine]\nstore = "oracle://x"', "[engine] store"),
        ("data_dir = [", "not valid TOML"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "optsync.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert fragment in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


def test_credentials_created_once(tmp_path: Path) -> None:
    first, created = load_or_create_credentials(tmp_path)
    again, created_again = load_or_create_credentials(tmp_path)
    assert created and not created_again
    assert first == again and len(first) == 1
    assert (tmp_path / "credentials").stat().st_mode & 0o777 == 0o600


def test_source_url_password_is_redacted_for_banners() -> None:
    source = SourceSettings(url="mariadb://optsync:s3cret@db:3306/blog_db", tables=("t",))
    assert source.redacted_url == "mariadb://optsync:***@db:3306/blog_db"
    assert "s3cret" not in source.redacted_url
    plain = SourceSettings(url="sqlite:///optsync-data/app.db", tables=("t",))
    assert plain.redacted_url == "sqlite:///optsync-data/app.db"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:S3cretPW@[::1]x/db",  # libpq quoted this whole, password included
        "postgresq://u:S3cretPW@h/db",  # a typo in the scheme
        "mysql://u:S3cretPW@db:port/app",
        "postgresql://h/db?password=S3cretPW",
    ],
)
def test_source_url_errors_never_repeat_the_password(tmp_path: Path, url: str) -> None:
    """Found in review: the error quoted the URL as given, password and all."""
    path = tmp_path / "optsync.toml"
    path.write_text(f'[source]\nurl = "{url}"\ntables = ["t"]\n')
    try:
        settings = load_settings(path, env={})
    except ConfigError as exc:
        assert "S3cretPW" not in str(exc)
        assert "[source] url" in str(exc)
    else:  # a URL that parses: its banner form hides the password
        assert settings.source is not None
        assert "S3cretPW" not in settings.source.redacted_url


def test_credentials_of_the_wrong_type_are_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "optsync.toml"
    path.write_text('[api]\ncredentials = ["AKID:SuperSecret1"]\n')
    with pytest.raises(ConfigError, match=r"\[api\] credentials") as info:
        load_settings(path, env={})
    assert "SuperSecret1" not in str(info.value)


def test_unreadable_config_files_are_config_errors(tmp_path: Path) -> None:
    """Found in review: these ended in a traceback and exit code 1."""
    with pytest.raises(ConfigError, match="is a folder"):
        load_settings(tmp_path, env={})
    latin = tmp_path / "latin1.toml"
    latin.write_bytes('data_dir = "donn\xe9es"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(latin, env={})
    listed = tmp_path / "listed.toml"
    listed.write_text("mapping = [1]\n")
    with pytest.raises(ConfigError, match=r"\[\[mapping\]\] #1 must be a table"):
        load_settings(listed, env={})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[engin]\nurl = "sqlite:///x.db"\n', "unknown section 'engin'"),
        ('data_dri = "d"\n', "unknown key 'data_dri'"),
        ('[[sinks]]\nname = "x"\n', "unknown section 'sinks'"),
        ('[engine]\nstorre = "sqlite"\n', "[engine] has unknown key 'storre'"),
        ('[api]\nlisten_on = "127.0.0.1:1"\n', "[api] has unknown key 'listen_on'"),
        ("[stream]\npartition = 4\n", "[stream] has unknown key 'partition'"),
        (
            '[[segment]]\nname = "US"\ncountry = "US"\ncuntry = "CA"\n',
            "[[segment]] #1 has unknown key 'cuntry'",
        ),
    ],
)
def test_unknown_keys_and_sections_are_refused(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "optsync.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert fragment in str(info.value)
    assert "fix the spelling" in str(info.value)


def test_engine_and_stream_urls_select_backends(tmp_path: Path) -> None:
    path = tmp_path / "optsync.toml"
    path.write_text(
        '[engine]\nurl = "postgresql://optsync:pw@db:5432/engine"\n'
        '[stream]\nurl = "nats://nats:4222"\nname = "consent"\npartitions = 16\nreplicas = 3\n'
        '[api]\nconsole_secret = "0123456789abcdef0123"\n'
    )
    settings = load_settings(path, env={})
    assert settings.engine_scheme == "postgresql"
    assert settings.redacted_engine_url == "postgresql://optsync:***@db:5432/engine"
    assert settings.stream.scheme == "nats"
    assert (settings.stream.name, settings.stream.partitions) == ("consent", 16)
    assert settings.stream.replicas == 3
    assert settings.api.console_secret == "0123456789abcdef0123"
    defaults = load_settings(None, env={})
    assert defaults.engine_scheme == "sqlite"
    assert defaults.engine_path == Path("optsync-data/engine.db")
    assert defaults.stream.scheme == "embedded"
    assert defaults.stream.partitions is None
    sqlite_url = load_settings(None, env={"OPTSYNC_ENGINE_URL": "sqlite:///elsewhere/e.db"})
    assert sqlite_url.engine_path == Path("elsewhere/e.db")
    from_env = load_settings(
        None, env={"OPTSYNC_STREAM_URL": "nats://127.0.0.1:1", "OPTSYNC_CONSOLE_SECRET": "x" * 20}
    )
    assert from_env.stream.scheme == "nats"
    assert from_env.api.console_secret == "x" * 20


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[engine]\nurl = "oracle://u:S3cretPW@h/db"\n', "[engine] url"),
        ('[engine]\nurl = "postgresql://u:S3cretPW@h:port/db"\n', "[engine] url"),
        ('[engine]\nstore = "postgresql"\n', "needs [engine] url"),
        (
            '[engine]\nstore = "sqlite"\nurl = "postgresql://u:S3cretPW@h/db"\n',
            "does not match",
        ),
        ('[stream]\nurl = "kafka://h:9092"\n', "[stream] url"),
        ('[stream]\nurl = "nats://h:port"\n', "[stream] url"),
        ("[stream]\npartitions = 0\n", "[stream] partitions"),
        ("[stream]\npartitions = true\n", "[stream] partitions"),
        ('[stream]\nname = "a.b"\n', "[stream] name"),
        ("[stream]\nreplicas = 2\n", "[stream] replicas"),
        ('[api]\nconsole_secret = "short"\n', "console_secret"),
    ],
)
def test_backend_url_errors_name_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "optsync.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert fragment in str(info.value)
    assert "S3cretPW" not in str(info.value)


US_DIMENSIONS = {"Location": {"Country": {"DimensionType": "INCLUSIVE", "Values": ["US"]}}}


def test_segments_and_channels_in_both_forms(tmp_path: Path) -> None:
    path = tmp_path / "optsync.toml"
    path.write_text(
        '[engine]\nchannels = ["sms", "EMAIL", "SMS"]\n\n'
        '[[segment]]\nname = "US-Segment"\ncountry = "US"\n\n'
        '[[segment]]\nname = "US-long"\n'
        'definition = {Dimensions = {Location = {Country = {DimensionType = "INCLUSIVE", '
        'Values = ["US"]}}}}\n'
    )
    settings = load_settings(path, env={})
    assert settings.channels == (ChannelType.SMS, ChannelType.EMAIL)
    assert [s.name for s in settings.segments] == ["US-Segment", "US-long"]
    wanted = definition_from_wire({"Name": "x", "Dimensions": US_DIMENSIONS}, require_name=True)
    for segment in settings.segments:
        definition = segment_definition(segment)
        assert definition.name == segment.name
        assert definition_to_wire(definition) == definition_to_wire(wanted)
    assert load_settings(None, env={}).segments == ()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[[segment]]\ncountry = "US"\n', "needs name"),
        ('[[segment]]\nname = "A"\n', "needs either country"),
        (
            '[[segment]]\nname = "A"\ncountry = "US"\ndefinition = {Dimensions = {}}\n',
            "needs either country",
        ),
        (
            '[[segment]]\nname = "A"\ncountry = "US"\n[[segment]]\nname = "A"\ncountry = "CA"\n',
            "declared twice",
        ),
        ('[segment]\nname = "A"\n', "write [[segment]], not [segment]"),
        (
            '[[segment]]\nname = "A"\ndefinition = {Dimensions = {Location = 3}}\n',
            "[[segment]] 'A' definition: ",
        ),
        ('[engine]\nchannels = ["SMSS"]\n', "'SMSS' is no channel type"),
        ('[engine]\nchannels = "SMS"\n', "[engine] channels must list"),
    ],
)
def test_segment_and_channel_errors_name_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    """The segment's dimensions are checked by the engine's own reader, in ``check_settings``,
    which the CLI runs right after ``load_settings``."""
    path = tmp_path / "optsync.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        check_settings(load_settings(path, env={}))
    assert fragment in str(info.value)


def test_defaults_live_in_the_settings_structs() -> None:
    """Nothing in the file: every value is the Struct's own field default."""
    loaded = load_settings(None, env={})
    assert msgspec.structs.replace(loaded, serve_api=True) == Settings()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            '[[mapping]]\ntable = "t"\naddress = "p"\nopt_in = "o"\nadress = "x"\n',
            "#1 has unknown key 'adress'",
        ),
        ('[[mapping]]\ntable = "t"\naddress = "p"\n', "[[mapping]] #1 needs opt_in"),
        ('[[mapping]]\ntable = "t"\naddress = "p"\nopt_in = ""\n', "[[mapping]] #1 needs opt_in"),
        (
            '[[mapping]]\ntable = "t"\naddress = "p"\nopt_in = "o"\nchannel = "FAX"\n',
            "channel = 'FAX'",
        ),
        (
            '[[mapping]]\ntable = "t"\naddress = "p"\nopt_in = "o"\nattributes = "a"\n',
            "[[mapping]] #1 attributes must be a list",
        ),
        (
            '[[mapping]]\ntable = "t"\naddress = "p"\nopt_in = "o"\nphone_policy = "any"\n',
            "[[mapping]] #1 phone_policy",
        ),
        (
            '[source]\nurl = "sqlite:///a.db"\ntables = ["t"]\nslots = "s"\n',
            "[source] has unknown key 'slots'",
        ),
        (
            '[source]\nurl = "sqlite:///a.db"\ntables = ["t"]\nserver_id = "7"\n',
            "[source] server_id must be an int, not a str",
        ),
        ("data_dir = 3\n", "data_dir must be a str, not an int"),
        ("engine = 3\n", "[engine] must be a table, not an int"),
        ('[stream]\nurl = "kinesis://s"\nregion = 1\n', "[stream] region must be a str"),
    ],
)
def test_the_structs_errors_name_the_key_and_never_the_value(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = tmp_path / "optsync.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
    assert "$." not in str(info.value)  # msgspec's paths are translated into the file's words


def test_a_rule_the_mapping_refuses_is_refused_at_start(tmp_path: Path) -> None:
    """config cannot check an endpoint id template (that is the mapping's); check_settings does,
    so ``optsync run`` still stops at start naming the rule."""
    path = tmp_path / "optsync.toml"
    path.write_text(
        '[[mapping]]\ntable = "t"\naddress = "p"\nopt_in = "o"\nendpoint_id = "{nope"\n'
    )
    settings = load_settings(path, env={})
    with pytest.raises(ConfigError, match=r"\[\[mapping\]\] table = 't'"):
        check_settings(settings)


def test_mapping_rules_keep_what_the_file_says() -> None:
    (rule,) = mapping_rules(
        parse_mappings(
            [
                {
                    "table": "t",
                    "channel": "email",
                    "address": "mail",
                    "opt_in": "o",
                    "opt_in_true": ["Y", 1, True],
                    "attributes": ["plan"],
                }
            ],
            policy="valid",
        )
    )
    assert rule.channel is ChannelType.EMAIL
    assert rule.phone_policy is PhonePolicy.VALID  # the engine's policy when the rule has none
    assert rule.opt_in_true == frozenset({"y", "1", "true"})
    assert rule.attributes == ("plan",)
    with pytest.raises(ConfigError, match="#1 has unknown key 'adress'"):
        parse_mappings([{"table": "t", "adress": "p", "opt_in": "o"}])


def test_phone_policies_are_the_engines() -> None:
    assert tuple(p.value for p in PhonePolicy) == PHONE_POLICIES


def test_config_imports_no_engine_api_or_apply_module() -> None:
    """config holds plain values; the engine's and apply's objects are made in backends."""
    code = (
        "import sys, optsync.config\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('optsync'))))\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    allowed = {
        "optsync",
        "optsync.config",
        "optsync.credentials",
        "optsync.engine",  # the package's __init__: a docstring
        "optsync.engine.models",  # ChannelType
        "optsync.errors",
        "optsync.redaction",
        "optsync.sinks",
        "optsync.sinks.settings",
    }
    assert "optsync.config" in found
    assert set(found) <= allowed, set(found) - allowed


def test_apply_mapping_process_is_read_and_unknown_apply_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "optsync.toml"
    path.write_text("[apply]\nmapping_process = false\n")
    assert load_settings(path, env={}).apply.mapping_process is False
    assert load_settings(None, env={}).apply.mapping_process is None  # auto: by core count
    path.write_text("[apply]\nmapping_processes = false\n")
    with pytest.raises(ConfigError, match=r"\[apply\].*mapping_processes"):
        load_settings(path, env={})
