"""Start-up check of the ``[[mapping]]`` rules against the columns the source really has.

A rule that names a column its table lacks would send every row to the DLQ ("column
'phonenumber' (the address) is NULL or empty"); capture refuses to start instead, naming the
rule, the column and the columns the table has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from optsync.apply.mapping import MappingRule
from optsync.errors import ConfigError

__all__ = ("check_columns",)


def _needed(rule: MappingRule) -> list[tuple[str, str]]:
    """(column, the key that names it) of every column the rule reads."""
    needed = [(rule.address, "address"), (rule.opt_in, "opt_in")]
    if rule.user_id:
        needed.append((rule.user_id, "user_id"))
    if rule.effective_date:
        needed.append((rule.effective_date, "effective_date"))
    needed += [(c, "attributes") for c in rule.attributes]
    needed += [(c, "user_attributes") for c in rule.user_attributes]
    needed += [(c, "endpoint_id") for c in rule.id_columns]
    return needed


def check_columns(
    rules: Sequence[MappingRule], tables: Mapping[tuple[str, str], tuple[str, ...]]
) -> None:
    """Raise ``ConfigError`` for the first column a rule names that its table does not have.

    ``tables``: (schema, table) -> columns, as the source found them (``ChangeSource.
    table_columns``); a rule whose table is not there is left alone (nothing to compare with).
    """
    for rule in rules:
        for (schema, table), columns in sorted(tables.items()):
            if rule.table != table or rule.schema not in (None, schema):
                continue
            have = set(columns)
            for column, key in _needed(rule):
                if column not in have:
                    raise ConfigError(
                        f"[[mapping]] table = {rule.table!r}: {key} names column {column!r}, "
                        f"which {schema}.{table} does not have; its columns: "
                        f"{', '.join(columns)}"
                    )
