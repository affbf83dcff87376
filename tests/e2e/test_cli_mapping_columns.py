"""A mapping that names a column its table does not have stops the start (exit 2, one line),
instead of sending every row to the DLQ."""

from __future__ import annotations

import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest
from pinpoint_e2e import clean_env, optsync_command

pytestmark = pytest.mark.e2e


def test_optsync_run_refuses_a_mapping_column_the_table_lacks(tmp_path: Path) -> None:
    source = tmp_path / "app.db"
    with closing(sqlite3.connect(source)) as conn:
        conn.execute("CREATE TABLE optin_status (userid TEXT, phone TEXT, optin INTEGER)")
        conn.execute("INSERT INTO optin_status VALUES ('user1', '+12341111111', 1)")
        conn.commit()
    config = tmp_path / "optsync.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        f'[source]\nurl = "sqlite:///{source}"\ntables = ["optin_status"]\n'
        '[[mapping]]\ntable = "optin_status"\naddress = "phonenumber"\nopt_in = "optin"\n'
        'user_id = "userid"\n'
    )
    result = subprocess.run(
        [*optsync_command(), "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2, result
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert "'phonenumber'" in errors[0]
    assert "userid, phone, optin" in errors[0]  # the columns the table has
    assert "Traceback" not in result.stderr
