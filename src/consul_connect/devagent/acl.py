"""ACLs of the dev agent (consul-api.md §6): tokens, policies, roles, identities, rights.

The ACL system is off unless ``acl_enabled``: then every request is allowed and the
``/v1/acl/*`` endpoints answer 401. When on, tokens, policies and roles live in store tables (so
they survive a restart with a data directory); each request's token is resolved to an
:class:`ACLAuthorizer` that evaluates Consul's rule trees over the union of the token's
policies and identities and those of its live roles (a deleted role or policy simply
stops counting, as in Consul's resolver):

* an exact rule beats a prefix rule, the longest prefix wins;
* several policies naming the same rule merge as ``deny`` > ``write`` > ``list`` > ``read``;
* a ``service``/``service_prefix`` rule also yields an intention right (explicit
  ``intentions = ...`` or ``read`` for read/write services, ``deny`` otherwise);
* with no matching rule ``default_policy`` decides, except for ``acl`` which needs a rule.

Tables: ``acl_tokens`` (accessor -> ``{"token": <Consul JSON>, "expires_ns": int|None}``),
``acl_policies`` (ID -> Consul policy JSON), ``acl_roles`` (ID -> Consul role JSON, policy
links stored by ID only), ``acl_meta`` (``bootstrap`` -> reset index). Links to policies and
roles carry only an ID in the store; reads fill in the current name and drop links whose
target was deleted (Consul's state-store fix-ups).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from consul_connect.devagent.http import HTTPError

if TYPE_CHECKING:
    from consul_connect.devagent.context import AgentContext

__all__ = [
    "ANONYMOUS_ACCESSOR_ID",
    "ANONYMOUS_SECRET_ID",
    "GLOBAL_MANAGEMENT_POLICY_ID",
    "GLOBAL_MANAGEMENT_POLICY_NAME",
    "POLICIES_TABLE",
    "ROLES_TABLE",
    "TOKENS_TABLE",
    "ACLAuthorizer",
    "ACLRules",
    "ACLRulesError",
    "ACLSystem",
    "filtered_headers",
    "go_quote",
    "parse_rules",
    "rfc3339_nano",
    "role_json",
]

TOKENS_TABLE = "acl_tokens"
POLICIES_TABLE = "acl_policies"
ROLES_TABLE = "acl_roles"
META_TABLE = "acl_meta"

ANONYMOUS_ACCESSOR_ID = "00000000-0000-0000-0000-000000000002"
ANONYMOUS_SECRET_ID = "anonymous"
GLOBAL_MANAGEMENT_POLICY_ID = "00000000-0000-0000-0000-000000000001"
GLOBAL_MANAGEMENT_POLICY_NAME = "global-management"
RESERVED_ID_PREFIX = "00000000-0000-0000-0000-0000000000"

# The builtin management policy's rules, as Consul stores them (its Rules cannot change).
GLOBAL_MANAGEMENT_RULES = """
acl = "write"
agent_prefix "" {
  policy = "write"
}
event_prefix "" {
  policy = "write"
}
key_prefix "" {
  policy = "write"
}
keyring = "write"
node_prefix "" {
  policy = "write"
}
operator = "write"
mesh = "write"
peering = "write"
query_prefix "" {
  policy = "write"
}
service_prefix "" {
  policy = "write"
  intentions = "write"
}
session_prefix "" {
  policy = "write"
}
"""

# Resources with a single, unnamed rule; denial texts carry no ` on "..."` for them.
GLOBAL_RESOURCES = frozenset({"acl", "operator", "keyring", "mesh", "peering"})
# Resources with exact/prefix rule trees (the rule block names of the policy language).
TREE_RESOURCES = ("agent", "event", "key", "node", "query", "service", "session")
_LEVELS = ("read", "list", "write", "deny")
_RANK = {"read": 0, "list": 1, "write": 2, "deny": 3}
_ALIASES = {"intentions": "intention", "services": "service", "nodes": "node", "keys": "key"}

_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z"
)


def is_uuid(value: str) -> bool:
    """True when ``value`` has Consul's UUID shape (8-4-4-4-12 hex digits)."""
    return bool(_UUID_RE.match(value))


def go_quote(s: str) -> str:
    """Quote ``s`` like Go's ``%q`` does for the names Consul puts in its messages."""
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def rfc3339_nano(ns: int) -> str:
    """Format a UTC time in ns since the epoch like Go's ``RFC3339Nano`` (trailing zeros cut)."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    if frac:
        base += "." + f"{frac:09d}".rstrip("0")
    return base + "Z"


def filtered_headers(authz: ACLAuthorizer, dropped: bool) -> dict[str, str]:
    """The ``X-Consul-Results-Filtered-By-ACLs`` header for a filtered read.

    Consul sends ``true`` only when ACLs removed something *and* the request carried a
    token; never ``false``. Returns ``{}`` otherwise.
    """
    if dropped and authz.has_token:
        return {"X-Consul-Results-Filtered-By-ACLs": "true"}
    return {}


# --------------------------------------------------------------------------------------------
# Rules


class ACLRulesError(ValueError):
    """Policy rules that cannot be parsed (HCL subset or JSON)."""


@dataclass
class ACLRules:
    """Merged rules of one token: exact/prefix trees per resource, plus global rules.

    Service rules keep ``(policy, intentions)`` so that intention rights are derived after
    merging, as Consul does.
    """

    exact: dict[str, dict[str, str]] = field(default_factory=dict)
    prefix: dict[str, dict[str, str]] = field(default_factory=dict)
    service_intentions_exact: dict[str, str] = field(default_factory=dict)
    service_intentions_prefix: dict[str, str] = field(default_factory=dict)
    global_: dict[str, str] = field(default_factory=dict)

    def add(
        self, resource: str, name: str, level: str, *, prefix: bool, intentions: str = ""
    ) -> None:
        """Merge one rule (the strongest level wins on a clash)."""
        table = (self.prefix if prefix else self.exact).setdefault(resource, {})
        table[name] = _stronger(table.get(name, ""), level)
        if resource == "service" and intentions:
            it = self.service_intentions_prefix if prefix else self.service_intentions_exact
            it[name] = _stronger(it.get(name, ""), intentions)

    def add_global(self, resource: str, level: str) -> None:
        """Merge a global rule (``acl = "write"`` ...)."""
        self.global_[resource] = _stronger(self.global_.get(resource, ""), level)

    def merge(self, other: ACLRules) -> None:
        """Merge every rule of ``other`` into this one."""
        for res, rules in other.exact.items():
            for name, lvl in rules.items():
                self.add(res, name, lvl, prefix=False)
        for res, rules in other.prefix.items():
            for name, lvl in rules.items():
                self.add(res, name, lvl, prefix=True)
        for name, lvl in other.service_intentions_exact.items():
            self.service_intentions_exact[name] = _stronger(
                self.service_intentions_exact.get(name, ""), lvl
            )
        for name, lvl in other.service_intentions_prefix.items():
            self.service_intentions_prefix[name] = _stronger(
                self.service_intentions_prefix.get(name, ""), lvl
            )
        for res, lvl in other.global_.items():
            self.add_global(res, lvl)

    def tree(self, resource: str) -> tuple[dict[str, str], dict[str, str]]:
        """``(exact, prefix)`` rules of ``resource``; ``intention`` is derived from services."""
        if resource != "intention":
            return self.exact.get(resource, {}), self.prefix.get(resource, {})
        exact = {
            n: _derived_intention(p, self.service_intentions_exact.get(n, ""))
            for n, p in self.exact.get("service", {}).items()
        }
        prefix = {
            n: _derived_intention(p, self.service_intentions_prefix.get(n, ""))
            for n, p in self.prefix.get("service", {}).items()
        }
        return exact, prefix


def _stronger(a: str, b: str) -> str:
    if not a:
        return b
    if not b:
        return a
    return a if _RANK[a] >= _RANK[b] else b


def _derived_intention(policy: str, explicit: str) -> str:
    if explicit:
        return explicit
    return "read" if policy in ("read", "write") else "deny"


def _lookup(name: str, exact: Mapping[str, str], prefix: Mapping[str, str]) -> str | None:
    """Consul's getPolicy: exact match first, else the longest matching prefix."""
    if name in exact:
        return exact[name]
    best: str | None = None
    best_len = -1
    for p, lvl in prefix.items():
        if name.startswith(p) and len(p) > best_len:
            best, best_len = lvl, len(p)
    return best


def _enforce(rule: str, required: str) -> bool | None:
    """Consul's enforce(): True/False, or None when the rule makes no decision."""
    if rule == "write":
        return True
    if rule == "list":
        return required in ("list", "read")
    if rule == "read":
        return required == "read"
    if rule == "deny":
        return False
    return None


def _check_level(level: object, where: str, *, allow_list: bool = False) -> str:
    """Consul's isPolicyValid: a level in any case (AccessLevelFromString lower-cases it);
    ``list`` only where ``allow_list`` (key rules). Returns the lower-case level."""
    lowered = level.lower() if isinstance(level, str) else None
    if lowered not in _LEVELS or (lowered == "list" and not allow_list):
        shown = go_quote(level) if isinstance(level, str) else repr(level)
        raise ACLRulesError(f"Invalid {where} policy: {shown}")
    return lowered


def parse_rules(text: str) -> ACLRules:
    """Parse policy rules (JSON or the HCL subset Consul policies use) into :class:`ACLRules`.

    Supported: ``<res> "<name>" { policy = "..." [intentions = "..."] }`` and
    ``<res>_prefix`` blocks for agent/event/key/node/query/service/session, and
    ``acl|operator|keyring|mesh|peering = "..."``. Raises :class:`ACLRulesError`.
    """
    rules = ACLRules()
    stripped = text.strip()
    if not stripped:
        return rules
    doc = json.loads(stripped) if stripped.startswith("{") else _parse_hcl(stripped)
    if not isinstance(doc, dict):
        raise ACLRulesError("rules must be an object")
    for key, value in doc.items():
        if key in GLOBAL_RESOURCES:
            rules.add_global(key, _check_level(value, key))
            continue
        base, is_prefix = (
            (key[: -len("_prefix")], True) if key.endswith("_prefix") else (key, False)
        )
        if base not in TREE_RESOURCES:
            raise ACLRulesError(f"Unsupported rule block {key!r}")
        for block in value if isinstance(value, list) else [value]:
            if not isinstance(block, dict):
                raise ACLRulesError(f"Invalid {key} block")
            for name, body in block.items():
                if not isinstance(body, dict):
                    raise ACLRulesError(f"Invalid {key} {name!r} block")
                raw_policy = body.get("policy")
                level = _check_level(raw_policy, key, allow_list=base == "key")
                intentions = body.get("intentions", "")
                if intentions:
                    intentions = _check_level(intentions, f"{key} intentions")
                elif base == "service" and raw_policy != level:
                    # policy_authorizer.go loadRules derives the intention right with a
                    # case-sensitive switch: "WRITE" grants service:write but intentions deny.
                    intentions = "deny"
                rules.add(base, str(name), level, prefix=is_prefix, intentions=intentions)
    return rules


_HCL_TOKEN = re.compile(
    r'\s*(?:(#[^\n]*|//[^\n]*)|("(?:[^"\\]|\\.)*")|([A-Za-z_][A-Za-z0-9_]*)|([{}=\[\],]))'
)


def _hcl_tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _HCL_TOKEN.match(text, pos)
        if m is None:
            raise ACLRulesError(f"unexpected character at offset {pos}")
        pos = m.end()
        if m.group(1):
            continue
        out.append(m.group(2) or m.group(3) or m.group(4))
    return out


def _hcl_string(tok: str) -> str:
    if not tok.startswith('"'):
        raise ACLRulesError(f"expected a string, got {tok!r}")
    value = json.loads(tok)
    assert isinstance(value, str)
    return value


def _parse_hcl(text: str) -> dict[str, Any]:
    """A small HCL reader: ``key = "v"`` and ``key "label" { key = "v" ... }`` blocks."""
    toks = _hcl_tokens(text)
    i = 0
    out: dict[str, Any] = {}

    def take() -> str:
        nonlocal i
        if i >= len(toks):
            raise ACLRulesError("unexpected end of rules")
        tok = toks[i]
        i += 1
        return tok

    while i < len(toks):
        key = take()
        if not re.match(r"[A-Za-z_]", key):
            raise ACLRulesError(f"unexpected token {key!r}")
        nxt = take()
        if nxt == "=":
            out[key] = _hcl_string(take())
            continue
        label = _hcl_string(nxt)
        if take() != "{":
            raise ACLRulesError(f"expected '{{' after {key} {label!r}")
        body: dict[str, str] = {}
        while True:
            tok = take()
            if tok == "}":
                break
            if take() != "=":
                raise ACLRulesError(f"expected '=' after {tok!r}")
            body[tok] = _hcl_string(take())
        out.setdefault(key, {})[label] = body
    return out


def _service_identity_rules(name: str) -> ACLRules:
    r = ACLRules()
    r.add("service", name, "write", prefix=False)
    r.add("service", f"{name}-sidecar-proxy", "write", prefix=False)
    r.add("service", "", "read", prefix=True)
    r.add("node", "", "read", prefix=True)
    return r


def _node_identity_rules(name: str) -> ACLRules:
    r = ACLRules()
    r.add("node", name, "write", prefix=False)
    r.add("service", "", "read", prefix=True)
    return r


# --------------------------------------------------------------------------------------------
# Authorizer


class ACLAuthorizer:
    """The rights of one resolved token.

    ``allowed(resource, level, name)`` answers; ``require(...)`` raises the 403 Consul sends
    (``Permission denied: token with AccessorID '<a>' lacks permission '<res>:<level>' on
    "<name>"``). Resources are Consul's (``service``, ``node``, ``intention`` (or
    ``intentions``), ``operator``, ``agent``, ``acl``, ``key``, ``query``, ``mesh`` ...),
    levels ``read``/``list``/``write``.
    """

    def __init__(
        self,
        system: ACLSystem,
        token: str,
        *,
        accessor_id: str = "",
        rules: ACLRules | None = None,
    ) -> None:
        self.system = system
        self.token = token
        self.accessor_id = accessor_id
        self.rules = rules if rules is not None else ACLRules()

    @property
    def has_token(self) -> bool:
        """True when the request carried (or defaulted to) a non-empty token."""
        return bool(self.token)

    @property
    def is_anonymous(self) -> bool:
        """True when the request resolved to the anonymous token."""
        return self.accessor_id == ANONYMOUS_ACCESSOR_ID

    @property
    def intention_default_allow(self) -> bool:
        """The default decision for intentions when nothing matches.

        Policies cannot set it, so it is ``acl.default_policy`` for every token (management
        included), and ``True`` with ACLs disabled.
        """
        return self.system.intention_default_allow

    def _decide(self, resource: str, level: str, name: str) -> bool | None:
        if resource in GLOBAL_RESOURCES:
            chain = {"mesh": ("mesh", "operator"), "peering": ("peering", "mesh", "operator")}
            for res in chain.get(resource, (resource,)):
                rule = self.rules.global_.get(res)
                if rule is not None:
                    return _enforce(rule, level)
            return None
        exact, prefix = self.rules.tree(resource)
        if resource == "intention" and name == "*":
            return _wildcard_intention(exact, prefix, level)
        rule = _lookup(name, exact, prefix)
        return None if rule is None else _enforce(rule, level)

    def allowed(self, resource: str, level: str, name: str = "") -> bool:
        """True when this token holds ``resource:level`` on ``name``."""
        if not self.system.enabled:
            return True
        resource = _ALIASES.get(resource, resource)
        decision = self._decide(resource, level, name)
        if decision is not None:
            return decision
        if resource == "acl":
            # Even default_policy=allow grants no ACL management.
            return False
        return self.system.default_policy == "allow"

    def denial(self, resource: str, level: str, name: str = "") -> HTTPError:
        """The 403 Consul sends for a missing ``resource:level`` on ``name``."""
        resource = _ALIASES.get(resource, resource)
        who = (
            "anonymous token"
            if self.is_anonymous
            else f"token with AccessorID '{self.accessor_id}'"
        )
        text = f"Permission denied: {who} lacks permission '{resource}:{level}'"
        if resource not in GLOBAL_RESOURCES:
            text += f" on {go_quote(name)}"
        if self.is_anonymous:
            text += (
                ". The anonymous token is used implicitly when a request does not specify a token."
            )
        return HTTPError(403, text)

    def require(self, resource: str, level: str, name: str = "") -> None:
        """Raise the 403 Consul sends when ``resource:level`` on ``name`` is missing."""
        if not self.allowed(resource, level, name):
            raise self.denial(resource, level, name)


def _wildcard_intention(
    exact: Mapping[str, str], prefix: Mapping[str, str], level: str
) -> bool | None:
    """Consul's any/allAllowed for the ``*`` intention name (read: any rule; write: all)."""
    names = set(exact) | set(prefix)
    if level == "write":
        decision: bool | None = None
        if "" in prefix:
            decision = _enforce(prefix[""], level)
            if decision is False:
                return False
        for n in names:
            d = _enforce(prefix[n], level) if n in prefix else None
            if d is not False and n in exact:
                e = _enforce(exact[n], level)
                d = d if e is None else e
            if d is False:
                return False
        return decision
    decision = None
    if "" in prefix:
        decision = _enforce(prefix[""], level)
        if decision:
            return True
    for n in names:
        d = _enforce(prefix[n], level) if n in prefix else None
        if d is not True and n in exact:
            d = _enforce(exact[n], level)
        if d:
            return True
    return decision


# --------------------------------------------------------------------------------------------
# System


class ACLSystem:
    """Token store and policy evaluation; disabled (allow everything) by default."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.enabled = ctx.config.acl_enabled
        self.default_policy = ctx.config.acl_default_policy
        if self.enabled:
            self._bootstrap_builtins()

    # -- state ------------------------------------------------------------------------------

    @property
    def tokens(self) -> dict[str, Any]:
        """The token table (accessor -> record)."""
        return self.ctx.store.table(TOKENS_TABLE)

    @property
    def policies(self) -> dict[str, Any]:
        """The policy table (ID -> policy JSON)."""
        return self.ctx.store.table(POLICIES_TABLE)

    @property
    def bootstrap_index(self) -> int | None:
        """The index at which ACLs were bootstrapped, or None."""
        rec = self.ctx.store.table(META_TABLE).get("bootstrap")
        return None if rec is None else int(rec["index"])

    @property
    def intention_default_allow(self) -> bool:
        """The intention default of every token (anonymous included)."""
        return not self.enabled or self.default_policy == "allow"

    def _bootstrap_builtins(self) -> None:
        store = self.ctx.store
        changed = False
        if GLOBAL_MANAGEMENT_POLICY_ID not in self.policies:
            idx = store.next_index()
            self.policies[GLOBAL_MANAGEMENT_POLICY_ID] = policy_json(
                GLOBAL_MANAGEMENT_POLICY_ID,
                GLOBAL_MANAGEMENT_POLICY_NAME,
                "Builtin Policy that grants unlimited access",
                GLOBAL_MANAGEMENT_RULES,
                [],
                idx,
                idx,
            )
            changed = True
        if ANONYMOUS_ACCESSOR_ID not in self.tokens:
            idx = store.next_index()
            self.tokens[ANONYMOUS_ACCESSOR_ID] = {
                "token": token_json(
                    accessor=ANONYMOUS_ACCESSOR_ID,
                    secret=ANONYMOUS_SECRET_ID,
                    description="Anonymous Token",
                    create_ns=time.time_ns(),
                    index=idx,
                ),
                "expires_ns": None,
            }
            changed = True
        secret = self.ctx.config.acl_initial_management_token
        if secret and self.find_by_secret(secret) is None:
            idx = store.next_index()
            accessor = str(uuid.uuid4())
            self.tokens[accessor] = {
                "token": token_json(
                    accessor=accessor,
                    secret=secret,
                    description="Initial Management Token",
                    policies=[{"ID": GLOBAL_MANAGEMENT_POLICY_ID}],
                    create_ns=time.time_ns(),
                    index=idx,
                ),
                "expires_ns": None,
            }
            if self.bootstrap_index is None:
                store.table(META_TABLE)["bootstrap"] = {"index": idx}
            changed = True
        if changed:
            store.commit(TOKENS_TABLE, POLICIES_TABLE, META_TABLE)

    def find_by_secret(self, secret: str) -> dict[str, Any] | None:
        """The live (unexpired) token record whose SecretID is ``secret``, or None."""
        now = time.time_ns()
        for rec in self.tokens.values():
            if rec["token"]["SecretID"] == secret:
                exp = rec.get("expires_ns")
                if exp is not None and exp <= now:
                    return None
                return dict(rec)
        return None

    @property
    def roles(self) -> dict[str, Any]:
        """The role table (ID -> role JSON with ID-only policy links)."""
        return self.ctx.store.table(ROLES_TABLE)

    def policy_by_name(self, name: str) -> dict[str, Any] | None:
        """The policy JSON named ``name``, or None."""
        for pol in self.policies.values():
            if pol["Name"] == name:
                return dict(pol)
        return None

    def role_by_name(self, name: str) -> dict[str, Any] | None:
        """The stored role JSON named ``name``, or None."""
        for role in self.roles.values():
            if role["Name"] == name:
                return dict(role)
        return None

    def _named_links(self, obj: dict[str, Any], key: str, table: Mapping[str, Any]) -> None:
        """Fill in the current names of ``obj[key]`` links; drop links to deleted targets."""
        if key not in obj:
            return
        links = [
            {"ID": link["ID"], "Name": table[link["ID"]]["Name"]}
            for link in obj[key]
            if link["ID"] in table
        ]
        if links:
            obj[key] = links
        else:
            del obj[key]

    def token_view(self, rec: Mapping[str, Any], *, hide_secret: bool = False) -> dict[str, Any]:
        """A token's Consul JSON with policy and role names filled in (secret hidden if asked).

        Links to deleted policies or roles are left out (state-store fixupTokenPolicyLinks and
        fixupTokenRoleLinks).
        """
        tok = json.loads(json.dumps(rec["token"]))
        self._named_links(tok, "Policies", self.policies)
        self._named_links(tok, "Roles", self.roles)
        if hide_secret:
            tok["SecretID"] = "<hidden>"
        return _ordered_token(tok)

    def role_view(self, role: Mapping[str, Any]) -> dict[str, Any]:
        """A role's Consul JSON with policy names filled in (fixupRolePolicyLinks)."""
        out = json.loads(json.dumps(role))
        self._named_links(out, "Policies", self.policies)
        return _ordered_role(out)

    # -- resolution -------------------------------------------------------------------------

    def rules_for(self, rec: Mapping[str, Any]) -> ACLRules:
        """The merged rules of a token record.

        Consul's resolvePoliciesForIdentity: the token's policies, service and node
        identities, plus the policies and identities of every role it links that still
        exists (deleted roles and policies are skipped).
        """
        tok = rec["token"]
        rules = ACLRules()
        self._merge_grants(rules, tok)
        for link in tok.get("Roles", []):
            role = self.roles.get(link["ID"])
            if role is not None:
                self._merge_grants(rules, role)
        return rules

    def _merge_grants(self, rules: ACLRules, holder: Mapping[str, Any]) -> None:
        """Merge the policy links and identities of a token or role into ``rules``."""
        dc = self.ctx.config.datacenter
        for link in holder.get("Policies", []):
            pol = self.policies.get(link["ID"])
            if pol is None:
                continue
            dcs = pol.get("Datacenters") or []
            if dcs and dc not in dcs:
                continue
            try:
                rules.merge(parse_rules(pol.get("Rules", "")))
            except (ACLRulesError, ValueError):
                continue
        for ident in holder.get("ServiceIdentities", []):
            dcs = ident.get("Datacenters") or []
            if dcs and dc not in dcs:
                continue
            rules.merge(_service_identity_rules(ident["ServiceName"]))
        for ident in holder.get("NodeIdentities", []):
            if ident.get("Datacenter") == dc:
                rules.merge(_node_identity_rules(ident["NodeName"]))

    def not_found_error(self) -> HTTPError:
        """The 403 for an unknown secret (with the bootstrap hint before bootstrapping)."""
        if self.bootstrap_index is None:
            return HTTPError(
                403,
                "ACL system must be bootstrapped before making any requests that require "
                "authorization: ACL not found",
            )
        return HTTPError(403, "ACL not found")

    def authorizer(self, token: str) -> ACLAuthorizer:
        """Resolve ``token`` (empty = anonymous); 403 ``ACL not found`` when unknown."""
        if not self.enabled:
            return ACLAuthorizer(self, token)
        rec = self.find_by_secret(token or ANONYMOUS_SECRET_ID)
        if rec is None:
            raise self.not_found_error()
        return ACLAuthorizer(
            self,
            token,
            accessor_id=rec["token"]["AccessorID"],
            rules=self.rules_for(rec),
        )


# --------------------------------------------------------------------------------------------
# JSON helpers shared with the endpoints

_TOKEN_ORDER = (
    "AccessorID",
    "SecretID",
    "Description",
    "Policies",
    "Roles",
    "ServiceIdentities",
    "NodeIdentities",
    "TemplatedPolicies",
    "Local",
    "AuthMethod",
    "ExpirationTime",
    "CreateTime",
    "Hash",
    "CreateIndex",
    "ModifyIndex",
)


_ROLE_ORDER = (
    "ID",
    "Name",
    "Description",
    "Policies",
    "ServiceIdentities",
    "NodeIdentities",
    "Hash",
    "CreateIndex",
    "ModifyIndex",
)


def _ordered(obj: Mapping[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    out = {k: obj[k] for k in order if k in obj}
    for k, v in obj.items():
        out.setdefault(k, v)
    return out


def _ordered_token(tok: Mapping[str, Any]) -> dict[str, Any]:
    return _ordered(tok, _TOKEN_ORDER)


def _ordered_role(role: Mapping[str, Any]) -> dict[str, Any]:
    return _ordered(role, _ROLE_ORDER)


def token_hash(tok: Mapping[str, Any]) -> str:
    """Base64 of a 32-byte BLAKE2b digest over the token's rights-bearing fields."""
    h = hashlib.blake2b(digest_size=32)
    for key in ("Description", "Policies", "Roles", "ServiceIdentities", "NodeIdentities", "Local"):
        h.update(json.dumps(tok.get(key), sort_keys=True).encode())
    return base64.b64encode(h.digest()).decode()


def _set_if_any(obj: dict[str, Any], key: str, items: list[dict[str, Any]]) -> None:
    """Set ``obj[key]`` to ``items`` unless empty (Consul omits empty link lists)."""
    if items:
        obj[key] = items


def token_json(
    *,
    accessor: str,
    secret: str,
    description: str = "",
    policies: Iterable[Mapping[str, str]] = (),
    roles: Iterable[Mapping[str, str]] = (),
    service_identities: Iterable[Mapping[str, Any]] = (),
    node_identities: Iterable[Mapping[str, str]] = (),
    local: bool = False,
    create_ns: int,
    expiration_ns: int | None = None,
    index: int,
    create_index: int | None = None,
) -> dict[str, Any]:
    """A token's stored Consul JSON (§6.2 order, empty lists and expiry omitted)."""
    tok: dict[str, Any] = {"AccessorID": accessor, "SecretID": secret, "Description": description}
    _set_if_any(tok, "Policies", [{"ID": p["ID"]} for p in policies])
    _set_if_any(tok, "Roles", [{"ID": r["ID"]} for r in roles])
    _set_if_any(tok, "ServiceIdentities", [dict(s) for s in service_identities])
    _set_if_any(tok, "NodeIdentities", [dict(n) for n in node_identities])
    tok["Local"] = local
    if expiration_ns is not None:
        tok["ExpirationTime"] = rfc3339_nano(expiration_ns)
    tok["CreateTime"] = rfc3339_nano(create_ns)
    tok["Hash"] = token_hash(tok)
    tok["CreateIndex"] = index if create_index is None else create_index
    tok["ModifyIndex"] = index
    return tok


def policy_json(
    policy_id: str,
    name: str,
    description: str,
    rules: str,
    datacenters: list[str],
    create_index: int,
    modify_index: int,
) -> dict[str, Any]:
    """A policy's Consul JSON (``Datacenters`` omitted when empty)."""
    pol: dict[str, Any] = {
        "ID": policy_id,
        "Name": name,
        "Description": description,
        "Rules": rules,
    }
    if datacenters:
        pol["Datacenters"] = list(datacenters)
    h = hashlib.blake2b(digest_size=32)
    h.update(json.dumps([name, description, rules, datacenters]).encode())
    pol["Hash"] = base64.b64encode(h.digest()).decode()
    pol["CreateIndex"] = create_index
    pol["ModifyIndex"] = modify_index
    return pol


def role_json(
    role_id: str,
    name: str,
    description: str,
    *,
    policies: Iterable[Mapping[str, str]] = (),
    service_identities: Iterable[Mapping[str, Any]] = (),
    node_identities: Iterable[Mapping[str, str]] = (),
    create_index: int,
    modify_index: int,
) -> dict[str, Any]:
    """A role's stored Consul JSON (structs.ACLRole, CE: no Namespace/Partition).

    ``Description`` is always present; ``Policies`` (ID-only links here),
    ``ServiceIdentities`` and ``NodeIdentities`` are omitted when empty. ``Hash`` is the
    base64 of a 32-byte BLAKE2b over the content fields (ACLRole.SetHash: not the ID and
    not the indexes).
    """
    role: dict[str, Any] = {"ID": role_id, "Name": name, "Description": description}
    pols = [{"ID": p["ID"]} for p in policies]
    sids = [dict(s) for s in service_identities]
    nids = [dict(n) for n in node_identities]
    _set_if_any(role, "Policies", pols)
    _set_if_any(role, "ServiceIdentities", sids)
    _set_if_any(role, "NodeIdentities", nids)
    h = hashlib.blake2b(digest_size=32)
    h.update(json.dumps([name, description, [p["ID"] for p in pols], sids, nids]).encode())
    role["Hash"] = base64.b64encode(h.digest()).decode()
    role["CreateIndex"] = create_index
    role["ModifyIndex"] = modify_index
    return role
