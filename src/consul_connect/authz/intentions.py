"""Consul's intention model, pure: no I/O, no clock, no globals.

One implementation of the rules shared by the dev agent (which stores and serves intentions)
and the library's local authorizer (which decides from ``match?by=destination`` data):

* the data model: :class:`Intention` (the legacy/match API JSON), L7 :class:`Permission`,
  :class:`HTTPMatch`, :class:`HeaderMatch`, and the ``service-intentions`` config entry
  (:class:`ServiceIntentionsEntry` of :class:`SourceIntention`);
* :func:`compute_precedence` and :func:`sort_intentions` (match/list order);
* :func:`source_matches` (authorize step 5);
* validation with Consul's exact error texts (:class:`IntentionValidationError`);
* :class:`IntentionSet`: a precomputed view of the intentions for one destination that answers
  L4 decisions in O(1) and evaluates L7 permissions with precompiled matchers.

Consul's JSON decoding is case-insensitive on keys (Go ``encoding/json``); config entries also
accept the snake_case aliases Consul declares (``path_exact``, ``legacy_id``, ...). Values of
the wrong JSON type raise :class:`IntentionDecodeError` (Consul answers those with 400), invalid
content raises :class:`IntentionValidationError` (Consul answers those with 500).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from consul_connect.errors import ConsulConnectError

__all__ = [
    "ACTION_ALLOW",
    "ACTION_DENY",
    "DEFAULT_REASON",
    "HTTP_METHODS",
    "SOURCE_TYPE_CONSUL",
    "WILDCARD",
    "Decision",
    "HTTPMatch",
    "HeaderMatch",
    "Intention",
    "IntentionDecodeError",
    "IntentionSet",
    "IntentionValidationError",
    "Permission",
    "ServiceIntentionsEntry",
    "SourceIntention",
    "compute_precedence",
    "config_entry_from_intentions",
    "intentions_from_config_entry",
    "normalize_config_entry",
    "sort_intentions",
    "source_matches",
    "validate_config_entry",
    "validate_legacy_intention",
    "validate_wildcards",
]

WILDCARD: Final = "*"
ACTION_ALLOW: Final = "allow"
ACTION_DENY: Final = "deny"
SOURCE_TYPE_CONSUL: Final = "consul"
DEFAULT_NAMESPACE: Final = "default"
DEFAULT_PARTITION: Final = "default"
KIND_SERVICE_INTENTIONS: Final = "service-intentions"

#: Reason Consul's authorize gives when no intention matched.
DEFAULT_REASON: Final = "Default behavior configured by ACLs"

#: Methods Consul accepts in ``HTTP.Methods`` (Go's ``net/http`` method constants).
HTTP_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"}
)

# Limits shared with Consul's service/config-entry meta validation (agent/structs).
_META_MAX_KEY_PAIRS: Final = 64
_META_KEY_MAX_LENGTH: Final = 128
_META_VALUE_MAX_LENGTH: Final = 512

# Go's zero time.Time as encoding/json renders it; Consul omits it, so we treat it as unset.
_GO_ZERO_TIME: Final = "0001-01-01T00:00:00Z"


# --------------------------------------------------------------------------------------------
# Errors


class IntentionValidationError(ConsulConnectError, ValueError):
    """An intention or ``service-intentions`` entry breaks one of Consul's rules.

    ``str(err)`` is Consul's exact text for the failure. ``errors`` lists the individual
    messages: one for config-entry validation (Consul stops at the first problem), possibly
    several for the legacy ``Intention.Validate()`` (whose text is then go-multierror's list).
    """

    def __init__(self, message: str, *, errors: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.errors: tuple[str, ...] = tuple(errors) if errors is not None else (message,)


class IntentionDecodeError(ConsulConnectError, ValueError):
    """A JSON value has the wrong type for its field (Consul: 400 ``Request decode failed``)."""


def _multierror_text(errors: Sequence[str]) -> str:
    # go-multierror's ListFormatFunc, which Consul returns verbatim for multi-check validators.
    if len(errors) == 1:
        return f"1 error occurred:\n\t* {errors[0]}\n\n"
    points = "\n\t".join(f"* {e}" for e in errors)
    return f"{len(errors)} errors occurred:\n\t{points}\n\n"


def _go_quote(s: str) -> str:
    """Render ``s`` like Go's ``%q`` for the strings Consul quotes in its messages."""
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif not ch.isprintable():
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


_GO_ESCAPES: Final = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


# --------------------------------------------------------------------------------------------
# Case-insensitive JSON field access (Go encoding/json semantics)


class _Fields:
    """Case-insensitive view of one JSON object; the last of case-variant duplicates wins."""

    def __init__(self, obj: object, where: str, aliases: Mapping[str, str] | None = None) -> None:
        if not isinstance(obj, Mapping):
            raise IntentionDecodeError(
                f"json: cannot unmarshal {_json_kind(obj)} into Go value of type {where}"
            )
        self.where = where
        self._values: dict[str, object] = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                continue
            low = key.lower()
            if aliases is not None:
                low = aliases.get(low, low)
            self._values[low] = value

    def raw(self, key: str) -> object:
        return self._values.get(key.lower())

    def has(self, key: str) -> bool:
        return self._values.get(key.lower()) is not None

    def _bad(self, key: str, value: object, go_type: str) -> IntentionDecodeError:
        return IntentionDecodeError(
            f"json: cannot unmarshal {_json_kind(value)} into Go struct field "
            f"{self.where}.{key} of type {go_type}"
        )

    def get_str(self, key: str) -> str:
        value = self.raw(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self._bad(key, value, "string")
        return value

    def get_bool(self, key: str) -> bool:
        value = self.raw(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self._bad(key, value, "bool")
        return value

    def get_int(self, key: str, go_type: str = "int") -> int:
        value = self.raw(key)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, value, go_type)
        return value

    def get_str_map(self, key: str) -> dict[str, str]:
        value = self.raw(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self._bad(key, value, "map[string]string")
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(v, str):
                raise self._bad(key, v, "string")
            out[str(k)] = v
        return out

    def get_list(self, key: str, go_type: str) -> list[object]:
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            raise self._bad(key, value, go_type)
        return list(value)

    def get_time(self, key: str) -> str:
        value = self.get_str(key)
        return "" if value == _GO_ZERO_TIME else value


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return f"number {value}"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return "null" if value is None else type(value).__name__


# snake_case aliases Consul declares (``alias:"..."`` struct tags) for config-entry decoding.
_HTTP_ALIASES: Final = {
    "path_exact": "pathexact",
    "path_prefix": "pathprefix",
    "path_regex": "pathregex",
}
_SOURCE_ALIASES: Final = {
    "legacy_id": "legacyid",
    "legacy_meta": "legacymeta",
    "legacy_create_time": "legacycreatetime",
    "legacy_update_time": "legacyupdatetime",
    "sameness_group": "samenessgroup",
}
_ENTRY_ALIASES: Final = {
    "create_index": "createindex",
    "modify_index": "modifyindex",
}


# --------------------------------------------------------------------------------------------
# L7 model


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One ``HTTP.Header`` criterion: exactly one of present/exact/prefix/suffix/regex."""

    name: str
    present: bool = False
    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    regex: str | None = None
    invert: bool = False

    @classmethod
    def from_json(cls, obj: object, *, where: str = "IntentionHTTPHeaderPermission") -> HeaderMatch:
        """Decode one header item (keys any case); empty strings mean "not set"."""
        f = _Fields(obj, where)
        return cls(
            name=f.get_str("Name"),
            present=f.get_bool("Present"),
            exact=f.get_str("Exact") or None,
            prefix=f.get_str("Prefix") or None,
            suffix=f.get_str("Suffix") or None,
            regex=f.get_str("Regex") or None,
            invert=f.get_bool("Invert"),
        )

    def to_json(self) -> dict[str, Any]:
        """Consul's JSON for the item (``Name`` always, the rest only when set)."""
        out: dict[str, Any] = {"Name": self.name}
        if self.present:
            out["Present"] = True
        for key, value in (
            ("Exact", self.exact),
            ("Prefix", self.prefix),
            ("Suffix", self.suffix),
            ("Regex", self.regex),
        ):
            if value:
                out[key] = value
        if self.invert:
            out["Invert"] = True
        return out


@dataclass(frozen=True, slots=True)
class HTTPMatch:
    """The ``HTTP`` block of a permission: path criterion, methods and header items (ANDed)."""

    path_exact: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    methods: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()

    @classmethod
    def from_json(cls, obj: object, *, aliases: bool = False) -> HTTPMatch:
        """Decode an ``HTTP`` block; ``aliases`` also accepts ``path_exact`` & co."""
        f = _Fields(obj, "IntentionHTTPPermission", _HTTP_ALIASES if aliases else None)
        methods = []
        for m in f.get_list("Methods", "[]string"):
            if not isinstance(m, str):
                raise IntentionDecodeError(
                    f"json: cannot unmarshal {_json_kind(m)} into Go struct field "
                    "IntentionHTTPPermission.Methods of type string"
                )
            methods.append(m)
        return cls(
            path_exact=f.get_str("PathExact") or None,
            path_prefix=f.get_str("PathPrefix") or None,
            path_regex=f.get_str("PathRegex") or None,
            methods=tuple(methods),
            headers=tuple(HeaderMatch.from_json(h) for h in f.get_list("Header", "[]Header")),
        )

    def to_json(self) -> dict[str, Any]:
        """Consul's JSON for the block (every key omitted when empty)."""
        out: dict[str, Any] = {}
        if self.path_exact:
            out["PathExact"] = self.path_exact
        if self.path_prefix:
            out["PathPrefix"] = self.path_prefix
        if self.path_regex:
            out["PathRegex"] = self.path_regex
        if self.headers:
            out["Header"] = [h.to_json() for h in self.headers]
        if self.methods:
            out["Methods"] = list(self.methods)
        return out


@dataclass(frozen=True, slots=True)
class Permission:
    """One L7 permission: ``action`` (``allow``/``deny``) applied when ``http`` matches."""

    action: str
    http: HTTPMatch | None = None

    @classmethod
    def from_json(cls, obj: object, *, aliases: bool = False) -> Permission:
        """Decode a permission; a JSON ``JWT`` block is accepted and ignored."""
        f = _Fields(obj, "IntentionPermission")
        http_raw = f.raw("HTTP")
        return cls(
            action=f.get_str("Action"),
            http=None if http_raw is None else HTTPMatch.from_json(http_raw, aliases=aliases),
        )

    def to_json(self) -> dict[str, Any]:
        """Consul's JSON: ``Action`` always, ``HTTP`` when present."""
        out: dict[str, Any] = {"Action": self.action}
        if self.http is not None:
            out["HTTP"] = self.http.to_json()
        return out

    def normalized(self) -> Permission:
        """The permission as Consul stores it: methods upper-cased."""
        if self.http is None or not self.http.methods:
            return self
        return replace(
            self, http=replace(self.http, methods=tuple(m.upper() for m in self.http.methods))
        )


# --------------------------------------------------------------------------------------------
# Precedence, ordering, matching


def _ns(value: str) -> str:
    return value or DEFAULT_NAMESPACE


def _partition(value: str) -> str:
    return value or DEFAULT_PARTITION


def _count_exact(ns: str, name: str) -> int:
    # An exact name under a wildcard namespace is invalid, so a wildcard namespace means */*.
    if _ns(ns) == WILDCARD:
        return 0
    if name == WILDCARD:
        return 1
    return 2


def compute_precedence(source_ns: str, source_name: str, dest_ns: str, dest_name: str) -> int:
    """Return Consul's precedence (1..9) for a source/destination pair.

    Destination exact/exact, exact/* and */* give a base of 9, 6 and 3; each wildcard part in
    the source takes one off. Empty namespaces count as ``default`` (exact). In CE, where
    namespaces are always exact, only 9, 8, 6 and 5 occur.
    """
    base = {2: 9, 1: 6, 0: 3}[_count_exact(dest_ns, dest_name)]
    return base - (2 - _count_exact(source_ns, source_name))


def _sort_key(ixn: Intention) -> tuple[int, str, str, str, str, str, str, str]:
    return (
        -ixn.precedence,
        ixn.source_peer,
        ixn.source_partition,
        ixn.source_ns,
        ixn.source_name,
        ixn.destination_partition,
        ixn.destination_ns,
        ixn.destination_name,
    )


def sort_intentions(items: Iterable[Intention]) -> list[Intention]:
    """Return ``items`` in Consul's evaluation order (the first element is the one applied).

    Precedence descending; ties by ascending (SourcePeer, SourcePartition, SourceNS,
    SourceName, DestinationPartition, DestinationNS, DestinationName). Python compares
    ``str`` by code point, which orders like Go's byte-wise comparison of UTF-8.
    """
    return sorted(items, key=_sort_key)


def source_matches(
    intention: Intention,
    identity_ns: str,
    identity_name: str,
    partition: str = DEFAULT_PARTITION,
    peer: str = "",
) -> bool:
    """Return whether ``intention``'s source covers the caller identity (authorize step 5).

    The peer must be equal ("" = local); for local callers the partition must be equal (empty
    means ``default``); namespace and name must be equal (case-sensitive) or ``*``.
    """
    if intention.source_peer != peer:
        return False
    if not peer and _partition(intention.source_partition) != _partition(partition):
        return False
    if intention.source_ns != WILDCARD and intention.source_ns != _ns(identity_ns):
        return False
    return intention.source_name in (WILDCARD, identity_name)


# --------------------------------------------------------------------------------------------
# Intention


@dataclass(frozen=True)
class Intention:
    """One intention as the legacy, exact and match APIs show it (``structs.Intention``).

    ``action`` is ``allow``/``deny`` for L4 intentions and ``""`` for L7 ones, which carry
    ``permissions`` instead. ``precedence`` is computed from the four name fields and cannot
    be set. ``id``, ``created_at``, ``updated_at`` and ``content_hash`` are only set for
    intentions created through the legacy API. ``meta`` is a private copy; treat it as
    read-only.
    """

    id: str = ""
    description: str = ""
    source_ns: str = DEFAULT_NAMESPACE
    source_name: str = ""
    destination_ns: str = DEFAULT_NAMESPACE
    destination_name: str = ""
    source_partition: str = ""
    destination_partition: str = ""
    source_peer: str = ""
    source_type: str = SOURCE_TYPE_CONSUL
    action: str = ""
    permissions: tuple[Permission, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict, hash=False)
    create_index: int = 0
    modify_index: int = 0
    created_at: str = ""
    updated_at: str = ""
    content_hash: str = ""
    precedence: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "permissions", tuple(self.permissions))
        # A private copy (typed read-only): callers cannot change us through their dict, and
        # unlike a mappingproxy it still pickles and deep-copies.
        object.__setattr__(self, "meta", dict(self.meta))
        object.__setattr__(
            self,
            "precedence",
            compute_precedence(
                self.source_ns, self.source_name, self.destination_ns, self.destination_name
            ),
        )

    @property
    def is_l7(self) -> bool:
        """True when the intention carries L7 permissions (authorize treats it as deny)."""
        return bool(self.permissions)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Intention:
        """Decode Consul's intention JSON (keys in any case, as Go's decoder accepts).

        Empty namespaces become ``default`` and an empty ``SourceType`` becomes ``consul``, as
        Consul normalizes them; ``Precedence`` in the input is ignored (it is recomputed).
        Raises :class:`IntentionDecodeError` when a value has the wrong JSON type.
        """
        f = _Fields(obj, "Intention")
        return cls(
            id=f.get_str("ID"),
            description=f.get_str("Description"),
            source_ns=_ns(f.get_str("SourceNS")),
            source_name=f.get_str("SourceName"),
            destination_ns=_ns(f.get_str("DestinationNS")),
            destination_name=f.get_str("DestinationName"),
            source_partition=f.get_str("SourcePartition"),
            destination_partition=f.get_str("DestinationPartition"),
            source_peer=f.get_str("SourcePeer"),
            source_type=f.get_str("SourceType") or SOURCE_TYPE_CONSUL,
            action=f.get_str("Action"),
            permissions=tuple(
                Permission.from_json(p) for p in f.get_list("Permissions", "[]*IntentionPermission")
            ),
            meta=f.get_str_map("Meta"),
            create_index=f.get_int("CreateIndex", "uint64"),
            modify_index=f.get_int("ModifyIndex", "uint64"),
            created_at=f.get_time("CreatedAt"),
            updated_at=f.get_time("UpdatedAt"),
            content_hash=f.get_str("Hash"),
        )

    def to_json(self) -> dict[str, Any]:
        """Consul CE's JSON for the intention, with its ``omitempty`` behaviour.

        ``SourceNS``/``SourceName``/``DestinationNS``/``DestinationName``/``SourceType``/
        ``Precedence``/``CreateIndex``/``ModifyIndex`` are always present; everything else
        only when set (``Action`` is absent for L7 intentions).
        """
        out: dict[str, Any] = {}
        if self.id:
            out["ID"] = self.id
        if self.description:
            out["Description"] = self.description
        out["SourceNS"] = self.source_ns
        out["SourceName"] = self.source_name
        out["DestinationNS"] = self.destination_ns
        out["DestinationName"] = self.destination_name
        if self.source_partition:
            out["SourcePartition"] = self.source_partition
        if self.destination_partition:
            out["DestinationPartition"] = self.destination_partition
        if self.source_peer:
            out["SourcePeer"] = self.source_peer
        out["SourceType"] = self.source_type
        if self.action:
            out["Action"] = self.action
        if self.permissions:
            out["Permissions"] = [p.to_json() for p in self.permissions]
        if self.meta:
            out["Meta"] = dict(sorted(self.meta.items()))  # Go sorts map keys
        out["Precedence"] = self.precedence
        if self.created_at:
            out["CreatedAt"] = self.created_at
        if self.updated_at:
            out["UpdatedAt"] = self.updated_at
        if self.content_hash:
            out["Hash"] = self.content_hash
        out["CreateIndex"] = self.create_index
        out["ModifyIndex"] = self.modify_index
        return out

    def describe(self) -> str:
        """Consul's ``Intention.String()``, as used in authorize reasons.

        ``[<partition>/|peer(<peer>)/]<ns>/<name> => [<partition>/]<ns>/<name> (``
        ``[ID: <id>, ]Precedence: <n>, Action: ALLOW|DENY`` or ``Permissions: <count>)``.
        """
        if self.source_peer:
            src_prefix = f"peer({self.source_peer})/"
        elif self.source_partition:
            src_prefix = f"{self.source_partition}/"
        else:
            src_prefix = ""
        dst_prefix = f"{self.destination_partition}/" if self.destination_partition else ""
        id_part = f"ID: {self.id}, " if self.id else ""
        detail = (
            f"Permissions: {len(self.permissions)}"
            if self.permissions
            else f"Action: {self.action.upper()}"
        )
        return (
            f"{src_prefix}{self.source_ns}/{self.source_name} => "
            f"{dst_prefix}{self.destination_ns}/{self.destination_name} "
            f"({id_part}Precedence: {self.precedence}, {detail})"
        )

    def __str__(self) -> str:
        return self.describe()

    def to_source(self, *, legacy: bool = False) -> SourceIntention:
        """This intention as an element of its destination's config entry.

        With ``legacy`` the legacy-only fields (ID, per-intention meta, timestamps) are kept,
        as Consul does for writes through the legacy ID-based API.
        """
        return SourceIntention(
            name=self.source_name,
            action=self.action,
            permissions=self.permissions,
            precedence=self.precedence,
            legacy_id=self.id if legacy else "",
            type=self.source_type,
            description=self.description,
            legacy_meta=self.meta if legacy else {},
            legacy_create_time=self.created_at if legacy else "",
            legacy_update_time=self.updated_at if legacy else "",
            namespace=self.source_ns,
            partition=self.source_partition,
            peer=self.source_peer,
        )


# --------------------------------------------------------------------------------------------
# Validation


def validate_wildcards(
    name: str, namespace: str = DEFAULT_NAMESPACE, partition: str = "", peer: str = ""
) -> None:
    """Check one side's wildcard use, config-entry style (``Name: ...``, ``Namespace: ...``).

    Raises :class:`IntentionValidationError` for a partial wildcard (``web*``), an exact name
    under a wildcard namespace, or a wildcard in the partition or peer.
    """
    ns = _ns(namespace)
    if ns != WILDCARD and WILDCARD in ns:
        raise IntentionValidationError(
            "Namespace: wildcard character '*' cannot be used with partial values"
        )
    if name != WILDCARD:
        if WILDCARD in name:
            raise IntentionValidationError(
                "Name: wildcard character '*' cannot be used with partial values"
            )
        if ns == WILDCARD:
            raise IntentionValidationError("Name: exact value cannot follow wildcard namespace")
    if WILDCARD in partition:
        raise IntentionValidationError("Partition: cannot use wildcard '*' in partition")
    if WILDCARD in peer:
        raise IntentionValidationError("Peer: cannot use wildcard '*' in peer")


def _byte_len(s: str) -> int:
    # Consul's length limits count bytes (Go len()), not characters.
    return len(s.encode("utf-8", "surrogatepass"))


def _meta_errors(meta: Mapping[str, str], prefix: str = "") -> list[str]:
    errors: list[str] = []
    if len(meta) > _META_MAX_KEY_PAIRS:
        errors.append(f"{prefix}Meta exceeds maximum element count {_META_MAX_KEY_PAIRS}")
    # Go walks the map in random order; sorting keeps our first-error choice stable.
    for k in sorted(meta):
        if _byte_len(k) > _META_KEY_MAX_LENGTH:
            errors.append(
                f"{prefix}Meta key {_go_quote(k)} exceeds maximum length {_META_KEY_MAX_LENGTH}"
            )
        if _byte_len(meta[k]) > _META_VALUE_MAX_LENGTH:
            errors.append(
                f"{prefix}Meta value for key {_go_quote(k)} exceeds maximum length "
                f"{_META_VALUE_MAX_LENGTH}"
            )
    return errors


def validate_legacy_intention(intention: Intention, *, creating: bool = False) -> None:
    """Validate a write through the legacy ID-based API, with Consul's texts.

    ``creating``: also reject a body that carries an ``ID``. A body with ``Permissions`` is
    rejected (``Permissions must not be set when using the legacy APIs``). The remaining
    checks are ``Intention.Validate()``: missing fields, ``SourceNS:``/``SourceName:``/
    ``DestinationNS:``/``DestinationName:`` wildcard errors, description/meta limits, the
    action and the source type. Those are all collected and reported in go-multierror's
    format (``1 error occurred:\\n\\t* ...\\n\\n``), as Consul returns them.
    Raises :class:`IntentionValidationError`.
    """
    if creating and intention.id:
        raise IntentionValidationError("ID must be empty when creating a new intention")
    if intention.permissions:
        raise IntentionValidationError("Permissions must not be set when using the legacy APIs")

    errors: list[str] = []
    sides = (
        ("SourceNS", intention.source_ns, "SourceName", intention.source_name),
        ("DestinationNS", intention.destination_ns, "DestinationName", intention.destination_name),
    )
    for ns_label, ns, name_label, name in sides:
        if not ns:
            errors.append(f"{ns_label} must be set")
        if not name:
            errors.append(f"{name_label} must be set")
    for ns_label, ns, name_label, name in sides:
        if ns != WILDCARD and WILDCARD in ns:
            errors.append(f"{ns_label}: wildcard character '*' cannot be used with partial values")
        if name != WILDCARD:
            if WILDCARD in name:
                errors.append(
                    f"{name_label}: wildcard character '*' cannot be used with partial values"
                )
            if ns == WILDCARD:
                errors.append(f"{name_label}: exact value cannot follow wildcard namespace")
    if _byte_len(intention.description) > _META_VALUE_MAX_LENGTH:
        errors.append(f"Description exceeds maximum length {_META_VALUE_MAX_LENGTH}")
    errors.extend(_meta_errors(intention.meta))
    if intention.action not in (ACTION_ALLOW, ACTION_DENY):
        errors.append("Action must be set to 'allow' or 'deny'")
    if intention.source_type != SOURCE_TYPE_CONSUL:
        errors.append("SourceType must be set to 'consul'")
    if errors:
        raise IntentionValidationError(_multierror_text(errors), errors=errors)


def _validate_permissions(permissions: Sequence[Permission], i: int) -> None:
    for j, perm in enumerate(permissions):
        if perm.action not in (ACTION_ALLOW, ACTION_DENY):
            raise IntentionValidationError(
                f"Sources[{i}].Permissions[{j}].Action must be set to 'allow' or 'deny'"
            )
        prefix = f"Sources[{i}].Permissions[{j}].HTTP"
        http = perm.http
        if http is None:
            raise IntentionValidationError(f"{prefix} is required")

        path_parts = 0
        if http.path_exact:
            path_parts += 1
            if not http.path_exact.startswith("/"):
                raise IntentionValidationError(
                    f"{prefix}.PathExact doesn't start with '/': {_go_quote(http.path_exact)}"
                )
        if http.path_prefix:
            path_parts += 1
            if not http.path_prefix.startswith("/"):
                raise IntentionValidationError(
                    f"{prefix}.PathPrefix doesn't start with '/': {_go_quote(http.path_prefix)}"
                )
        if http.path_regex:
            path_parts += 1
        if path_parts > 1:
            raise IntentionValidationError(
                f"{prefix} should only contain at most one of PathExact, PathPrefix, or PathRegex"
            )

        parts = path_parts
        for k, hdr in enumerate(http.headers):
            if not hdr.name:
                raise IntentionValidationError(f"{prefix}.Header[{k}] missing required Name field")
            kinds = sum(1 for v in (hdr.present, hdr.exact, hdr.regex, hdr.prefix, hdr.suffix) if v)
            if kinds != 1:
                raise IntentionValidationError(
                    f"{prefix}.Header[{k}] should only contain one of Present, Exact, Prefix, "
                    "Suffix, or Regex"
                )
            parts += 1

        if http.methods:
            seen: set[str] = set()
            for m in http.methods:
                if m not in HTTP_METHODS:
                    raise IntentionValidationError(
                        f"{prefix}.Methods contains an invalid method {_go_quote(m)}"
                    )
                if m in seen:
                    raise IntentionValidationError(
                        f"{prefix}.Methods contains {_go_quote(m)} more than once"
                    )
                seen.add(m)
            parts += 1

        if parts == 0:
            raise IntentionValidationError(f"{prefix} should not be empty")


# --------------------------------------------------------------------------------------------
# service-intentions config entries


@dataclass(frozen=True)
class SourceIntention:
    """One element of a ``service-intentions`` entry's ``Sources`` (``structs.SourceIntention``).

    ``precedence`` is stored as given; :meth:`ServiceIntentionsEntry.normalized` recomputes it.
    ``namespace``/``partition`` are Enterprise fields (``default``/``""`` in CE).
    """

    name: str = ""
    action: str = ""
    permissions: tuple[Permission, ...] = ()
    precedence: int = 0
    legacy_id: str = ""
    type: str = ""
    description: str = ""
    legacy_meta: Mapping[str, str] = field(default_factory=dict, hash=False)
    legacy_create_time: str = ""
    legacy_update_time: str = ""
    namespace: str = DEFAULT_NAMESPACE
    partition: str = ""
    peer: str = ""
    #: Enterprise-only; decoded so that :meth:`ServiceIntentionsEntry.validate` refuses it
    #: as CE does, instead of silently turning the source into a local one.
    sameness_group: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "permissions", tuple(self.permissions))
        object.__setattr__(self, "legacy_meta", dict(self.legacy_meta))

    @classmethod
    def from_json(cls, obj: object) -> SourceIntention:
        """Decode one source (keys any case, plus Consul's ``legacy_id``-style aliases)."""
        f = _Fields(obj, "SourceIntention", _SOURCE_ALIASES)
        return cls(
            name=f.get_str("Name"),
            action=f.get_str("Action"),
            permissions=tuple(
                Permission.from_json(p, aliases=True)
                for p in f.get_list("Permissions", "[]*IntentionPermission")
            ),
            precedence=f.get_int("Precedence"),
            legacy_id=f.get_str("LegacyID"),
            type=f.get_str("Type"),
            description=f.get_str("Description"),
            legacy_meta=f.get_str_map("LegacyMeta"),
            legacy_create_time=f.get_time("LegacyCreateTime"),
            legacy_update_time=f.get_time("LegacyUpdateTime"),
            namespace=_ns(f.get_str("Namespace")),
            partition=f.get_str("Partition"),
            peer=f.get_str("Peer"),
            sameness_group=f.get_str("SamenessGroup"),
        )

    def to_json(self) -> dict[str, Any]:
        """Consul CE's JSON for the source (omitempty fields dropped when empty)."""
        out: dict[str, Any] = {"Name": self.name}
        if self.action:
            out["Action"] = self.action
        if self.permissions:
            out["Permissions"] = [p.to_json() for p in self.permissions]
        out["Precedence"] = self.precedence
        if self.legacy_id:
            out["LegacyID"] = self.legacy_id
        out["Type"] = self.type
        if self.description:
            out["Description"] = self.description
        if self.legacy_meta:
            out["LegacyMeta"] = dict(sorted(self.legacy_meta.items()))
        if self.legacy_create_time:
            out["LegacyCreateTime"] = self.legacy_create_time
        if self.legacy_update_time:
            out["LegacyUpdateTime"] = self.legacy_update_time
        if self.namespace != DEFAULT_NAMESPACE:
            out["Namespace"] = self.namespace
        if self.partition:
            out["Partition"] = self.partition
        if self.peer:
            out["Peer"] = self.peer
        if self.sameness_group:
            out["SamenessGroup"] = self.sameness_group
        return out


@dataclass(frozen=True)
class ServiceIntentionsEntry:
    """A ``service-intentions`` config entry: every intention for destination ``name``."""

    name: str
    sources: tuple[SourceIntention, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict, hash=False)
    namespace: str = DEFAULT_NAMESPACE
    partition: str = ""
    create_index: int = 0
    modify_index: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "meta", dict(self.meta))

    @property
    def has_wildcard_destination(self) -> bool:
        """True for ``Name: "*"`` (or a wildcard namespace): L7 permissions are refused."""
        return self.name == WILDCARD or _ns(self.namespace) == WILDCARD

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ServiceIntentionsEntry:
        """Decode an entry (``Kind`` is not checked; keys any case; ``JWT``/``Hash`` ignored).

        Raises :class:`IntentionDecodeError` when a value has the wrong JSON type.
        """
        f = _Fields(obj, "ServiceIntentionsConfigEntry", _ENTRY_ALIASES)
        return cls(
            name=f.get_str("Name"),
            sources=tuple(
                SourceIntention.from_json(s) for s in f.get_list("Sources", "[]*SourceIntention")
            ),
            meta=f.get_str_map("Meta"),
            namespace=_ns(f.get_str("Namespace")),
            partition=f.get_str("Partition"),
            create_index=f.get_int("CreateIndex", "uint64"),
            modify_index=f.get_int("ModifyIndex", "uint64"),
        )

    def to_json(self) -> dict[str, Any]:
        """Consul CE's JSON for the entry, ``Kind`` first."""
        out: dict[str, Any] = {
            "Kind": KIND_SERVICE_INTENTIONS,
            "Name": self.name,
            "Sources": [s.to_json() for s in self.sources],
        }
        if self.meta:
            out["Meta"] = dict(sorted(self.meta.items()))  # Go sorts map keys
        if self.namespace != DEFAULT_NAMESPACE:
            out["Namespace"] = self.namespace
        if self.partition:
            out["Partition"] = self.partition
        out["CreateIndex"] = self.create_index
        out["ModifyIndex"] = self.modify_index
        return out

    def normalized(self, *, legacy: bool = False) -> ServiceIntentionsEntry:
        """The entry as Consul stores it after a write.

        Source ``Type`` defaults to ``consul``, namespaces to ``default``, precedence is
        recomputed, permission methods are upper-cased and sources are stably sorted by
        precedence (descending). Without ``legacy`` the legacy ID and timestamps are dropped
        (``LegacyMeta`` is kept so that :meth:`validate` can refuse it, as Consul does).
        """
        sources = []
        for src in self.sources:
            src_ns = _ns(src.namespace)
            # Local sources inherit the destination's partition; peered ones have none.
            src_partition = src.partition if src.peer else (src.partition or self.partition)
            sources.append(
                replace(
                    src,
                    type=src.type or SOURCE_TYPE_CONSUL,
                    namespace=src_ns,
                    partition=src_partition,
                    precedence=compute_precedence(src_ns, src.name, self.namespace, self.name),
                    permissions=tuple(p.normalized() for p in src.permissions),
                    legacy_id=src.legacy_id if legacy else "",
                    legacy_create_time=src.legacy_create_time if legacy else "",
                    legacy_update_time=src.legacy_update_time if legacy else "",
                )
            )
        sources.sort(key=lambda s: -s.precedence)  # list.sort is stable, like sort.SliceStable
        return replace(self, namespace=_ns(self.namespace), sources=tuple(sources))

    def validate(self, *, legacy: bool = False) -> None:
        """Check the entry with Consul's rules; raise at the first problem.

        Call it on the :meth:`normalized` entry, as Consul does (indices in messages then refer
        to the sorted ``Sources``). ``legacy`` applies the rules for writes made through the
        legacy ID-based API. Raises :class:`IntentionValidationError` with Consul's text, e.g.
        ``Sources[1] defines "web" more than once``.
        """
        if not self.name:
            raise IntentionValidationError("Name is required")
        validate_wildcards(self.name, self.namespace, self.partition)
        dest_is_wild = self.has_wildcard_destination

        if legacy:
            if self.meta:
                raise IntentionValidationError("Meta must be omitted for legacy intention writes")
        else:
            meta_errors = _meta_errors(self.meta)
            if meta_errors:
                raise IntentionValidationError(_multierror_text(meta_errors), errors=meta_errors)

        if not self.sources:
            raise IntentionValidationError("At least one source is required")

        seen: set[tuple[str, str, str, str]] = set()
        for i, src in enumerate(self.sources):
            self._validate_source(i, src, legacy=legacy, dest_is_wild=dest_is_wild)
            key = (src.peer, _partition(src.partition), _ns(src.namespace), src.name)
            if key in seen:
                # CE's ServiceName.String() is the bare name.
                if src.peer:
                    raise IntentionValidationError(
                        f"Sources[{i}] defines peer({_go_quote(src.peer)}) "
                        f"{_go_quote(src.name)} more than once"
                    )
                raise IntentionValidationError(
                    f"Sources[{i}] defines {_go_quote(src.name)} more than once"
                )
            seen.add(key)

    @staticmethod
    def _validate_source(i: int, src: SourceIntention, *, legacy: bool, dest_is_wild: bool) -> None:
        if not src.name:
            raise IntentionValidationError(f"Sources[{i}].Name is required")
        if src.sameness_group:
            # CE's validateSamenessGroup; Consul's format leaves the trailing space.
            raise IntentionValidationError(
                f"Sources[{i}].SamenessGroup: Sameness groups are a Consul Enterprise feature. "
            )
        try:
            validate_wildcards(src.name, src.namespace, src.partition, src.peer)
        except IntentionValidationError as exc:
            raise IntentionValidationError(f"Sources[{i}].{exc}") from None
        if src.peer and src.partition:
            raise IntentionValidationError(
                f"Sources[{i}].Peer: cannot set Peer and Partition at the same time."
            )
        if _byte_len(src.description) > _META_VALUE_MAX_LENGTH:
            raise IntentionValidationError(
                f"Sources[{i}].Description exceeds maximum length {_META_VALUE_MAX_LENGTH}"
            )

        if legacy:
            if src.peer:
                raise IntentionValidationError(
                    f"Sources[{i}].Peer cannot be set by legacy intentions"
                )
            meta_errors = _meta_errors(src.legacy_meta, prefix=f"Sources[{i}].")
            if meta_errors:
                raise IntentionValidationError(meta_errors[0])
            if not src.legacy_create_time:
                raise IntentionValidationError(f"Sources[{i}].LegacyCreateTime must be set")
            if not src.legacy_update_time:
                raise IntentionValidationError(f"Sources[{i}].LegacyUpdateTime must be set")
            if not src.legacy_id:
                raise IntentionValidationError(f"Sources[{i}].LegacyID must be set")
        else:
            if src.legacy_meta:
                raise IntentionValidationError(f"Sources[{i}].LegacyMeta must be omitted")
            if src.legacy_create_time:
                raise IntentionValidationError(f"Sources[{i}].LegacyCreateTime must be omitted")
            if src.legacy_update_time:
                raise IntentionValidationError(f"Sources[{i}].LegacyUpdateTime must be omitted")
            if src.legacy_id:
                raise IntentionValidationError(f"Sources[{i}].LegacyID must be omitted")

        if (legacy or not src.permissions) and src.action not in (ACTION_ALLOW, ACTION_DENY):
            raise IntentionValidationError(f"Sources[{i}].Action must be set to 'allow' or 'deny'")
        if src.permissions and src.action:
            raise IntentionValidationError(
                f"Sources[{i}].Action must be omitted if Permissions are specified"
            )
        if dest_is_wild and src.permissions:
            raise IntentionValidationError(
                f"Sources[{i}].Permissions cannot be specified on intentions with wildcarded "
                "destinations"
            )
        if src.type != SOURCE_TYPE_CONSUL:
            raise IntentionValidationError(f"Sources[{i}].Type must be set to 'consul'")
        _validate_permissions(src.permissions, i)

    def to_intentions(self) -> list[Intention]:
        """One :class:`Intention` per source, in ``Sources`` order (Consul's ``ToIntentions``).

        Each gets the entry's name/namespace as destination and the entry's indexes; a
        legacy-created source keeps its ID, own meta and timestamps, others get the entry's
        ``Meta``.
        """
        out = []
        for src in self.sources:
            legacy = bool(src.legacy_id)
            out.append(
                Intention(
                    id=src.legacy_id,
                    description=src.description,
                    source_ns=_ns(src.namespace),
                    source_name=src.name,
                    destination_ns=_ns(self.namespace),
                    destination_name=self.name,
                    source_partition="" if src.peer else src.partition,
                    destination_partition=self.partition,
                    source_peer=src.peer,
                    source_type=src.type or SOURCE_TYPE_CONSUL,
                    action=src.action,
                    permissions=src.permissions,
                    meta=src.legacy_meta if legacy else self.meta,
                    create_index=self.create_index,
                    modify_index=self.modify_index,
                    created_at=src.legacy_create_time,
                    updated_at=src.legacy_update_time,
                )
            )
        return out

    @classmethod
    def from_intentions(
        cls,
        intentions: Iterable[Intention],
        *,
        name: str | None = None,
        meta: Mapping[str, str] | None = None,
        legacy: bool = False,
        create_index: int = 0,
        modify_index: int = 0,
    ) -> ServiceIntentionsEntry:
        """Collect intentions for one destination into a normalized entry.

        ``name`` defaults to the intentions' common destination. Raises
        :class:`IntentionValidationError` if the intentions name different destinations or
        there is neither an intention nor a ``name``.
        """
        items = list(intentions)
        dests = {(i.destination_partition, i.destination_ns, i.destination_name) for i in items}
        if len(dests) > 1:
            raise IntentionValidationError("intentions have different destinations")
        if dests:
            partition, namespace, dest_name = dests.pop()
            if name is not None and name != dest_name:
                raise IntentionValidationError("intentions have different destinations")
        elif name is not None:
            partition, namespace, dest_name = "", DEFAULT_NAMESPACE, name
        else:
            raise IntentionValidationError("Name is required")
        entry = cls(
            name=dest_name,
            sources=tuple(i.to_source(legacy=legacy) for i in items),
            meta=meta or {},
            namespace=namespace,
            partition=partition,
            create_index=create_index,
            modify_index=modify_index,
        )
        return entry.normalized(legacy=legacy)


def intentions_from_config_entry(entry: Mapping[str, Any]) -> list[Intention]:
    """Decode a ``service-intentions`` entry JSON into one Intention per source.

    Raises :class:`IntentionDecodeError` for wrongly typed values.
    """
    return ServiceIntentionsEntry.from_json(entry).to_intentions()


def config_entry_from_intentions(
    intentions: Iterable[Intention],
    *,
    name: str | None = None,
    meta: Mapping[str, str] | None = None,
    create_index: int = 0,
    modify_index: int = 0,
) -> dict[str, Any]:
    """Build the normalized entry JSON (sources stably sorted by precedence) for intentions
    that share one destination. Raises :class:`IntentionValidationError` if they do not."""
    return ServiceIntentionsEntry.from_intentions(
        intentions,
        name=name,
        meta=meta,
        create_index=create_index,
        modify_index=modify_index,
    ).to_json()


def normalize_config_entry(entry: Mapping[str, Any], *, legacy: bool = False) -> dict[str, Any]:
    """Return the entry JSON as Consul would store it after a write.

    See :meth:`ServiceIntentionsEntry.normalized`. Raises :class:`IntentionDecodeError` for
    wrongly typed values.
    """
    return ServiceIntentionsEntry.from_json(entry).normalized(legacy=legacy).to_json()


def validate_config_entry(entry: Mapping[str, Any], *, legacy: bool = False) -> None:
    """Normalize then validate an entry JSON exactly as a Consul write does.

    Raises :class:`IntentionDecodeError` (wrong JSON types) or
    :class:`IntentionValidationError` (Consul's message for the first problem).
    """
    ServiceIntentionsEntry.from_json(entry).normalized(legacy=legacy).validate(legacy=legacy)


# --------------------------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of an authorization: allowed or not, why, and the intention that decided.

    ``intention`` is ``None`` when the default applied because no intention matched.
    ``permission_index`` is the 0-based index of the L7 permission that decided, if any.
    """

    allowed: bool
    reason: str
    intention: Intention | None = None
    permission_index: int | None = None


Headers = Mapping[str, str] | Sequence[tuple[str, str]]

_HeaderValues = dict[str, list[str]]
_Predicate = Callable[[str, str, _HeaderValues], bool]


def _compile_regex(pattern: str) -> re.Pattern[str] | None:
    # Envoy matches with RE2, whose \d, \w, \s and \b are ASCII-only; Python's are Unicode
    # by default, so "/items/\d+" would also admit "/items/\u0663".
    try:
        return re.compile(pattern, re.ASCII)
    except re.error:
        return None


def _compile_header(hdr: HeaderMatch) -> Callable[[_HeaderValues], bool] | None:
    """A predicate for one header item, or None when its regex does not compile."""
    name = hdr.name.lower()
    invert = hdr.invert
    if hdr.present:
        return lambda hv: (name in hv) != invert

    test: Callable[[str], bool]
    if hdr.exact:
        exact = hdr.exact
        test = lambda v: v == exact  # noqa: E731
    elif hdr.prefix:
        prefix = hdr.prefix
        test = lambda v: v.startswith(prefix)  # noqa: E731
    elif hdr.suffix:
        suffix = hdr.suffix
        test = lambda v: v.endswith(suffix)  # noqa: E731
    elif hdr.regex:
        rx = _compile_regex(hdr.regex)
        if rx is None:
            return None
        test = lambda v: rx.fullmatch(v) is not None  # noqa: E731
    else:
        return lambda hv: False

    def match(hv: _HeaderValues) -> bool:
        values = hv.get(name)
        # Envoy: a missing header fails every value matcher, inverted or not; repeated headers
        # are matched as one comma-joined value.
        if values is None:
            return False
        return test(",".join(values)) != invert

    return match


def _compile_permission(perm: Permission) -> _Predicate:
    """A predicate (method, path, headers) -> bool for one permission.

    A permission whose regex cannot be compiled fails closed: a deny permission then matches
    every request and an allow permission none (Envoy would refuse the whole configuration).
    """
    http = perm.http
    broken: _Predicate = (
        (lambda m, p, h: True) if perm.action == ACTION_DENY else (lambda m, p, h: False)
    )
    if http is None:
        return broken

    path_test: Callable[[str], bool] | None = None
    if http.path_exact:
        exact = http.path_exact
        path_test = lambda p: p == exact  # noqa: E731
    elif http.path_prefix:
        prefix = http.path_prefix
        path_test = lambda p: p.startswith(prefix)  # noqa: E731
    elif http.path_regex:
        rx = _compile_regex(http.path_regex)
        if rx is None:
            return broken
        path_test = lambda p: rx.fullmatch(p) is not None  # noqa: E731

    methods = frozenset(http.methods)
    header_tests = []
    for hdr in http.headers:
        t = _compile_header(hdr)
        if t is None:
            return broken
        header_tests.append(t)
    header_tuple = tuple(header_tests)

    def match(method: str, path: str, hv: _HeaderValues) -> bool:
        if path_test is not None and not path_test(path):
            return False
        if methods and method not in methods:
            return False
        return all(t(hv) for t in header_tuple)

    return match


def _header_values(headers: Headers, method: str, path: str) -> _HeaderValues:
    items = headers.items() if isinstance(headers, Mapping) else headers
    hv: _HeaderValues = {}
    for k, v in items:
        hv.setdefault(k.lower(), []).append(v)
    # Envoy exposes the request line as pseudo-headers that header matchers can name.
    hv.setdefault(":method", [method])
    hv.setdefault(":path", [path])
    # Envoy keeps the Host header only as ":authority" (its Headers::Host is ":authority"),
    # so a header rule on "host" never sees a value there.
    host = hv.pop("host", None)
    if host is not None:
        hv.setdefault(":authority", host)
    return hv


def _split_target(target: str) -> tuple[str, str]:
    """``(path, rest)``: the path without query string or fragment, and what followed it."""
    cut = len(target)
    for sep in ("?", "#"):
        at = target.find(sep)
        if 0 <= at < cut:
            cut = at
    return target[:cut], target[cut:]


_UNRESERVED: Final = frozenset(string.ascii_letters + string.digits + "-._~")
_PERCENT_ESCAPE: Final = re.compile(r"%([0-9A-Fa-f]{2})")


def _decode_unreserved(m: re.Match[str]) -> str:
    ch = chr(int(m.group(1), 16))
    return ch if ch in _UNRESERVED else m.group(0)


def _normalize_path(path: str) -> str:
    """The path as Envoy's ``normalize_path`` leaves it, which Consul turns on by default.

    Backslashes become slashes, escapes of unreserved characters are decoded (``%61`` is
    ``a``, ``%2e`` is ``.``; ``%2F`` stays) and dot segments are removed (RFC 3986 5.2.4);
    adjacent slashes are kept (Consul leaves ``merge_slashes`` off).
    """
    if "\\" in path:
        path = path.replace("\\", "/")
    if "%" in path:
        path = _PERCENT_ESCAPE.sub(_decode_unreserved, path)
    if not path.startswith("/") or "/." not in path:
        return path
    segments = path.split("/")[1:]
    out: list[str] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
            continue
        if i == last:
            out.append("")  # "/a/.." is "/", "/a/." is "/a/"
    return "/" + "/".join(out)


_SourceKey = tuple[str, str, str, str]


class IntentionSet:
    """Precomputed intentions for one destination, for local (agent-free) decisions.

    Build it from the list ``match?by=destination&name=<service>`` returns (which already
    includes wildcard-destination intentions); it is re-sorted into Consul's order. Lookups
    are O(1): for each exact source key the first (winning) intention is indexed, and a
    decision compares at most four candidates by their position in the sorted order — so an
    exact source on a wildcard destination (precedence 6) correctly loses to a wildcard
    source on the exact destination (8). L7 matchers and regexes are compiled once, here.
    """

    def __init__(self, intentions: Iterable[Intention], *, default_allow: bool) -> None:
        self._sorted: tuple[Intention, ...] = tuple(sort_intentions(intentions))
        self.default_allow = default_allow
        self._first: dict[_SourceKey, int] = {}
        self._l7: dict[int, tuple[_Predicate, ...]] = {}
        # Decisions are immutable: build each intention's L4 decision once, not per call.
        self._l4: list[Decision] = []
        for pos, ixn in enumerate(self._sorted):
            part = "" if ixn.source_peer else _partition(ixn.source_partition)
            self._first.setdefault((ixn.source_peer, part, ixn.source_ns, ixn.source_name), pos)
            if ixn.permissions:
                self._l7[pos] = tuple(_compile_permission(p) for p in ixn.permissions)
                self._l4.append(Decision(False, f"Matched L7 intention: {ixn.describe()}", ixn))
            else:
                allowed = ixn.action == ACTION_ALLOW
                self._l4.append(Decision(allowed, f"Matched L4 intention: {ixn.describe()}", ixn))
        self._default_decision = Decision(default_allow, DEFAULT_REASON)

    @property
    def intentions(self) -> tuple[Intention, ...]:
        """The intentions in evaluation order."""
        return self._sorted

    def __len__(self) -> int:
        return len(self._sorted)

    def _first_pos(self, source_ns: str, source_name: str, partition: str, peer: str) -> int | None:
        ns = _ns(source_ns)
        part = "" if peer else _partition(partition)
        best: int | None = None
        # ("*", name) is never valid, but looking it up keeps us identical to a linear walk.
        for key in (
            (peer, part, ns, source_name),
            (peer, part, ns, WILDCARD),
            (peer, part, WILDCARD, WILDCARD),
            (peer, part, WILDCARD, source_name),
        ):
            pos = self._first.get(key)
            if pos is not None and (best is None or pos < best):
                best = pos
        return best

    def first_match(
        self,
        source_ns: str,
        source_name: str,
        *,
        partition: str = DEFAULT_PARTITION,
        peer: str = "",
    ) -> Intention | None:
        """The intention that applies to this caller, or None when the default applies."""
        pos = self._first_pos(source_ns, source_name, partition, peer)
        return None if pos is None else self._sorted[pos]

    def _default(self) -> Decision:
        return self._default_decision

    def decide_l4(
        self,
        source_ns: str,
        source_name: str,
        partition: str = DEFAULT_PARTITION,
        *,
        peer: str = "",
    ) -> Decision:
        """Decide a connection the way Consul's authorize endpoint does.

        An L4 intention decides by its action (``Matched L4 intention: ...``); an L7 one
        denies (``Matched L7 intention: ...``); with no match the default applies
        (``Default behavior configured by ACLs``).
        """
        pos = self._first_pos(source_ns, source_name, partition, peer)
        if pos is None:
            return self._default_decision
        return self._l4[pos]

    def decide_l7(
        self,
        source_ns: str,
        source_name: str,
        method: str,
        path: str,
        headers: Headers = (),
        *,
        partition: str = DEFAULT_PARTITION,
        peer: str = "",
    ) -> Decision:
        """Decide one HTTP request from this caller.

        An L4 intention decides by its action. For an L7 intention the first permission whose
        criteria all match decides (reason ``Matched L7 intention: <intention>,
        Permissions[<j>] (ALLOW|DENY)``); if none matches, the default applies. ``path`` is
        the request target as sent (escaped; query string allowed): it is matched without
        query string, normalized as Envoy does for Consul (dot segments, ``\\``, escaped
        unreserved characters); when normalizing changed it, the path as given must be
        allowed as well. Header names compare case-insensitively (``Host`` is only
        ``:authority``, as in Envoy); regexes must match the whole value, with RE2's
        ASCII-only classes.
        """
        pos = self._first_pos(source_ns, source_name, partition, peer)
        if pos is None:
            return self._default()
        ixn = self._sorted[pos]
        predicates = self._l7.get(pos)
        if predicates is None:
            return Decision(
                ixn.action == ACTION_ALLOW, f"Matched L4 intention: {ixn.describe()}", ixn
            )
        url_path, rest = _split_target(path)
        normalized = _normalize_path(url_path)
        hv = _header_values(headers, method, normalized + rest)
        decision = self._decide_permissions(ixn, predicates, method, normalized, hv)
        if decision.allowed and normalized != url_path:
            # Envoy would forward the normalized path; here the application routes on the
            # path as given ("/admin/../public" may reach an /admin handler), so that one
            # must be allowed too.
            as_given = self._decide_permissions(ixn, predicates, method, url_path, hv)
            if not as_given.allowed:
                return as_given
        return decision

    def _decide_permissions(
        self,
        ixn: Intention,
        predicates: tuple[_Predicate, ...],
        method: str,
        url_path: str,
        hv: _HeaderValues,
    ) -> Decision:
        for j, pred in enumerate(predicates):
            if pred(method, url_path, hv):
                action = ixn.permissions[j].action
                return Decision(
                    action == ACTION_ALLOW,
                    f"Matched L7 intention: {ixn.describe()}, Permissions[{j}] ({action.upper()})",
                    ixn,
                    j,
                )
        return Decision(
            self.default_allow,
            f"Matched L7 intention: {ixn.describe()}, no permission matched; {DEFAULT_REASON}",
            ixn,
        )
