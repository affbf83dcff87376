"""Segments: dimensional filters, their Pinpoint JSON form, and their translation to SQL.

A segment is evaluated by the database, never by loading endpoints into Python: ``compile_filter``
turns a definition into one SQL boolean expression over the ``endpoints`` table (alias ``e``),
with bound parameters only. Semantics:

- all dimensions inside one ``SegmentDimensions`` must match (AND);
- ``SetDimension`` INCLUSIVE: the value is one of ``Values``; EXCLUSIVE: it is not (an endpoint
  without the field matches EXCLUSIVE);
- ``Location.Country`` accepts alpha-2 and alpha-3 codes alike ("US" and "USA");
- ``Attributes``/``UserAttributes``: INCLUSIVE (any stored value equals any given value),
  EXCLUSIVE (none does), CONTAINS (case-sensitive substring), BEFORE/AFTER/ON/BETWEEN (the
  stored value read as an ISO-8601 instant; ON compares the UTC date, BETWEEN is inclusive);
- ``Demographic.DeviceType`` has no endpoint field in Pinpoint's model: it matches the custom
  endpoint attribute ``DeviceType``;
- ``SegmentGroups``: each group is its source segments (ANY: union, ALL: intersection; none:
  every endpoint of the app) AND its dimensions combined by ``Type`` (ALL/ANY/NONE); the groups
  are combined by ``Include`` (ALL/ANY/NONE);
- an IMPORT segment (``SegmentDefinition.members``), alone or as a source segment, matches the
  endpoints whose id is in its member list (``segment_members``), compared case-insensitively.

Not supported, refused with a 400 naming the field: ``Location.GPSPoint`` and ``Behavior``
(optsync keeps no session data to evaluate recency).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from optsync.engine.countries import to_alpha2
from optsync.errors import InvalidRequest

__all__ = (
    "AttributeDimension",
    "AttributeType",
    "Combine",
    "Dialect",
    "DimensionType",
    "MetricDimension",
    "MetricOperator",
    "SegmentDefinition",
    "SegmentDimensions",
    "SegmentGroup",
    "SegmentGroupList",
    "SetDimension",
    "SourceSegment",
    "CompiledFilter",
    "DrivenFilter",
    "compile_driven",
    "compile_filter",
    "compile_segment",
    "definition_from_wire",
    "definition_to_wire",
    "iso_instant_ms",
)

MAX_DIMENSIONS = 100
MAX_SOURCE_DEPTH = 5


class DimensionType(StrEnum):
    INCLUSIVE = "INCLUSIVE"
    EXCLUSIVE = "EXCLUSIVE"


class AttributeType(StrEnum):
    INCLUSIVE = "INCLUSIVE"
    EXCLUSIVE = "EXCLUSIVE"
    CONTAINS = "CONTAINS"
    BEFORE = "BEFORE"
    AFTER = "AFTER"
    ON = "ON"
    BETWEEN = "BETWEEN"


class MetricOperator(StrEnum):
    GREATER_THAN = "GREATER_THAN"
    LESS_THAN = "LESS_THAN"
    GREATER_THAN_OR_EQUAL = "GREATER_THAN_OR_EQUAL"
    LESS_THAN_OR_EQUAL = "LESS_THAN_OR_EQUAL"
    EQUAL = "EQUAL"


class Combine(StrEnum):
    ALL = "ALL"
    ANY = "ANY"
    NONE = "NONE"


_METRIC_SQL = {
    MetricOperator.GREATER_THAN: ">",
    MetricOperator.LESS_THAN: "<",
    MetricOperator.GREATER_THAN_OR_EQUAL: ">=",
    MetricOperator.LESS_THAN_OR_EQUAL: "<=",
    MetricOperator.EQUAL: "=",
}

# Demographic dimension name -> endpoints column.
DEMOGRAPHIC_COLUMNS = {
    "AppVersion": "app_version",
    "Channel": "channel_type",
    "Make": "make",
    "Model": "model",
    "Platform": "platform",
}


@dataclass(frozen=True)
class SetDimension:
    values: tuple[str, ...]
    dimension_type: DimensionType = DimensionType.INCLUSIVE


@dataclass(frozen=True)
class AttributeDimension:
    values: tuple[str, ...]
    attribute_type: AttributeType = AttributeType.INCLUSIVE


@dataclass(frozen=True)
class MetricDimension:
    operator: MetricOperator
    value: float


@dataclass(frozen=True)
class SegmentDimensions:
    attributes: Mapping[str, AttributeDimension] = field(default_factory=dict)
    user_attributes: Mapping[str, AttributeDimension] = field(default_factory=dict)
    metrics: Mapping[str, MetricDimension] = field(default_factory=dict)
    demographic: Mapping[str, SetDimension] = field(default_factory=dict)
    country: SetDimension | None = None


@dataclass(frozen=True)
class SourceSegment:
    id: str
    version: int | None = None


@dataclass(frozen=True)
class SegmentGroup:
    dimensions: tuple[SegmentDimensions, ...] = ()
    source_segments: tuple[SourceSegment, ...] = ()
    source_type: Combine = Combine.ANY
    type: Combine = Combine.ALL


@dataclass(frozen=True)
class SegmentGroupList:
    groups: tuple[SegmentGroup, ...] = ()
    include: Combine = Combine.ALL


@dataclass(frozen=True)
class SegmentDefinition:
    """What a WriteSegmentRequest says: a name and either dimensions or groups."""

    name: str | None = None
    dimensions: SegmentDimensions | None = None
    groups: SegmentGroupList | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    members: str | None = None
    """Set by the store, never read from the wire: the id of the IMPORT segment whose member
    list this definition is (a static segment has no filter; it matches its members)."""


# ---------------------------------------------------------------------------------------------
# Pinpoint JSON -> definition


def _obj(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{path} must be a JSON object")
    return value


def _str_list(value: Any, path: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{path} must be a list of strings")
    if not value and not allow_empty:
        raise InvalidRequest(f"{path} must hold at least one value")
    return tuple(value)


_E = TypeVar("_E", bound=StrEnum)


def _enum(cls: type[_E], value: Any, path: str, default: _E | None = None) -> _E:
    if value is None and default is not None:
        return default
    try:
        return cls(value)
    except ValueError:
        allowed = " | ".join(m.value for m in cls)
        raise InvalidRequest(f"{path} must be one of {allowed}, not {value!r}") from None


def _set_dimension(value: Any, path: str) -> SetDimension:
    obj = _obj(value, path)
    return SetDimension(
        values=_str_list(obj.get("Values"), f"{path}.Values"),
        dimension_type=_enum(
            DimensionType,
            obj.get("DimensionType"),
            f"{path}.DimensionType",
            DimensionType.INCLUSIVE,
        ),
    )


def _attribute_dimension(value: Any, path: str) -> AttributeDimension:
    obj = _obj(value, path)
    kind = _enum(
        AttributeType, obj.get("AttributeType"), f"{path}.AttributeType", AttributeType.INCLUSIVE
    )
    values = _str_list(obj.get("Values"), f"{path}.Values")
    if kind in (AttributeType.BEFORE, AttributeType.AFTER, AttributeType.ON) and len(values) != 1:
        raise InvalidRequest(f"{path}.Values must hold exactly one date for {kind}")
    if kind is AttributeType.BETWEEN and len(values) != 2:
        raise InvalidRequest(f"{path}.Values must hold exactly two dates for BETWEEN")
    if kind in (AttributeType.BEFORE, AttributeType.AFTER, AttributeType.ON, AttributeType.BETWEEN):
        for i, v in enumerate(values):
            if iso_instant_ms(v) is None:
                raise InvalidRequest(
                    f"{path}.Values[{i}] must be an ISO-8601 date or instant, e.g. "
                    f"2026-01-31T00:00:00Z, not {v!r}"
                )
    return AttributeDimension(values=values, attribute_type=kind)


def _attribute_map(value: Any, path: str) -> dict[str, AttributeDimension]:
    if value is None:
        return {}
    return {k: _attribute_dimension(v, f"{path}.{k}") for k, v in _obj(value, path).items()}


def _dimensions(value: Any, path: str) -> SegmentDimensions:
    obj = _obj(value, path)
    for key in obj:
        if key not in {"Attributes", "UserAttributes", "Metrics", "Demographic", "Location"}:
            if key == "Behavior":
                raise InvalidRequest(
                    f"{path}.Behavior is not supported by optsync (it keeps no session data); "
                    "remove it or use an attribute that holds the last-activity date"
                )
            raise InvalidRequest(f"{path}.{key} is not a segment dimension")
    metrics: dict[str, MetricDimension] = {}
    for name, raw in _obj(obj.get("Metrics") or {}, f"{path}.Metrics").items():
        m = _obj(raw, f"{path}.Metrics.{name}")
        number = m.get("Value")
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise InvalidRequest(f"{path}.Metrics.{name}.Value must be a number")
        metrics[name] = MetricDimension(
            operator=_enum(
                MetricOperator,
                m.get("ComparisonOperator"),
                f"{path}.Metrics.{name}.ComparisonOperator",
            ),
            value=float(number),
        )
    demographic: dict[str, SetDimension] = {}
    for name, raw in _obj(obj.get("Demographic") or {}, f"{path}.Demographic").items():
        if name not in (*DEMOGRAPHIC_COLUMNS, "DeviceType"):
            allowed = ", ".join((*DEMOGRAPHIC_COLUMNS, "DeviceType"))
            raise InvalidRequest(f"{path}.Demographic.{name} is not one of {allowed}")
        demographic[name] = _set_dimension(raw, f"{path}.Demographic.{name}")
    country: SetDimension | None = None
    location = _obj(obj.get("Location") or {}, f"{path}.Location")
    for key, raw in location.items():
        if key == "Country":
            country = _set_dimension(raw, f"{path}.Location.Country")
            for i, code in enumerate(country.values):
                if to_alpha2(code) is None:
                    raise InvalidRequest(
                        f"{path}.Location.Country.Values[{i}]: {code!r} is not an ISO 3166-1 "
                        "alpha-2 or alpha-3 country code (e.g. US or USA)"
                    )
        elif key == "GPSPoint":
            raise InvalidRequest(
                f"{path}.Location.GPSPoint is not supported by optsync; filter on "
                "Location.Country or an attribute instead"
            )
        else:
            raise InvalidRequest(f"{path}.Location.{key} is not a location dimension")
    return SegmentDimensions(
        attributes=_attribute_map(obj.get("Attributes"), f"{path}.Attributes"),
        user_attributes=_attribute_map(obj.get("UserAttributes"), f"{path}.UserAttributes"),
        metrics=metrics,
        demographic=demographic,
        country=country,
    )


def _group(value: Any, path: str) -> SegmentGroup:
    obj = _obj(value, path)
    dims = obj.get("Dimensions") or []
    if not isinstance(dims, list):
        raise InvalidRequest(f"{path}.Dimensions must be a list")
    sources = obj.get("SourceSegments") or []
    if not isinstance(sources, list):
        raise InvalidRequest(f"{path}.SourceSegments must be a list")
    refs: list[SourceSegment] = []
    for i, raw in enumerate(sources):
        src = _obj(raw, f"{path}.SourceSegments[{i}]")
        sid = src.get("Id")
        if not isinstance(sid, str) or not sid:
            raise InvalidRequest(f"{path}.SourceSegments[{i}].Id is required")
        version = src.get("Version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise InvalidRequest(f"{path}.SourceSegments[{i}].Version must be an integer")
        refs.append(SourceSegment(id=sid, version=version))
    return SegmentGroup(
        dimensions=tuple(_dimensions(d, f"{path}.Dimensions[{i}]") for i, d in enumerate(dims)),
        source_segments=tuple(refs),
        source_type=_enum(Combine, obj.get("SourceType"), f"{path}.SourceType", Combine.ANY),
        type=_enum(Combine, obj.get("Type"), f"{path}.Type", Combine.ALL),
    )


def definition_from_wire(body: Any, *, require_name: bool) -> SegmentDefinition:
    """Read a WriteSegmentRequest; every error names the field that is wrong."""
    obj = _obj(body, "WriteSegmentRequest")
    name = obj.get("Name")
    if name is not None and not isinstance(name, str):
        raise InvalidRequest("Name must be a string")
    if require_name and not name:
        raise InvalidRequest("Name is required: give the segment a name")
    has_dims, has_groups = obj.get("Dimensions") is not None, obj.get("SegmentGroups") is not None
    if has_dims and has_groups:
        raise InvalidRequest("Give either Dimensions or SegmentGroups, not both")
    tags = obj.get("tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise InvalidRequest("tags must be a map of strings")
    groups: SegmentGroupList | None = None
    if has_groups:
        g = _obj(obj["SegmentGroups"], "SegmentGroups")
        raw_groups = g.get("Groups") or []
        if not isinstance(raw_groups, list):
            raise InvalidRequest("SegmentGroups.Groups must be a list")
        groups = SegmentGroupList(
            groups=tuple(_group(x, f"SegmentGroups.Groups[{i}]") for i, x in enumerate(raw_groups)),
            include=_enum(Combine, g.get("Include"), "SegmentGroups.Include", Combine.ALL),
        )
    definition = SegmentDefinition(
        name=name,
        dimensions=_dimensions(obj["Dimensions"], "Dimensions") if has_dims else None,
        groups=groups,
        tags=dict(tags),
    )
    if _count_dimensions(definition) > MAX_DIMENSIONS:
        raise InvalidRequest(f"A segment holds at most {MAX_DIMENSIONS} dimensions")
    return definition


def _count_dimensions(definition: SegmentDefinition) -> int:
    def count(d: SegmentDimensions) -> int:
        return (
            len(d.attributes)
            + len(d.user_attributes)
            + len(d.metrics)
            + len(d.demographic)
            + (d.country is not None)
        )

    total = count(definition.dimensions) if definition.dimensions else 0
    for group in definition.groups.groups if definition.groups else ():
        total += sum(count(d) for d in group.dimensions)
    return total


# ---------------------------------------------------------------------------------------------
# definition -> Pinpoint JSON


def _set_to_wire(d: SetDimension) -> dict[str, Any]:
    return {"DimensionType": d.dimension_type.value, "Values": list(d.values)}


def _attrs_to_wire(m: Mapping[str, AttributeDimension]) -> dict[str, Any]:
    return {
        k: {"AttributeType": v.attribute_type.value, "Values": list(v.values)} for k, v in m.items()
    }


def _dimensions_to_wire(d: SegmentDimensions) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if d.attributes:
        out["Attributes"] = _attrs_to_wire(d.attributes)
    if d.user_attributes:
        out["UserAttributes"] = _attrs_to_wire(d.user_attributes)
    if d.metrics:
        out["Metrics"] = {
            k: {"ComparisonOperator": v.operator.value, "Value": v.value}
            for k, v in d.metrics.items()
        }
    if d.demographic:
        out["Demographic"] = {k: _set_to_wire(v) for k, v in d.demographic.items()}
    if d.country is not None:
        out["Location"] = {"Country": _set_to_wire(d.country)}
    return out


def definition_to_wire(definition: SegmentDefinition) -> dict[str, Any]:
    """The ``Dimensions``/``SegmentGroups`` members of a SegmentResponse."""
    out: dict[str, Any] = {}
    if definition.dimensions is not None:
        out["Dimensions"] = _dimensions_to_wire(definition.dimensions)
    if definition.groups is not None:
        groups = []
        for g in definition.groups.groups:
            item: dict[str, Any] = {
                "Dimensions": [_dimensions_to_wire(d) for d in g.dimensions],
                "SourceType": g.source_type.value,
                "Type": g.type.value,
            }
            if g.source_segments:
                item["SourceSegments"] = [
                    {"Id": s.id} | ({"Version": s.version} if s.version is not None else {})
                    for s in g.source_segments
                ]
            groups.append(item)
        out["SegmentGroups"] = {"Groups": groups, "Include": definition.groups.include.value}
    return out


# ---------------------------------------------------------------------------------------------
# definition -> SQL


def iso_instant_ms(value: str) -> int | None:
    """Milliseconds since the epoch for an ISO-8601 date or instant (naive means UTC)."""
    text = value.strip()
    if len(text) < 10 or not text[:4].isdigit():
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


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
