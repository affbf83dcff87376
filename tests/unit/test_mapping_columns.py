"""``check_columns``: a ``[[mapping]]`` rule against the columns its table really has."""

from __future__ import annotations

import pytest

from optsync.apply.columns import check_columns
from optsync.apply.mapping import MappingRule
from optsync.errors import ConfigError


def test_check_columns_names_the_key_and_ignores_other_tables() -> None:
    rule = MappingRule(
        "optin_status", address="phone", opt_in="optin", user_id="uid", attributes=("plan",)
    )
    tables = {("main", "optin_status"): ("uid", "phone", "optin", "plan")}
    check_columns([rule], tables)  # every column there: no error
    check_columns([rule], {("main", "other"): ("x",)})  # not its table: nothing to compare
    with pytest.raises(ConfigError, match=r"attributes names column 'plan'"):
        check_columns([rule], {("main", "optin_status"): ("uid", "phone", "optin")})
    with pytest.raises(ConfigError, match=r"user_id names column 'uid'"):
        check_columns([rule], {("main", "optin_status"): ("phone", "optin", "plan")})
    schema_bound = MappingRule("optin_status", address="phone", opt_in="optin", schema="app")
    check_columns([schema_bound], {("other", "optin_status"): ("x",)})  # another schema's table
