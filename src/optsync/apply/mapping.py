"""Mapping rules: a change event in, endpoint writes out. Pure: no I/O, no clock.

One ``[[mapping]]`` rule says which table holds endpoints and which columns hold the address,
the opt-in flag, the user id and the attributes. Decisions:

- Every rule whose table (and schema, when the rule sets one) matches applies, in order, so one
  table can feed several channels (a phone rule and an e-mail rule). A table without a rule is a
  ``MappingError`` (``unmapped="dlq"``) or maps to nothing (``unmapped="skip"``).
- load, insert and update are one idempotent upsert; the write carries the event's position,
  so a replayed or older change never overwrites a newer one. OptOut is NONE when opted in,
  ALL when opted out; any other value, or NULL, is an error: guessing could message someone
  who opted out.
- The endpoint id defaults to the AWS sample's ``{userid}_{phone}`` over *raw* column values,
  so ids stay compatible with endpoints the sample created. When an update changes the id
  (new address or user) and the event has a before image, the old endpoint is deleted first:
  the AWS sample left it opted in (its bug B4). If the new row is invalid but the old id
  differs, the delete is still returned with ``Mapped.failed`` set: removing an endpoint that
  could be messaged is the safe direction. A before image without the id columns (PostgreSQL's
  default replica identity, DMS's pk-only filter) cannot name the old endpoint: the update is a
  plain upsert.
- Addresses: SMS and VOICE in E.164 (``phone.normalize`` under the rule's policy); EMAIL
  stripped, lower-cased and checked (``engine.email``: one ``@``, a routable local part, a host
  name with a dot); other channels as they are.
- EffectiveDate: an epoch time (seconds, milliseconds or microseconds by magnitude), as a number
  or as text of nine digits or more (a SQLite TEXT column), becomes ISO-8601 UTC; other text is
  passed on as it is. An epoch time outside the years 1 to 9999 is a ``MappingError``.
- Reasons (kept in the DLQ, and logged) name the column and the fix, never a phone number or
  an e-mail address; a value is quoted only when it is short and holds at most three digits.
- Endpoint ids are compared the engine's way (case-insensitively).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from optsync.engine.email import EmailError, normalize_email
from optsync.engine.endpoints import FORBIDDEN_ID_CHARS, endpoint_key
from optsync.engine.models import ChannelType, EndpointDelete, EndpointPatch, OptOut
from optsync.engine.phone import PhonePolicy, normalize
from optsync.errors import ConfigError, Fatal
from optsync.events import ChangeEvent, Op, Row

__all__ = ("Mapped", "Mapper", "MappingError", "MappingRule")

OPT_IN_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
OPT_IN_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})

_NO_COLUMNS: frozenset[str] = frozenset()
_MATCHING_CACHE = 10_000
"""Tables whose matching rules ``Mapper`` remembers (a bound, should names be unbounded)."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FULL_BEFORE_IMAGE = (
    "capture full before images (MySQL: binlog_row_image=FULL; PostgreSQL: ALTER TABLE ... "
    "REPLICA IDENTITY FULL; DMS: BeforeImageSettings ColumnFilter 'all')"
)


class MappingError(Fatal):
    """A change event that yields no safe endpoint write; ``reason`` goes to the DLQ."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class MappingRule:
    """One ``[[mapping]]`` rule: which columns of ``table`` make an endpoint."""

    table: str
    _: KW_ONLY
    channel: ChannelType = ChannelType.SMS
    address: str
    """Column holding the address (phone number, e-mail address, token)."""
    opt_in: str
    """Column holding the opt-in flag."""
    user_id: str | None = None
    """Column holding the user id (``User.UserId``)."""
    endpoint_id: str | None = None
    """``str.format`` template over column names; default ``{user_id}_{address}``."""
    opt_in_true: frozenset[str] = OPT_IN_TRUE
    opt_in_false: frozenset[str] = OPT_IN_FALSE
    attributes: tuple[str, ...] = ()
    """Columns copied into endpoint ``Attributes`` (skipped when NULL)."""
    user_attributes: tuple[str, ...] = ()
    """Columns copied into ``User.UserAttributes`` (skipped when NULL)."""
    effective_date: str | None = None
    """Column whose value becomes ``EffectiveDate``."""
    schema: str | None = None
    """Match the schema too (None: any schema)."""
    phone_policy: PhonePolicy = PhonePolicy.POSSIBLE
    default_region: str | None = None
    """Region (alpha-2 or alpha-3) for phone numbers written without '+'."""
    id_columns: tuple[str, ...] = field(init=False, repr=False, compare=False)
    """The columns the endpoint id template uses (derived)."""

    def __post_init__(self) -> None:
        where = f"[[mapping]] table = {self.table!r}: "
        if not self.address or not self.opt_in:
            raise ConfigError(f"{where}address and opt_in must name columns")
        try:
            object.__setattr__(self, "channel", ChannelType(self.channel))
            object.__setattr__(self, "phone_policy", PhonePolicy(self.phone_policy))
        except ValueError as exc:
            raise ConfigError(f"{where}{exc}") from None
        true = frozenset(str(v).strip().lower() for v in self.opt_in_true)
        false = frozenset(str(v).strip().lower() for v in self.opt_in_false)
        if not true or not false:
            raise ConfigError(f"{where}opt_in_true and opt_in_false must not be empty")
        if true & false:
            raise ConfigError(
                f"{where}opt_in_true and opt_in_false share {', '.join(sorted(true & false))}: "
                "a value must mean one thing"
            )
        object.__setattr__(self, "opt_in_true", true)
        object.__setattr__(self, "opt_in_false", false)
        if self.endpoint_id is None:
            default = f"{{{self.user_id}}}_{{{self.address}}}" if self.user_id else None
            object.__setattr__(self, "endpoint_id", default or f"{{{self.address}}}")
        object.__setattr__(self, "id_columns", _template_columns(self.id_template, where))

    @property
    def id_template(self) -> str:
        """The endpoint id template in force (``endpoint_id`` or its default)."""
        assert self.endpoint_id is not None  # set in __post_init__
        return self.endpoint_id

    def matches(self, event: ChangeEvent) -> bool:
        """Whether this rule is about the event's table."""
        return self.table == event.table and self.schema in (None, event.schema)


@dataclass(frozen=True)
class Mapped:
    """The writes for one change event, in order; ``failed`` says what could not be mapped."""

    writes: tuple[EndpointPatch | EndpointDelete, ...]
    failed: str | None = None


class Mapper:
    """Turns change events into endpoint writes by the configured rules."""

    def __init__(
        self, rules: Sequence[MappingRule], unmapped: Literal["dlq", "skip"] = "dlq"
    ) -> None:
        if unmapped not in ("dlq", "skip"):
            raise ConfigError(f"unmapped = {unmapped!r}: use 'dlq' or 'skip'")
        self.rules = tuple(rules)
        self.unmapped = unmapped
        self._matching: dict[tuple[str, str], tuple[MappingRule, ...]] = {}
        """(schema, table) -> the rules that match it, found once per table."""

    def map(self, event: ChangeEvent) -> Mapped:
        """The writes for ``event``; ``MappingError`` if nothing safe can be written."""
        rules = self._matching.get((event.schema, event.table))
        if rules is None:
            rules = tuple(rule for rule in self.rules if rule.matches(event))
            if len(self._matching) < _MATCHING_CACHE:
                self._matching[event.schema, event.table] = rules
        if len(rules) == 1:
            return _map(rules[0], event)  # its MappingError and Mapped are the ones below
        if not rules:
            if self.unmapped == "skip":
                return Mapped(())
            name = f"{event.schema}.{event.table}" if event.schema else event.table
            raise MappingError(
                f"no [[mapping]] rule for table {name!r}: add one, or set unmapped = 'skip' "
                "to ignore tables without a rule"
            )
        writes: list[EndpointPatch | EndpointDelete] = []
        reasons: list[str] = []
        for rule in rules:
            try:
                mapped = _map(rule, event)
            except MappingError as exc:
                reasons.append(exc.reason)
                continue
            writes.extend(mapped.writes)
            if mapped.failed:
                reasons.append(mapped.failed)
        failed = "; ".join(reasons) or None
        if not writes and failed:
            raise MappingError(failed)
        return Mapped(tuple(writes), failed)


def _map(rule: MappingRule, event: ChangeEvent) -> Mapped:
    if event.op is Op.DELETE:
        before = event.row
        missing = [c for c in rule.id_columns if before.get(c) is None]
        if missing:
            raise MappingError(
                f"the delete's before image lacks column(s) {_names(missing)} that the endpoint "
                f"id template {rule.id_template!r} needs: {_FULL_BEFORE_IMAGE}"
            )
        return Mapped(
            (
                EndpointDelete(
                    _endpoint_id(rule, before),
                    position=event.position,
                    source_time=event.commit_time,
                ),
            )
        )
    old_id = _old_id(rule, event)
    try:
        patch = _upsert(rule, event)
    except MappingError as exc:
        if old_id is not None and _new_id_differs(rule, event, old_id):
            return Mapped(
                (EndpointDelete(old_id, position=event.position, source_time=event.commit_time),),
                failed=exc.reason,
            )
        raise
    if old_id is not None and endpoint_key(old_id) != endpoint_key(patch.id):
        return Mapped(
            (EndpointDelete(old_id, position=event.position, source_time=event.commit_time), patch)
        )
    return Mapped((patch,))


def _old_id(rule: MappingRule, event: ChangeEvent) -> str | None:
    """The endpoint id of the before image of an update, when it holds every id column.

    None too when the id columns hold the same values before and after: the id is the same,
    and an update that changes only the opt-in (the usual one) skips building it twice.
    """
    before = event.before
    if event.op is not Op.UPDATE or not before:
        return None
    after = event.after or {}
    same = True
    for column in rule.id_columns:
        old = before.get(column)
        if old is None:
            return None
        new = after.get(column)
        # Equal and of one type: 1 == True == 1.0, but they format differently.
        same = same and (old is new or (type(old) is type(new) and old == new))
    if same:
        return None
    try:
        return _endpoint_id(rule, before)
    except MappingError:
        return None


def _new_id_differs(rule: MappingRule, event: ChangeEvent, old_id: str) -> bool:
    try:
        return endpoint_key(_endpoint_id(rule, event.row)) != endpoint_key(old_id)
    except MappingError:
        return True  # the new row names no endpoint: the old one is no longer backed by a row


UNCHANGED_TOAST = "unchanged_toast"
"""``ChangeEvent.extra`` key: columns a source left out of ``after`` because they did not change
(PostgreSQL's unchanged TOAST values). They keep their stored value: never read as NULL."""


def _upsert(rule: MappingRule, event: ChangeEvent) -> EndpointPatch:
    row = event.row
    toast = event.extra.get(UNCHANGED_TOAST) if event.extra else None
    unchanged = frozenset(toast) if toast else _NO_COLUMNS
    hidden_id = unchanged.intersection(rule.id_columns)
    if hidden_id:
        raise MappingError(
            f"column(s) {_names(sorted(hidden_id))} used by the endpoint id arrived as unchanged "
            "TOAST values without their content: set REPLICA IDENTITY FULL on the table"
        )
    address = None if rule.address in unchanged else _address(rule, row)
    opted_in = None if rule.opt_in in unchanged else _opted_in(rule, row)
    user_id = row.get(rule.user_id) if rule.user_id and rule.user_id not in unchanged else None
    attributes = [c for c in rule.attributes if c not in unchanged]
    user_attributes = [c for c in rule.user_attributes if c not in unchanged]
    return EndpointPatch(
        id=_endpoint_id(rule, row),
        channel_type=rule.channel,
        address=address,
        opt_out=None if opted_in is None else (OptOut.NONE if opted_in else OptOut.ALL),
        user_id=str(user_id) if user_id is not None else None,
        attributes=_copied(row, tuple(attributes)) if attributes else None,
        user_attributes=_copied(row, tuple(user_attributes)) if user_attributes else None,
        effective_date=None if rule.effective_date in unchanged else _effective_date(rule, row),
        position=event.position,
        source_time=event.commit_time,
    )


def _endpoint_id(rule: MappingRule, row: Row) -> str:
    values = {c: row.get(c) for c in rule.id_columns}
    if None in values.values():
        missing = [c for c, value in values.items() if value is None]
        raise MappingError(
            f"column(s) {_names(missing)} used by the endpoint id template "
            f"{rule.id_template!r} are NULL or missing: make them NOT NULL or change "
            "endpoint_id in the [[mapping]] rule"
        )
    try:
        endpoint_id = rule.id_template.format_map(values)
    except (ValueError, TypeError) as exc:
        raise MappingError(
            f"the endpoint id template {rule.id_template!r} does not fit the row's values "
            f"({type(exc).__name__}): fix endpoint_id in the [[mapping]] rule"
        ) from None
    if not endpoint_id.strip():
        raise MappingError(
            f"the endpoint id template {rule.id_template!r} gives an empty id for this row"
        )
    if "$" in endpoint_id or "{" in endpoint_id or "}" in endpoint_id:  # the hot path's test
        bad = FORBIDDEN_ID_CHARS.intersection(endpoint_id)
        raise MappingError(
            f"the endpoint id built by {rule.id_template!r} contains {', '.join(sorted(bad))}, "
            "which Pinpoint forbids in ids: change endpoint_id in the [[mapping]] rule"
        )
    return endpoint_id


_SCALED_WHOLE = re.compile(r"[0-9]+\.0+")
"""A whole number as a DECIMAL(p, s) column prints it: ``15112345678.00``."""


def _address(rule: MappingRule, row: Row) -> str:
    column = rule.address
    value = row.get(column)
    if isinstance(value, float):  # a number column (REAL, FLOAT, DOUBLE) holding the address
        if not value.is_integer():
            raise MappingError(
                f"column {column!r} (the address) holds a number with a fraction: store "
                "addresses as text (or whole numbers)"
            )
        value = int(value)  # str() would add ".0", which phone parsing reads as more digits
    text = "" if value is None else str(value).strip()
    if _SCALED_WHOLE.fullmatch(text):
        text = text.partition(".")[0]
    if not text:
        raise MappingError(
            f"column {column!r} (the address) is NULL or empty: the row names no "
            f"{rule.channel.value} address"
        )
    if rule.channel in (ChannelType.SMS, ChannelType.VOICE):
        phone = normalize(text, rule.phone_policy, rule.default_region)
        if phone is None:
            hint = ""
            if not text.startswith("+") and rule.default_region is None:
                hint = " (numbers without a leading '+' need default_region in the rule)"
            raise MappingError(
                f"column {column!r} does not hold a valid phone number under "
                f"phone_policy={rule.phone_policy.value!r}{hint}"
            )
        return phone.e164
    if rule.channel is ChannelType.EMAIL:
        try:
            return normalize_email(text)
        except EmailError as exc:
            raise MappingError(
                f"column {column!r} does not hold an e-mail address ({exc})"
            ) from None
    return str(value)


def _opted_in(rule: MappingRule, row: Row) -> bool:
    column = rule.opt_in
    value = row.get(column)
    if value is None:
        raise MappingError(
            f"column {column!r} (opt-in) is NULL or missing: make it NOT NULL with a default, "
            "or include NULL columns in the capture (DMS: IncludeNullAndEmpty=true)"
        )
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip().lower()
    if text in rule.opt_in_true:
        return True
    if text in rule.opt_in_false:
        return False
    raise MappingError(
        f"column {column!r} has value {_shown(value)}, which is neither opt-in "
        f"({_examples(rule.opt_in_true)}) nor opt-out ({_examples(rule.opt_in_false)}): "
        "set opt_in_true/opt_in_false in the [[mapping]] rule"
    )


def _copied(row: Row, columns: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {c: (str(row[c]),) for c in columns if row.get(c) is not None}


_EPOCH_TEXT = re.compile(r"[0-9]{9,}(?:\.[0-9]+)?")
"""Epoch time written as text (a SQLite TEXT column): 9 digits or more, so that an eight-digit
``20261203`` (ISO 8601's basic date) is not read as seconds in 1970."""


def _effective_date(rule: MappingRule, row: Row) -> str | None:
    if rule.effective_date is None:
        return None
    value = row.get(rule.effective_date)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str) and _EPOCH_TEXT.fullmatch(value.strip()):
        text = value.strip()
        value = float(text) if "." in text else int(text)
    if isinstance(value, int | float):
        # Epoch time (Debezium's DATETIME): seconds, milliseconds or microseconds by magnitude.
        micros = value * (1 if value > 1e14 else 1_000 if value > 1e11 else 1_000_000)
        try:
            moment = _EPOCH + timedelta(microseconds=int(micros))
        except (OverflowError, ValueError):  # past year 9999, before year 1, NaN or infinite
            raise MappingError(
                f"column {rule.effective_date!r} holds a number that is no epoch time between "
                "the years 1 and 9999 (seconds, milliseconds or microseconds): fix the value, "
                "or drop effective_date from the [[mapping]] rule"
            ) from None
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return str(value).strip() or None


def _template_columns(template: str, where: str) -> tuple[str, ...]:
    columns: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(
            f"{where}endpoint_id {template!r} is not a valid template: {exc}"
        ) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or name.isdigit() or any(ch in name for ch in ".[]"):
            raise ConfigError(
                f"{where}endpoint_id {template!r}: write each field as {{column_name}} "
                "(no positional fields, attribute or index access)"
            )
        if conversion or (spec and "{" in spec):
            raise ConfigError(
                f"{where}endpoint_id {template!r}: field {name!r} may have a format spec "
                "but no conversion or nested field"
            )
        if name not in columns:
            columns.append(name)
    if not columns:
        raise ConfigError(f"{where}endpoint_id {template!r} uses no column")
    return tuple(columns)


def _names(columns: Sequence[str]) -> str:
    return ", ".join(repr(c) for c in columns)


def _shown(value: Any) -> str:
    """The value for a reason, unless it could be personal data (long, or many digits)."""
    text = str(value)
    if isinstance(value, bool) or (len(text) <= 16 and sum(ch.isdigit() for ch in text) <= 3):
        return repr(value) if isinstance(value, str) else text
    return f"of {len(text)} characters (not shown)"


def _examples(values: frozenset[str]) -> str:
    ordered = sorted(values, key=lambda v: (not v.isdigit(), -len(v), v))
    return ", ".join(ordered[:2]) + (", ..." if len(ordered) > 2 else "")
