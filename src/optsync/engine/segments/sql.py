"""Segment definitions as SQL: one boolean expression over ``endpoints`` (alias ``e``), bound
parameters only; and the driven form that starts from the attribute index."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from optsync.engine.countries import to_alpha2
from optsync.engine.segments.model import (
    DEMOGRAPHIC_COLUMNS,
    MAX_SOURCE_DEPTH,
    AttributeDimension,
    AttributeType,
    Combine,
    DimensionType,
    MetricOperator,
    SegmentDefinition,
    SegmentDimensions,
    SegmentGroup,
    SegmentGroupList,
    SetDimension,
    iso_instant_ms,
)
from optsync.errors import InvalidRequest

__all__ = (
    "CompiledFilter",
    "Dialect",
    "DrivenFilter",
    "SourceResolver",
    "combine",
    "compile_driven",
    "compile_filter",
    "compile_segment",
)

_METRIC_SQL = {
    MetricOperator.GREATER_THAN: ">",
    MetricOperator.LESS_THAN: "<",
    MetricOperator.GREATER_THAN_OR_EQUAL: ">=",
    MetricOperator.LESS_THAN_OR_EQUAL: "<=",
    MetricOperator.EQUAL: "=",
}


@dataclass(frozen=True)
class Dialect:
    """The few SQL spellings that differ between stores."""

    contains: str = "instr({column}, ?) > 0"
    """A case-sensitive substring test of ``column`` against one parameter."""
    greatest: str = "max"
    """The scalar maximum of its arguments (SQLite's two-argument ``max``, SQL's GREATEST)."""


SourceResolver = Callable[[str, int | None], SegmentDefinition]
"""Looks up a source segment by id and optional version (raises NotFound)."""


@dataclass
class _Sql:
    app_id: str
    dialect: Dialect
    resolve: SourceResolver
    params: list[Any] = field(default_factory=list)
    columns: set[str] = field(default_factory=set)
    """Columns of ``endpoints`` the filter reads."""
    side_tables: bool = False
    """The filter reads endpoint_attributes or endpoint_metrics."""

    def bind(self, *values: Any) -> str:
        self.params.extend(values)
        return ", ".join("?" for _ in values)

    def set_filter(self, column: str, dim: SetDimension, values: Sequence[str]) -> str:
        marks = self.bind(*values)
        self.columns.add(column.removeprefix("e."))
        if dim.dimension_type is DimensionType.INCLUSIVE:
            # IS NOT NULL keeps the result two-valued, so NOT (...) in a NONE group is exact.
            return f"({column} IS NOT NULL AND {column} IN ({marks}))"
        return f"({column} IS NULL OR {column} NOT IN ({marks}))"

    def attribute_condition(self, alias: str, kind: str, name: str, dim: AttributeDimension) -> str:
        """The rows of ``endpoint_attributes {alias}`` whose value satisfies ``dim``
        (EXCLUSIVE as if INCLUSIVE: the caller negates)."""
        head = (
            f"{alias}.app_id = {self.bind(self.app_id)} AND {alias}.kind = {self.bind(kind)} "
            f"AND {alias}.name = {self.bind(name)} AND "
        )
        t = dim.attribute_type
        if t in (AttributeType.INCLUSIVE, AttributeType.EXCLUSIVE):
            return head + f"{alias}.value IN ({self.bind(*dim.values)})"
        if t is AttributeType.CONTAINS:
            parts = []
            for v in dim.values:
                parts.append(self.dialect.contains.format(column=f"{alias}.value"))
                self.params.append(v)
            return head + "(" + " OR ".join(parts) + ")"
        instants = [iso_instant_ms(v) for v in dim.values]
        assert all(i is not None for i in instants)  # checked when the segment was written
        ts = f"{alias}.value_ts"
        if t is AttributeType.BEFORE:
            return head + f"{ts} < {self.bind(instants[0])}"
        if t is AttributeType.AFTER:
            return head + f"{ts} > {self.bind(instants[0])}"
        if t is AttributeType.ON:
            day = datetime.fromtimestamp((instants[0] or 0) / 1000, UTC).replace(
                hour=0, minute=0, second=0, microsecond=0
            )
            start = int(day.timestamp() * 1000)
            end = int((day + timedelta(days=1)).timestamp() * 1000)
            return head + f"{ts} >= {self.bind(start)} AND {ts} < {self.bind(end)}"
        low, high = sorted(i or 0 for i in instants)
        return head + f"{ts} BETWEEN {self.bind(low)} AND {self.bind(high)}"

    def attribute_filter(self, kind: str, name: str, dim: AttributeDimension) -> str:
        self.side_tables = True
        sql = (
            "e.pk IN (SELECT a.endpoint_pk FROM endpoint_attributes a WHERE "
            f"{self.attribute_condition('a', kind, name, dim)})"
        )
        return f"NOT ({sql})" if dim.attribute_type is AttributeType.EXCLUSIVE else sql

    def dimensions(self, d: SegmentDimensions) -> str:
        parts: list[str] = []
        if d.country is not None:
            codes = [to_alpha2(c) or c.upper() for c in d.country.values]
            parts.append(self.set_filter("e.country_code", d.country, codes))
        for name, dim in d.demographic.items():
            if name == "DeviceType":
                as_attribute = AttributeDimension(
                    values=dim.values, attribute_type=AttributeType(dim.dimension_type.value)
                )
                parts.append(self.attribute_filter("A", "DeviceType", as_attribute))
            else:
                column = "e." + DEMOGRAPHIC_COLUMNS[name]
                values = [v.upper() for v in dim.values] if name == "Channel" else dim.values
                parts.append(self.set_filter(column, dim, values))
        for name, adim in d.attributes.items():
            parts.append(self.attribute_filter("A", name, adim))
        for name, adim in d.user_attributes.items():
            parts.append(self.attribute_filter("U", name, adim))
        for name, mdim in d.metrics.items():
            self.side_tables = True
            parts.append(
                "e.pk IN (SELECT m.endpoint_pk FROM endpoint_metrics m WHERE m.app_id = "
                f"{self.bind(self.app_id)} AND m.name = {self.bind(name)} AND m.value "
                f"{_METRIC_SQL[mdim.operator]} {self.bind(mdim.value)})"
            )
        return " AND ".join(f"({p})" for p in parts) if parts else "1 = 1"

    def definition(self, definition: SegmentDefinition, depth: int) -> str:
        if depth > MAX_SOURCE_DEPTH:
            raise InvalidRequest(
                f"SourceSegments nest deeper than {MAX_SOURCE_DEPTH} levels (or refer to "
                "each other in a cycle); flatten the segment definitions"
            )
        if definition.members is not None:
            self.columns.add("id_key")
            self.side_tables = True
            return (
                "e.id_key IN (SELECT m.id_key FROM segment_members m WHERE m.app_id = "
                f"{self.bind(self.app_id)} AND m.segment_id = {self.bind(definition.members)})"
            )
        if definition.groups is not None:
            return self.groups(definition.groups, depth)
        if definition.dimensions is not None:
            return self.dimensions(definition.dimensions)
        return "1 = 1"

    def groups(self, groups: SegmentGroupList, depth: int) -> str:
        parts = [self.group(g, depth) for g in groups.groups]
        return combine(parts, groups.include)

    def group(self, group: SegmentGroup, depth: int) -> str:
        base = "1 = 1"
        if group.source_segments:
            sources = [
                self.definition(self.resolve(s.id, s.version), depth + 1)
                for s in group.source_segments
            ]
            base = combine(sources, group.source_type)
        dims = [self.dimensions(d) for d in group.dimensions]
        if not dims:
            return base
        return f"({base}) AND ({combine(dims, group.type)})"


def combine(parts: Sequence[str], how: Combine) -> str:
    """Join boolean SQL expressions with ALL (AND), ANY (OR) or NONE (NOT OR)."""
    if not parts:
        return "1 = 1"
    joined = [f"({p})" for p in parts]
    if how is Combine.ALL:
        return " AND ".join(joined)
    if how is Combine.ANY:
        return " OR ".join(joined)
    return "NOT (" + " OR ".join(joined) + ")"


@dataclass(frozen=True)
class CompiledFilter:
    """A segment as one SQL boolean expression over ``endpoints e``, with what it reads."""

    sql: str
    params: list[Any]
    columns: frozenset[str]
    """Columns of ``endpoints`` the expression reads."""
    side_tables: bool
    """True when it reads endpoint_attributes or endpoint_metrics."""

    def reads_only(self, columns: frozenset[str]) -> bool:
        """The expression can run on any table that has these columns (e.g. a rollup)."""
        return not self.side_tables and self.columns <= columns


def compile_segment(
    definition: SegmentDefinition,
    *,
    app_id: str,
    resolve: SourceResolver,
    dialect: Dialect | None = None,
) -> CompiledFilter:
    """Translate a segment definition (and its source segments) to SQL."""
    sql = _Sql(app_id=app_id, dialect=dialect or Dialect(), resolve=resolve)
    text = sql.definition(definition, 0)
    return CompiledFilter(text, sql.params, frozenset(sql.columns), sql.side_tables)


@dataclass(frozen=True)
class DrivenFilter:
    """A segment split for counting from the attribute table: one attribute condition that
    every match must meet (the driver, over ``endpoint_attributes d``) and the rest."""

    driver_sql: str
    driver_params: list[Any]
    distinct: bool
    """One endpoint can match the driver with several rows: count it once."""
    rest: CompiledFilter


def _without(dims: SegmentDimensions, kind: str, name: str) -> SegmentDimensions:
    if kind == "A":
        kept = {k: v for k, v in dims.attributes.items() if k != name}
        return dataclasses.replace(dims, attributes=kept)
    kept = {k: v for k, v in dims.user_attributes.items() if k != name}
    return dataclasses.replace(dims, user_attributes=kept)


def _driver_in(dims: SegmentDimensions) -> tuple[str, str, AttributeDimension] | None:
    for kind, attrs in (("A", dims.attributes), ("U", dims.user_attributes)):
        for name, dim in attrs.items():
            if dim.attribute_type is not AttributeType.EXCLUSIVE:
                return kind, name, dim
    return None


def _split(
    definition: SegmentDefinition,
) -> tuple[tuple[str, str, AttributeDimension], SegmentDefinition] | None:
    """A positive attribute dimension that the whole filter requires, and the filter without it."""
    if definition.groups is None:
        dims = definition.dimensions
        found = _driver_in(dims) if dims is not None else None
        if dims is None or found is None:
            return None
        return found, dataclasses.replace(definition, dimensions=_without(dims, *found[:2]))
    groups = definition.groups
    if groups.include is Combine.NONE or (
        groups.include is Combine.ANY and len(groups.groups) != 1
    ):
        return None
    for gi, group in enumerate(groups.groups):
        if group.type is Combine.NONE or (group.type is Combine.ANY and len(group.dimensions) != 1):
            continue
        for di, dims in enumerate(group.dimensions):
            found = _driver_in(dims)
            if found is None:
                continue
            kept = list(group.dimensions)
            kept[di] = _without(dims, *found[:2])
            new_groups = list(groups.groups)
            new_groups[gi] = dataclasses.replace(group, dimensions=tuple(kept))
            rest = dataclasses.replace(
                definition, groups=dataclasses.replace(groups, groups=tuple(new_groups))
            )
            return found, rest
    return None


def compile_driven(
    definition: SegmentDefinition,
    *,
    app_id: str,
    resolve: SourceResolver,
    dialect: Dialect | None = None,
) -> DrivenFilter | None:
    """Split off a driving attribute condition, or None when the filter has none."""
    split = _split(definition)
    if split is None:
        return None
    (kind, name, dim), rest = split
    sql = _Sql(app_id=app_id, dialect=dialect or Dialect(), resolve=resolve)
    driver = sql.attribute_condition("d", kind, name, dim)
    single = dim.attribute_type is AttributeType.INCLUSIVE and len(set(dim.values)) == 1
    return DrivenFilter(
        driver_sql=driver,
        driver_params=sql.params,
        distinct=not single,
        rest=compile_segment(rest, app_id=app_id, resolve=resolve, dialect=dialect),
    )


def compile_filter(
    definition: SegmentDefinition,
    *,
    app_id: str,
    resolve: SourceResolver,
    dialect: Dialect | None = None,
) -> tuple[str, list[Any]]:
    """One SQL boolean expression over ``endpoints e`` with its ``?`` parameters."""
    compiled = compile_segment(definition, app_id=app_id, resolve=resolve, dialect=dialect)
    return compiled.sql, compiled.params
