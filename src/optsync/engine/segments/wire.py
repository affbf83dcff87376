"""Segments in Pinpoint's JSON (WriteSegmentRequest, SegmentResponse) and back: every field
checked, a refusal names it (``InvalidRequest``: a 400 with Pinpoint's error shape)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, TypeVar

from optsync.engine.countries import to_alpha2
from optsync.engine.segments.model import (
    DEMOGRAPHIC_COLUMNS,
    MAX_DIMENSIONS,
    AttributeDimension,
    AttributeType,
    Combine,
    DimensionType,
    MetricDimension,
    MetricOperator,
    SegmentDefinition,
    SegmentDimensions,
    SegmentGroup,
    SegmentGroupList,
    SetDimension,
    SourceSegment,
    iso_instant_ms,
)
from optsync.errors import InvalidRequest

__all__ = ("definition_from_wire", "definition_to_wire")


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
