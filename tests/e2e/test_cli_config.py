"""What config cannot check itself is still refused at start: exit 2, one line naming the key.

``optsync.config`` holds plain values and imports no engine module; a segment's dimensions and a
mapping rule's endpoint id template are checked where their objects are made
(``optsync.backends.check_settings``), which every command that reads a config file runs first.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pinpoint_e2e import clean_env, optsync_command

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("role", "text", "fragment"),
    [
        (
            "apply",
            '[[mapping]]\ntable = "t"\naddress = "p"\nopt_in = "o"\n'
            '[[segment]]\nname = "A"\ndefinition = {Dimensions = {Location = 3}}\n',
            "[[segment]] 'A' definition: ",
        ),
        (
            "apply",
            '[[mapping]]\ntable = "t"\naddress = "p"\nopt_in = "o"\nendpoint_id = "{nope"\n',
            "[[mapping]] table = 't'",
        ),
        ("serve", "[stream]\npartition = 4\n", "[stream] has unknown key 'partition'"),
    ],
)
def test_a_config_refused_where_its_objects_are_made_exits_2(
    tmp_path: Path, role: str, text: str, fragment: str
) -> None:
    config = tmp_path / "optsync.toml"
    config.write_text(text)
    result = subprocess.run(
        [*optsync_command(), role, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert not (tmp_path / "optsync-data").exists()  # refused before anything was opened
