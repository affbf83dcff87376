"""The README's PostgreSQL and MySQL/MariaDB set-up, run as written on private servers, then
``optsync run --config examples/<source>.toml``: the blog's 9 → 5 → 4 with no step that is not
written down. (The servers' settings are the ones the README's ini blocks give: the private
servers start with them.)"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from example_run import ExampleRun
from mariadb_server import MariaDBServer, require_binaries
from postgres_server import running_server

pytestmark = pytest.mark.integration

README = Path(__file__).parents[2] / "README.md"


def sql_blocks() -> list[str]:
    text = README.read_text()
    start = text.index("\n## Capturing MySQL/MariaDB and PostgreSQL\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```sql\n(.*?)```", text[start:end], flags=re.S)


def statements(block: str) -> list[str]:
    """The block's statements, comments dropped."""
    lines = [line.split("--", 1)[0] for line in block.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def walk_the_blog(optsync: ExampleRun, execute: Callable[[str], object]) -> None:
    """The blog's statements through the application's own connection: 9 -> 5 -> 4."""
    optsync.wait_for_eligible(9)
    execute(
        "UPDATE optin_status SET optin = 0 WHERE userid IN ('user1', 'user2', 'user3', 'user4')"
    )
    optsync.wait_for_eligible(5)
    execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user5'")
    optsync.wait_for_eligible(4)


def test_the_readme_postgresql_steps_reach_9_5_4(tmp_path: Path) -> None:
    postgres_sql, _ = sql_blocks()
    with running_server() as server:
        server.sql("CREATE DATABASE app")
        with closing(server.connect(db="app")) as conn, conn.cursor() as cur:
            for statement in statements(postgres_sql):
                cur.execute(statement)
        example = "postgresql://optsync:secret@127.0.0.1:5432/app"
        with (
            closing(server.connect(db="app")) as app,
            app.cursor() as cur,
            ExampleRun(
                "postgres.toml", example, server.url("optsync", "secret", "app"), tmp_path
            ) as optsync,
        ):
            # The application's own UPDATEs work on the published table (replica identity).
            walk_the_blog(optsync, cur.execute)


def test_the_readme_mariadb_steps_reach_9_5_4(tmp_path: Path) -> None:
    require_binaries()
    _, mysql_sql = sql_blocks()
    with MariaDBServer.started() as server:
        server.execute(*statements(mysql_sql))
        example = "mariadb://optsync:secret@127.0.0.1:3306/blog_db"
        with (
            closing(server.connect("blog_db")) as app,
            app.cursor() as cur,
            ExampleRun(
                "mariadb.toml", example, server.url("optsync", "secret", "blog_db"), tmp_path
            ) as optsync,
        ):
            walk_the_blog(optsync, cur.execute)
