"""Services, checks and nodes of the dev agent's catalog, and their Consul JSON shapes.

The dev agent is a single server node, so the agent-local state and the
catalog are one: services registered through ``/v1/agent/service/register``
live in the same store tables that ``/v1/catalog/*`` and ``/v1/health/*``
read (``/v1/catalog/register`` may add other nodes). Records are JSON-able
dicts in :class:`~consul_connect.devagent.state.Store` tables, so they survive
a restart with a data directory; keys starting with ``_`` are internal and are
never rendered.

Tables:

* ``catalog.nodes``: node name → Node record.
* ``catalog.services``: ``node\\x1fserviceID`` → service record (NodeService fields).
* ``catalog.checks``: ``node\\x1fcheckID`` → HealthCheck record.
* ``catalog.index``: ``service:<name>`` / ``connect:<name>`` → last index that
  changed what a health/catalog read for that name returns (lower-cased
  names, as Consul's lookups are case-insensitive).

TTL expiry and ``DeregisterCriticalServiceAfter`` reaping run in one
background task that sleeps until the nearest deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from consul_connect._goduration import format_duration, parse_duration
from consul_connect.devagent import probes
from consul_connect.devagent.bexpr import MAP, BexprError, Filter, Schema, compile_filter
from consul_connect.devagent.context import CONSUL_VERSION
from consul_connect.devagent.http import HTTPError, get_ci, go_json_kind

if TYPE_CHECKING:
    from consul_connect.devagent.context import AgentContext
    from consul_connect.devagent.http import Request

__all__ = [
    "AGENT_SERVICE_SCHEMA",
    "CHECK_SCHEMA",
    "CHECK_SERVICE_NODE_SCHEMA",
    "NODE_SCHEMA",
    "SERVICE_NODE_SCHEMA",
    "T_CHECKS",
    "T_INDEX",
    "T_NODES",
    "T_SERVICES",
    "CatalogState",
    "CheckDef",
    "ServiceDef",
    "agent_service_json",
    "apply_filter",
    "catalog_state",
    "check_json",
    "check_service_nodes",
    "health_index",
    "node_json",
    "node_service_json",
    "parse_check_def",
    "parse_service_def",
    "service_node_json",
    "ttl_task",
]

T_NODES = "catalog.nodes"
T_SERVICES = "catalog.services"
T_CHECKS = "catalog.checks"
T_INDEX = "catalog.index"
ALL_TABLES = (T_NODES, T_SERVICES, T_CHECKS, T_INDEX)

SEP = "\x1f"
SERF_CHECK_ID = "serfHealth"
STATUSES = ("passing", "warning", "critical")
OUTPUT_MAX = 4096
SIDECAR_SUFFIX = "-sidecar-proxy"
SIDECAR_PORT_RANGE = (21000, 21255)
_KINDS = (
    "",
    "connect-proxy",
    "mesh-gateway",
    "terminating-gateway",
    "ingress-gateway",
    "api-gateway",
)
_GATEWAYS = ("mesh-gateway", "terminating-gateway", "ingress-gateway", "api-gateway")
_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")


def key(node: str, ident: str) -> str:
    """The table key of a service or check ``ident`` on ``node``."""
    return f"{node}{SEP}{ident}"


# -- decoding helpers (Go encoding/json semantics, Consul's texts) ---------------------------


def _decode_error(v: Any, where: str, gotype: str) -> HTTPError:
    return HTTPError(
        400,
        f"Request decode failed: json: cannot unmarshal {go_json_kind(v)} into Go struct field "
        f"{where} of type {gotype}",
    )


def _str(obj: Mapping[str, Any], where: str, *names: str) -> str:
    v = get_ci(obj, *names)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise _decode_error(v, where, "string")
    return v


def _int(obj: Mapping[str, Any], where: str, *names: str) -> int:
    v = get_ci(obj, *names)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
        raise _decode_error(v, where, "int")
    return int(v)


def _bool(obj: Mapping[str, Any], where: str, *names: str) -> bool:
    v = get_ci(obj, *names)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _decode_error(v, where, "bool")
    return v


def _strlist(obj: Mapping[str, Any], where: str, *names: str) -> list[str]:
    v = get_ci(obj, *names)
    if v is None:
        return []
    if not isinstance(v, list):
        raise _decode_error(v, where, "[]string")
    for item in v:
        if item is not None and not isinstance(item, str):
            raise _decode_error(item, where, "string")
    # A JSON null element decodes to Go's zero value.
    return ["" if item is None else item for item in v]


def _strmap(obj: Mapping[str, Any], where: str, *names: str) -> dict[str, str]:
    v = get_ci(obj, *names)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _decode_error(v, where, "map[string]string")
    for item in v.values():
        if item is not None and not isinstance(item, str):
            raise _decode_error(item, where, "string")
    return {k: "" if item is None else item for k, item in v.items()}


def _obj(obj: Mapping[str, Any], where: str, gotype: str, *names: str) -> dict[str, Any] | None:
    v = get_ci(obj, *names)
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _decode_error(v, where, gotype)
    return v


def _duration(obj: Mapping[str, Any], *names: str) -> float:
    """A Go duration given as a string (``"15s"``) or as integer nanoseconds."""
    v = get_ci(obj, *names)
    if v is None:
        return 0.0
    if isinstance(v, bool):
        return 0.0
    if isinstance(v, (int, float)):
        return float(v) / 1e9
    if isinstance(v, str):
        try:
            return parse_duration(v)
        except ValueError:
            raise HTTPError(400, f'Request decode failed: time: invalid duration "{v}"') from None
    return 0.0


def _fmt_dur(seconds: float) -> str:
    return format_duration(seconds) if seconds else ""


# -- check definitions -------------------------------------------------------------------------


@dataclass
class CheckDef:
    """One check definition (Consul's ``CheckType``/``CheckDefinition``), durations in seconds."""

    check_id: str = ""
    name: str = ""
    status: str = ""
    notes: str = ""
    service_id: str = ""
    script_args: list[str] = field(default_factory=list)
    http: str = ""
    method: str = ""
    header: dict[str, list[str]] = field(default_factory=dict)
    body: str = ""
    tcp: str = ""
    udp: str = ""
    grpc: str = ""
    grpc_use_tls: bool = False
    h2ping: str = ""
    os_service: str = ""
    docker_container_id: str = ""
    alias_node: str = ""
    alias_service: str = ""
    tls_server_name: str = ""
    tls_skip_verify: bool = False
    interval: float = 0.0
    timeout: float = 0.0
    ttl: float = 0.0
    deregister_after: float = 0.0
    output_max_size: int = 0
    failures_before_warning: int = 0
    failures_before_critical: int = 0
    success_before_passing: int = 0

    @property
    def empty(self) -> bool:
        """True when nothing was set (Consul drops such checks)."""
        return self == CheckDef()

    @property
    def kind(self) -> str:
        """The check ``Type`` Consul reports (``ttl``, ``http``, ``tcp`` ...)."""
        if self.ttl > 0:
            return "ttl"
        if self.alias_node or self.alias_service:
            return "alias"
        if self.docker_container_id and self.script_args:
            return "docker"
        if self.script_args:
            return "script"
        for name, value in (
            ("http", self.http),
            ("tcp", self.tcp),
            ("udp", self.udp),
            ("grpc", self.grpc),
            ("h2ping", self.h2ping),
            ("os_service", self.os_service),
        ):
            if value:
                return name
        return ""

    def validate(self) -> str | None:
        """The error Consul's ``CheckType.Validate`` gives, or None."""
        interval_check = bool(
            self.script_args
            or self.http
            or self.tcp
            or self.udp
            or self.grpc
            or self.h2ping
            or self.os_service
        )
        alias = bool(self.alias_node or self.alias_service)
        if self.interval > 0 and self.ttl > 0:
            return "Interval and TTL cannot both be specified"
        if interval_check and self.interval <= 0:
            return "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks"
        if interval_check and alias:
            return "Interval cannot be set for Alias checks"
        if alias and self.ttl > 0:
            return "TTL must be not be set for Alias checks"
        if not interval_check and not alias and self.ttl <= 0:
            return "TTL must be > 0 for TTL checks"
        if self.output_max_size < 0:
            return "MaxOutputMaxSize must be positive"
        if self.failures_before_warning > self.failures_before_critical:
            return "FailuresBeforeWarning can't be higher than FailuresBeforeCritical"
        return None

    def definition(self) -> dict[str, Any]:
        """The internal (persisted) form of what the check runner needs."""
        return {
            "HTTP": self.http,
            "Method": self.method,
            "Header": self.header,
            "Body": self.body,
            "TCP": self.tcp,
            "UDP": self.udp,
            "GRPC": self.grpc,
            "GRPCUseTLS": self.grpc_use_tls,
            "TLSServerName": self.tls_server_name,
            "TLSSkipVerify": self.tls_skip_verify,
            "AliasNode": self.alias_node,
            "AliasService": self.alias_service,
            "Interval": self.interval,
            "Timeout": self.timeout,
            "OutputMaxSize": self.output_max_size,
            "FailuresBeforeWarning": self.failures_before_warning,
            "FailuresBeforeCritical": self.failures_before_critical,
            "SuccessBeforePassing": self.success_before_passing,
        }


def parse_check_def(raw: Any, where: str = "CheckType") -> CheckDef:
    """Decode one check object as Consul does (any-case keys, snake_case aliases)."""
    if raw is None:
        return CheckDef()
    if not isinstance(raw, dict):
        raise _decode_error(raw, where, "structs.CheckType")
    header_raw = get_ci(raw, "Header")
    header: dict[str, list[str]] = {}
    if header_raw is not None:
        if not isinstance(header_raw, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in header_raw.values()
        ):
            raise _decode_error(header_raw, f"{where}.Header", "map[string][]string")
        header = {k: list(v) for k, v in header_raw.items()}
    return CheckDef(
        check_id=_str(raw, f"{where}.CheckID", "CheckID", "ID", "check_id"),
        name=_str(raw, f"{where}.Name", "Name"),
        status=_str(raw, f"{where}.Status", "Status"),
        notes=_str(raw, f"{where}.Notes", "Notes"),
        service_id=_str(raw, f"{where}.ServiceID", "ServiceID", "service_id"),
        script_args=_strlist(raw, f"{where}.ScriptArgs", "ScriptArgs", "Args", "script_args"),
        http=_str(raw, f"{where}.HTTP", "HTTP"),
        method=_str(raw, f"{where}.Method", "Method"),
        header=header,
        body=_str(raw, f"{where}.Body", "Body"),
        tcp=_str(raw, f"{where}.TCP", "TCP"),
        udp=_str(raw, f"{where}.UDP", "UDP"),
        grpc=_str(raw, f"{where}.GRPC", "GRPC"),
        grpc_use_tls=_bool(raw, f"{where}.GRPCUseTLS", "GRPCUseTLS", "grpc_use_tls"),
        h2ping=_str(raw, f"{where}.H2PING", "H2PING"),
        os_service=_str(raw, f"{where}.OSService", "OSService", "os_service"),
        docker_container_id=_str(
            raw, f"{where}.DockerContainerID", "DockerContainerID", "docker_container_id"
        ),
        alias_node=_str(raw, f"{where}.AliasNode", "AliasNode", "alias_node"),
        alias_service=_str(raw, f"{where}.AliasService", "AliasService", "alias_service"),
        tls_server_name=_str(raw, f"{where}.TLSServerName", "TLSServerName", "tls_server_name"),
        tls_skip_verify=_bool(raw, f"{where}.TLSSkipVerify", "TLSSkipVerify", "tls_skip_verify"),
        interval=_duration(raw, "Interval"),
        timeout=_duration(raw, "Timeout"),
        ttl=_duration(raw, "TTL"),
        deregister_after=_duration(
            raw, "DeregisterCriticalServiceAfter", "deregister_critical_service_after"
        ),
        output_max_size=_int(raw, f"{where}.OutputMaxSize", "OutputMaxSize", "output_max_size"),
        failures_before_warning=_int(
            raw,
            f"{where}.FailuresBeforeWarning",
            "FailuresBeforeWarning",
            "failures_before_warning",
        ),
        failures_before_critical=_int(
            raw,
            f"{where}.FailuresBeforeCritical",
            "FailuresBeforeCritical",
            "failures_before_critical",
        ),
        success_before_passing=_int(
            raw,
            f"{where}.SuccessBeforePassing",
            "SuccessBeforePassing",
            "success_before_passing",
        ),
    )


# -- service definitions -------------------------------------------------------------------------


def _parse_upstream(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _decode_error(raw, where, "structs.Upstream")
    mgw = (
        _obj(
            raw, f"{where}.MeshGateway", "structs.MeshGatewayConfig", "MeshGateway", "mesh_gateway"
        )
        or {}
    )
    cfg = _obj(raw, f"{where}.Config", "map[string]interface {}", "Config")
    return {
        "DestinationType": _str(
            raw, f"{where}.DestinationType", "DestinationType", "destination_type"
        ),
        "DestinationNamespace": _str(raw, where, "DestinationNamespace", "destination_namespace"),
        "DestinationPartition": _str(raw, where, "DestinationPartition", "destination_partition"),
        "DestinationPeer": _str(raw, where, "DestinationPeer", "destination_peer"),
        "DestinationName": _str(
            raw, f"{where}.DestinationName", "DestinationName", "destination_name"
        ),
        "Datacenter": _str(raw, f"{where}.Datacenter", "Datacenter"),
        "LocalBindAddress": _str(raw, where, "LocalBindAddress", "local_bind_address"),
        "LocalBindPort": _int(raw, f"{where}.LocalBindPort", "LocalBindPort", "local_bind_port"),
        "LocalBindSocketPath": _str(raw, where, "LocalBindSocketPath", "local_bind_socket_path"),
        "LocalBindSocketMode": _str(raw, where, "LocalBindSocketMode", "local_bind_socket_mode"),
        "Config": cfg,
        "MeshGateway": {"Mode": _str(mgw, f"{where}.MeshGateway.Mode", "Mode")},
    }


def _parse_proxy(raw: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    raw = raw or {}
    ups_raw = get_ci(raw, "Upstreams")
    if ups_raw is not None and not isinstance(ups_raw, list):
        raise _decode_error(ups_raw, f"{where}.Upstreams", "structs.Upstreams")
    mgw = (
        _obj(
            raw, f"{where}.MeshGateway", "structs.MeshGatewayConfig", "MeshGateway", "mesh_gateway"
        )
        or {}
    )
    expose = _obj(raw, f"{where}.Expose", "structs.ExposeConfig", "Expose") or {}
    tproxy = (
        _obj(
            raw,
            f"{where}.TransparentProxy",
            "structs.TransparentProxyConfig",
            "TransparentProxy",
            "transparent_proxy",
        )
        or {}
    )
    paths = get_ci(expose, "Paths")
    return {
        "DestinationServiceName": _str(
            raw,
            f"{where}.DestinationServiceName",
            "DestinationServiceName",
            "destination_service_name",
        ),
        "DestinationServiceID": _str(
            raw, f"{where}.DestinationServiceID", "DestinationServiceID", "destination_service_id"
        ),
        "LocalServiceAddress": _str(
            raw, f"{where}.LocalServiceAddress", "LocalServiceAddress", "local_service_address"
        ),
        "LocalServicePort": _int(
            raw, f"{where}.LocalServicePort", "LocalServicePort", "local_service_port"
        ),
        "LocalServiceSocketPath": _str(
            raw,
            f"{where}.LocalServiceSocketPath",
            "LocalServiceSocketPath",
            "local_service_socket_path",
        ),
        "Mode": _str(raw, f"{where}.Mode", "Mode"),
        "Config": _obj(raw, f"{where}.Config", "map[string]interface {}", "Config"),
        "Upstreams": [_parse_upstream(u, f"{where}.Upstreams") for u in (ups_raw or [])],
        "MeshGateway": {"Mode": _str(mgw, f"{where}.MeshGateway.Mode", "Mode")},
        "Expose": {
            "Checks": _bool(expose, f"{where}.Expose.Checks", "Checks"),
            "Paths": paths if isinstance(paths, list) else [],
        },
        "TransparentProxy": {
            "OutboundListenerPort": _int(
                tproxy, where, "OutboundListenerPort", "outbound_listener_port"
            ),
            "DialedDirectly": _bool(tproxy, where, "DialedDirectly", "dialed_directly"),
        },
    }


@dataclass
class ServiceDef:
    """A decoded ``ServiceDefinition`` (agent registration body)."""

    kind: str = ""
    id: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    address: str = ""
    tagged_addresses: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    port: int = 0
    socket_path: str = ""
    weights: dict[str, int] | None = None
    enable_tag_override: bool = False
    proxy: dict[str, Any] = field(default_factory=lambda: _parse_proxy(None, ""))
    native: bool = False
    sidecar: ServiceDef | None = None
    sidecar_given: bool = False
    checks: list[CheckDef] = field(default_factory=list)
    token: str = ""
    raw_sidecar_id: str = ""
    nested_sidecar: bool = False


def parse_service_def(raw: Any, where: str = "ServiceDefinition") -> ServiceDef:
    """Decode an agent service registration body (400 ``Request decode failed`` on type errors)."""
    if not isinstance(raw, dict):
        raise HTTPError(
            400,
            "Request decode failed: json: cannot unmarshal "
            f"{go_json_kind(raw)} into Go value of type structs.ServiceDefinition",
        )
    weights_raw = _obj(raw, f"{where}.Weights", "structs.Weights", "Weights")
    weights = None
    if weights_raw is not None:
        weights = {
            "Passing": _int(weights_raw, f"{where}.Weights.Passing", "Passing"),
            "Warning": _int(weights_raw, f"{where}.Weights.Warning", "Warning"),
        }
    tagged_raw = (
        _obj(
            raw,
            f"{where}.TaggedAddresses",
            "map[string]structs.ServiceAddress",
            "TaggedAddresses",
            "tagged_addresses",
        )
        or {}
    )
    tagged: dict[str, dict[str, Any]] = {}
    for tag, addr in tagged_raw.items():
        if not isinstance(addr, dict):
            raise _decode_error(addr, f"{where}.TaggedAddresses", "structs.ServiceAddress")
        tagged[tag] = {
            "Address": _str(addr, f"{where}.TaggedAddresses.Address", "Address"),
            "Port": _int(addr, f"{where}.TaggedAddresses.Port", "Port"),
        }
    connect = _obj(raw, f"{where}.Connect", "structs.ServiceConnect", "Connect") or {}
    sidecar_raw = get_ci(connect, "SidecarService", "sidecar_service")
    sidecar = None
    raw_sidecar_id = ""
    nested = False
    if sidecar_raw is not None:
        sidecar = parse_service_def(sidecar_raw, f"{where}.Connect.SidecarService")
        if isinstance(sidecar_raw, dict):
            raw_sidecar_id = _str(sidecar_raw, where, "ID")
            sc_connect = get_ci(sidecar_raw, "Connect")
            nested = (
                isinstance(sc_connect, dict)
                and get_ci(sc_connect, "SidecarService", "sidecar_service") is not None
            )
    checks: list[CheckDef] = []
    one = get_ci(raw, "Check")
    if one is not None:
        checks.append(parse_check_def(one, f"{where}.Check"))
    many = get_ci(raw, "Checks")
    if many is not None:
        if not isinstance(many, list):
            raise _decode_error(many, f"{where}.Checks", "structs.CheckTypes")
        checks.extend(parse_check_def(c, f"{where}.Checks") for c in many)
    return ServiceDef(
        kind=_str(raw, f"{where}.Kind", "Kind"),
        id=_str(raw, f"{where}.ID", "ID"),
        name=_str(raw, f"{where}.Name", "Name"),
        tags=_strlist(raw, f"{where}.Tags", "Tags"),
        address=_str(raw, f"{where}.Address", "Address"),
        tagged_addresses=tagged,
        meta=_strmap(raw, f"{where}.Meta", "Meta"),
        port=_int(raw, f"{where}.Port", "Port"),
        socket_path=_str(raw, f"{where}.SocketPath", "SocketPath", "socket_path"),
        weights=weights,
        enable_tag_override=_bool(
            raw, f"{where}.EnableTagOverride", "EnableTagOverride", "enable_tag_override"
        ),
        proxy=_parse_proxy(
            _obj(raw, f"{where}.Proxy", "structs.ConnectProxyConfig", "Proxy"), f"{where}.Proxy"
        ),
        native=_bool(connect, f"{where}.Connect.Native", "Native"),
        sidecar=sidecar,
        sidecar_given=sidecar_raw is not None,
        checks=[c for c in checks if not c.empty],
        token=_str(raw, f"{where}.Token", "Token"),
        raw_sidecar_id=raw_sidecar_id,
        nested_sidecar=nested,
    )


def _multierror(errors: list[str]) -> str:
    noun = "error" if len(errors) == 1 else "errors"
    body = "".join(f"\t* {e}\n" for e in errors)
    return f"{len(errors)} {noun} occurred:\n{body}\n"


def validate_weights(weights: Mapping[str, int] | None) -> str | None:
    """Consul's ``ValidateWeights`` message, or None."""
    if weights is None:
        return None
    if weights["Passing"] < 1:
        return "Passing must be greater than 0"
    if weights["Warning"] < 0:
        return "Warning must be greater or equal than 0"
    if weights["Passing"] > 65535 or weights["Warning"] > 65535:
        return "DNS Weight must be between 0 and 65535"
    return None


def validate_meta(meta: Mapping[str, str], kind: str = "") -> str | None:
    """Consul's metadata validation message, or None."""
    if len(meta) > 64:
        return "Node metadata cannot contain more than 64 key/value pairs"
    for k, v in meta.items():
        problem = None
        if k == "":
            problem = "Key cannot be blank"
        elif not _META_KEY.match(k):
            problem = "Key contains invalid characters"
        elif len(k) > 128:
            problem = "Key is too long (limit: 128 characters)"
        elif k.startswith("consul-") and not (
            kind == "mesh-gateway" and k == "consul-wan-federation"
        ):
            problem = "Key prefix 'consul-' is reserved for internal use"
        elif len(v) > 512:
            problem = "Value is too long (limit: 512 characters)"
        if problem:
            return f"Couldn't load metadata pair ('{k}', '{v}'): {problem}"
    return None


def validate_for_agent(sd: ServiceDef) -> list[str]:
    """The error list of Consul's ``NodeService.ValidateForAgent``."""
    errors: list[str] = []
    p = sd.proxy
    if sd.kind == "connect-proxy":
        dest = p["DestinationServiceName"]
        if dest.strip() == "":
            errors.append(
                "Proxy.DestinationServiceName must be non-empty for Connect proxy services"
            )
        if dest == "*":
            errors.append(
                "Proxy.DestinationServiceName must not be a wildcard for Connect proxy services"
            )
        if sd.native:
            errors.append("A Proxy cannot also be Connect Native, only typical services")
        seen: set[tuple[str, ...]] = set()
        binds: set[str] = set()
        for u in p["Upstreams"]:
            if (
                u["DestinationPeer"] == ""
                and u["Datacenter"] != ""
                and u["DestinationPartition"]
                not in (
                    "",
                    "default",
                )
            ):
                errors.append("upstreams cannot target another datacenter in non default partition")
                continue
            problem = _validate_upstream(u)
            if problem:
                errors.append(problem)
                continue
            ukey = (
                u["DestinationType"],
                u["DestinationName"],
                u["DestinationPartition"],
                u["DestinationNamespace"],
                u["DestinationPeer"],
                u["Datacenter"],
            )
            if ukey in seen:
                errors.append(
                    "upstreams cannot contain duplicates of "
                    f'[type="{ukey[0]}", name="{ukey[1]}", partition="{ukey[2]}", '
                    f'namespace="{ukey[3]}", peer="{ukey[4]}", datacenter="{ukey[5]}"]'
                )
                continue
            seen.add(ukey)
            if u["LocalBindPort"] == 0 and u["LocalBindAddress"] == "" and u["LocalBindSocketPath"]:
                addr = u["LocalBindSocketPath"]
            else:
                host = u["LocalBindAddress"] or "127.0.0.1"
                host = f"[{host}]" if ":" in host else host
                addr = f"{host}:{u['LocalBindPort']}"
            if addr in binds:
                errors.append(
                    "upstreams cannot contain duplicates by local bind address and port "
                    "or unix path; "
                    f'"{addr}" is specified twice'
                )
                continue
            binds.add(addr)
    if sd.kind in _GATEWAYS:
        if sd.port == 0 and sd.kind not in ("ingress-gateway", "api-gateway"):
            errors.append(f"Port must be non-zero for a {sd.kind}")
        if sd.sidecar_given:
            errors.append(f"A {sd.kind} cannot have a sidecar service defined")
        for fld, bad in (
            ("DestinationServiceName", p["DestinationServiceName"] != ""),
            ("DestinationServiceID", p["DestinationServiceID"] != ""),
            ("LocalServiceAddress", p["LocalServiceAddress"] != ""),
            ("LocalServicePort", p["LocalServicePort"] != 0),
            ("LocalServiceSocketPath", p["LocalServiceSocketPath"] != ""),
            ("Upstreams", bool(p["Upstreams"])),
        ):
            if bad:
                errors.append(f"The Proxy.{fld} configuration is invalid for a {sd.kind}")
    if sd.sidecar_given:
        if sd.raw_sidecar_id:
            errors.append("A SidecarService cannot specify an ID as this is managed by the agent")
        if sd.nested_sidecar:
            errors.append("A SidecarService cannot have a nested SidecarService")
    if sd.native and sd.port == 0 and sd.socket_path == "":
        errors.append("Port or SocketPath must be set for a Connect native service.")
    return errors


def _validate_upstream(u: Mapping[str, Any]) -> str | None:
    if u["DestinationType"] not in ("", "service", "prepared_query"):
        return f'unknown upstream destination type: "{u["DestinationType"]}"'
    if u["DestinationName"] == "":
        return "upstream destination name cannot be empty"
    if u["DestinationName"] == "*":
        return "upstream destination name cannot be a wildcard"
    if u["DestinationPeer"] and u["Datacenter"]:
        return "upstream cannot specify both destination peer and datacenter"
    if u["LocalBindPort"] == 0 and u["LocalBindSocketPath"] == "":
        return "upstream local bind port or local socket path must be defined and nonzero"
    if u["LocalBindPort"] != 0 and u["LocalBindSocketPath"] != "":
        return (
            "only one of upstream local bind port or local socket path can be defined and nonzero"
        )
    return None


def validate_service(sd: ServiceDef) -> list[str]:
    """The error list of Consul's ``NodeService.Validate`` (adds the proxy port rule)."""
    errors: list[str] = []
    if sd.kind == "connect-proxy" and sd.port == 0 and sd.socket_path == "":
        errors.append(f"Port or SocketPath must be set for a {sd.kind}")
    return errors + validate_for_agent(sd)


def registration_errors(sd: ServiceDef) -> HTTPError | None:
    """The first 400 Consul's agent registration handler answers for ``sd``, or None."""
    if sd.name == "":
        return HTTPError(400, "Missing service name")
    if _is_any(sd.address):
        return HTTPError(400, "Invalid service address")
    problem = validate_weights(sd.weights)
    if problem:
        return HTTPError(400, f"Invalid Weights: {problem}")
    problem = validate_meta(sd.meta, sd.kind)
    if problem:
        return HTTPError(400, f"Invalid Service Meta: {problem}")
    if sd.kind not in _KINDS:
        # Consul accepts unknown kinds; nothing downstream of a dev agent needs them.
        pass
    errors = validate_service(sd)
    if errors:
        return HTTPError(400, f"Validation failed: {_multierror(errors)}")
    for c in sd.checks:
        problem = c.validate()
        if problem:
            return HTTPError(400, f"Invalid check: {problem}")
    for c in sd.checks:
        if c.status and c.status not in STATUSES:
            return HTTPError(400, "Status for checks must 'passing', 'warning', 'critical'")
    if sd.sidecar is not None:
        for c in sd.sidecar.checks:
            problem = c.validate()
            if problem:
                return HTTPError(400, f"Invalid check in sidecar_service: {problem}")
        for c in sd.sidecar.checks:
            if c.status and c.status not in STATUSES:
                return HTTPError(400, "Status for checks must 'passing', 'warning', 'critical'")
    return None


def _is_any(address: str) -> bool:
    return address in ("0.0.0.0", "::", "[::]")


def service_record(sd: ServiceDef, node: str) -> dict[str, Any]:
    """The stored record of a (validated) definition, with Consul's defaults filled in."""
    sid = sd.id or sd.name
    tagged = {k: dict(v) for k, v in sd.tagged_addresses.items()}
    try:
        ip = ipaddress.ip_address(sd.address) if sd.address else None
    except ValueError:
        ip = None
    if ip is not None:
        fam = "ipv4" if ip.version == 4 else "ipv6"
        tagged.setdefault(f"lan_{fam}", {"Address": sd.address, "Port": sd.port})
        tagged.setdefault(f"wan_{fam}", {"Address": sd.address, "Port": sd.port})
    weights = {"Passing": 1, "Warning": 1}
    if sd.weights is not None:
        if sd.weights["Passing"] > 0:
            weights["Passing"] = sd.weights["Passing"]
        weights["Warning"] = sd.weights["Warning"]
    return {
        "Node": node,
        "Kind": sd.kind,
        "ID": sid,
        "Service": sd.name,
        "Tags": list(sd.tags),
        "Address": sd.address,
        "TaggedAddresses": tagged,
        "Meta": dict(sd.meta),
        "Port": sd.port,
        "SocketPath": sd.socket_path,
        "Weights": weights,
        "EnableTagOverride": sd.enable_tag_override,
        "Proxy": json.loads(json.dumps(sd.proxy)),
        "Native": sd.native,
        "CreateIndex": 0,
        "ModifyIndex": 0,
        "_sidecar_of": "",
    }


def sidecar_definition(parent: ServiceDef, used_ports: Iterable[int]) -> ServiceDef:
    """The sidecar registration Consul derives from ``parent.sidecar`` (400 texts on failure)."""
    assert parent.sidecar is not None
    sc = parent.sidecar
    parent_id = parent.id or parent.name
    out = ServiceDef(**{**sc.__dict__})
    out.id = parent_id + SIDECAR_SUFFIX
    if out.meta:
        problem = validate_meta(out.meta, out.kind)
        if problem:
            raise HTTPError(400, f"Invalid SidecarService: {problem}")
    if not out.meta and parent.meta:
        out.meta = dict(parent.meta)
    if not out.tags and parent.tags:
        out.tags = list(parent.tags)
    if out.kind == "":
        out.kind = "connect-proxy"
    if out.name == "":
        out.name = parent.name + SIDECAR_SUFFIX
    if out.address == "":
        out.address = parent.address
    proxy = dict(out.proxy)
    if proxy["DestinationServiceName"] == "":
        proxy["DestinationServiceName"] = parent.name
    if proxy["DestinationServiceID"] == "":
        proxy["DestinationServiceID"] = parent_id
    if proxy["LocalServiceSocketPath"] == "" and (
        proxy["LocalServiceAddress"] == "" or proxy["LocalServicePort"] < 1
    ):
        if parent.socket_path:
            proxy["LocalServiceSocketPath"] = parent.socket_path
        else:
            if proxy["LocalServiceAddress"] == "":
                proxy["LocalServiceAddress"] = "127.0.0.1"
            if proxy["LocalServicePort"] < 1:
                proxy["LocalServicePort"] = parent.port
    out.proxy = proxy
    if out.port < 1:
        used = set(used_ports)
        for p in range(SIDECAR_PORT_RANGE[0], SIDECAR_PORT_RANGE[1] + 1):
            if p not in used:
                out.port = p
                break
        else:
            raise HTTPError(
                400,
                "Invalid SidecarService: no port provided for sidecar_service and none left in the "
                f"configured range [{SIDECAR_PORT_RANGE[0]}, {SIDECAR_PORT_RANGE[1]}]",
            )
    if not out.checks:
        addr = out.address or proxy["LocalServiceAddress"] or "127.0.0.1"
        host = f"[{addr}]" if ":" in addr else addr
        out.checks = [
            CheckDef(name="Connect Sidecar Listening", tcp=f"{host}:{out.port}", interval=10.0),
            CheckDef(name=f"Connect Sidecar Aliasing {parent_id}", alias_service=parent_id),
        ]
    out.sidecar = None
    out.sidecar_given = False
    return out


def check_record(
    cd: CheckDef, node: str, service: Mapping[str, Any] | None, check_id: str, name: str
) -> dict[str, Any]:
    """A stored HealthCheck record for ``cd`` (status critical unless given)."""
    return {
        "Node": node,
        "CheckID": check_id,
        "Name": name,
        "Status": cd.status or "critical",
        "Notes": cd.notes,
        "Output": "",
        "ServiceID": service["ID"] if service else "",
        "ServiceName": service["Service"] if service else "",
        "ServiceTags": list(service["Tags"]) if service else [],
        "Type": cd.kind,
        "Interval": _fmt_dur(cd.interval),
        "Timeout": _fmt_dur(cd.timeout),
        "ExposedPort": 0,
        "CreateIndex": 0,
        "ModifyIndex": 0,
        "_ttl": cd.ttl,
        "_deregister_after": cd.deregister_after,
        "_critical_since": None,
        "_def": cd.definition(),
    }


# -- JSON renderers ------------------------------------------------------------------------------


def _public(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if not k.startswith("_")}


def node_json(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A ``Node`` object as health/catalog reads return it."""
    return {
        "ID": rec["ID"],
        "Node": rec["Node"],
        "Address": rec["Address"],
        "Datacenter": rec["Datacenter"],
        "TaggedAddresses": dict(rec.get("TaggedAddresses") or {}),
        "Meta": dict(rec.get("Meta") or {}),
        "CreateIndex": rec["CreateIndex"],
        "ModifyIndex": rec["ModifyIndex"],
    }


def check_json(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A ``HealthCheck`` object (``ServiceTags`` never null, ``Definition`` as Consul sends it)."""
    d = rec.get("_def") or {}
    definition: dict[str, Any] = {}
    for k in (
        "HTTP",
        "TLSServerName",
        "Method",
        "Body",
        "TCP",
        "UDP",
        "GRPC",
        "AliasNode",
        "AliasService",
    ):
        if d.get(k):
            definition[k] = d[k]
    for k in ("TLSSkipVerify", "GRPCUseTLS"):
        if d.get(k):
            definition[k] = True
    if d.get("Header"):
        definition["Header"] = d["Header"]
    if d.get("Interval"):
        definition["Interval"] = format_duration(d["Interval"])
    if d.get("Timeout"):
        definition["Timeout"] = format_duration(d["Timeout"])
    if rec.get("_deregister_after"):
        definition["DeregisterCriticalServiceAfter"] = format_duration(rec["_deregister_after"])
    if rec.get("_ttl"):
        definition["TTL"] = round(rec["_ttl"] * 1e9)
    return {
        "Node": rec["Node"],
        "CheckID": rec["CheckID"],
        "Name": rec["Name"],
        "Status": rec["Status"],
        "Notes": rec["Notes"],
        "Output": rec["Output"],
        "ServiceID": rec["ServiceID"],
        "ServiceName": rec["ServiceName"],
        "ServiceTags": list(rec.get("ServiceTags") or []),
        "Type": rec["Type"],
        "Interval": rec["Interval"],
        "Timeout": rec["Timeout"],
        "ExposedPort": rec.get("ExposedPort", 0),
        "Definition": definition,
        "CreateIndex": rec["CreateIndex"],
        "ModifyIndex": rec["ModifyIndex"],
    }


def _upstream_json(u: Mapping[str, Any], api: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if u["DestinationType"] or not api:
        out["DestinationType"] = u["DestinationType"]
    for k in ("DestinationNamespace", "DestinationPartition", "DestinationPeer"):
        if u[k]:
            out[k] = u[k]
    out["DestinationName"] = u["DestinationName"]
    if u["Datacenter"] or not api:
        out["Datacenter"] = u["Datacenter"]
    for k in ("LocalBindAddress", "LocalBindPort", "LocalBindSocketPath", "LocalBindSocketMode"):
        if u[k]:
            out[k] = u[k]
    if u.get("Config"):
        out["Config"] = u["Config"]
    out["MeshGateway"] = {"Mode": u["MeshGateway"]["Mode"]} if u["MeshGateway"]["Mode"] else {}
    return out


def proxy_json(p: Mapping[str, Any], api: bool = False) -> dict[str, Any]:
    """A ``ConnectProxyConfig`` (server shape; ``api=True`` for the agent's omitempty shape)."""
    out: dict[str, Any] = {}
    for k in (
        "DestinationServiceName",
        "DestinationServiceID",
        "LocalServiceAddress",
        "LocalServicePort",
        "LocalServiceSocketPath",
    ):
        if p[k]:
            out[k] = p[k]
    if p["Mode"] or not api:
        out["Mode"] = p["Mode"]
    tp = p.get("TransparentProxy") or {}
    if tp.get("OutboundListenerPort") or tp.get("DialedDirectly"):
        out["TransparentProxy"] = {
            k: v
            for k, v in (
                ("OutboundListenerPort", tp.get("OutboundListenerPort")),
                ("DialedDirectly", tp.get("DialedDirectly")),
            )
            if v
        }
    if p.get("Config"):
        out["Config"] = p["Config"]
    if p["Upstreams"]:
        out["Upstreams"] = [_upstream_json(u, api) for u in p["Upstreams"]]
    out["MeshGateway"] = {"Mode": p["MeshGateway"]["Mode"]} if p["MeshGateway"]["Mode"] else {}
    expose: dict[str, Any] = {}
    if p["Expose"].get("Checks"):
        expose["Checks"] = True
    if p["Expose"].get("Paths"):
        expose["Paths"] = p["Expose"]["Paths"]
    out["Expose"] = expose
    return out


def _tagged_json(tagged: Mapping[str, Any]) -> dict[str, Any]:
    return {k: {"Address": v["Address"], "Port": v["Port"]} for k, v in tagged.items()}


def node_service_json(svc: Mapping[str, Any]) -> dict[str, Any]:
    """The server-side ``NodeService`` shape (``Service`` of health entries, catalog node reads)."""
    out: dict[str, Any] = {}
    if svc["Kind"]:
        out["Kind"] = svc["Kind"]
    out.update(
        {
            "ID": svc["ID"],
            "Service": svc["Service"],
            "Tags": list(svc["Tags"]),
            "Address": svc["Address"],
        }
    )
    if svc["TaggedAddresses"]:
        out["TaggedAddresses"] = _tagged_json(svc["TaggedAddresses"])
    out["Meta"] = dict(svc["Meta"])
    if svc["Port"]:
        out["Port"] = svc["Port"]
    if svc["SocketPath"]:
        out["SocketPath"] = svc["SocketPath"]
    out.update(
        {
            "Weights": dict(svc["Weights"]),
            "EnableTagOverride": svc["EnableTagOverride"],
            "Proxy": proxy_json(svc["Proxy"]),
            "Connect": {"Native": True} if svc["Native"] else {},
            "PeerName": "",
            "CreateIndex": svc["CreateIndex"],
            "ModifyIndex": svc["ModifyIndex"],
        }
    )
    return out


def agent_service_json(svc: Mapping[str, Any], datacenter: str) -> dict[str, Any]:
    """The ``api.AgentService`` shape of ``/v1/agent/services`` and ``/v1/agent/service/<id>``."""
    out: dict[str, Any] = {}
    if svc["Kind"]:
        out["Kind"] = svc["Kind"]
    out.update(
        {
            "ID": svc["ID"],
            "Service": svc["Service"],
            "Tags": list(svc["Tags"]),
            "Meta": dict(svc["Meta"]),
            "Port": svc["Port"],
            "Address": svc["Address"],
        }
    )
    if svc["SocketPath"]:
        out["SocketPath"] = svc["SocketPath"]
    if svc["TaggedAddresses"]:
        out["TaggedAddresses"] = _tagged_json(svc["TaggedAddresses"])
    out["Weights"] = dict(svc["Weights"])
    out["EnableTagOverride"] = svc["EnableTagOverride"]
    if svc["Kind"] == "connect-proxy" or svc["Kind"] in _GATEWAYS:
        out["Proxy"] = proxy_json(svc["Proxy"], api=True)
    if svc["Native"]:
        out["Connect"] = {"Native": True}
    out["Datacenter"] = datacenter
    return out


def service_node_json(svc: Mapping[str, Any], node: Mapping[str, Any]) -> dict[str, Any]:
    """The flat ``ServiceNode`` shape of ``/v1/catalog/service/<s>`` and ``/connect/<s>``."""
    out: dict[str, Any] = {
        "ID": node["ID"],
        "Node": node["Node"],
        "Address": node["Address"],
        "Datacenter": node["Datacenter"],
        "TaggedAddresses": dict(node.get("TaggedAddresses") or {}),
        "NodeMeta": dict(node.get("Meta") or {}),
        "ServiceKind": svc["Kind"],
        "ServiceID": svc["ID"],
        "ServiceName": svc["Service"],
        "ServiceTags": list(svc["Tags"]),
        "ServiceAddress": svc["Address"],
    }
    if svc["TaggedAddresses"]:
        out["ServiceTaggedAddresses"] = _tagged_json(svc["TaggedAddresses"])
    out.update(
        {
            "ServiceWeights": dict(svc["Weights"]),
            "ServiceMeta": dict(svc["Meta"]),
            "ServicePort": svc["Port"],
            "ServiceSocketPath": svc["SocketPath"],
            "ServiceEnableTagOverride": svc["EnableTagOverride"],
            "ServiceProxy": proxy_json(svc["Proxy"]),
            "ServiceConnect": {"Native": True} if svc["Native"] else {},
            "ServiceLocality": None,
            "CreateIndex": svc["CreateIndex"],
            "ModifyIndex": svc["ModifyIndex"],
        }
    )
    return out


# -- filter schemas (which selectors ?filter= accepts per endpoint) ------------------------------

_UPSTREAM_SCHEMA: dict[str, Any] = {
    k: None
    for k in (
        "DestinationType",
        "DestinationNamespace",
        "DestinationPartition",
        "DestinationPeer",
        "DestinationName",
        "Datacenter",
        "LocalBindAddress",
        "LocalBindPort",
        "LocalBindSocketPath",
        "LocalBindSocketMode",
    )
} | {"MeshGateway": {"Mode": None}, "Config": MAP}
_PROXY_SCHEMA: dict[str, Any] = {
    k: None
    for k in (
        "DestinationServiceName",
        "DestinationServiceID",
        "LocalServiceAddress",
        "LocalServicePort",
        "LocalServiceSocketPath",
        "Mode",
    )
} | {
    "Upstreams": [_UPSTREAM_SCHEMA],
    "MeshGateway": {"Mode": None},
    "Expose": {"Checks": None, "Paths": [MAP]},
    "TransparentProxy": {"OutboundListenerPort": None, "DialedDirectly": None},
    "Config": MAP,
}
_TAGGED_SCHEMA: dict[str, Any] = {"Address": None, "Port": None}

AGENT_SERVICE_SCHEMA: Schema = {
    "Kind": None,
    "ID": None,
    "Service": None,
    "Tags": [None],
    "Meta": MAP,
    "Port": None,
    "Address": None,
    "SocketPath": None,
    "TaggedAddresses": MAP,
    "Weights": {"Passing": None, "Warning": None},
    "EnableTagOverride": None,
    "Proxy": _PROXY_SCHEMA,
    "Connect": {"Native": None},
    "Datacenter": None,
    "PeerName": None,
}
_NODE_SERVICE_SCHEMA: dict[str, Any] = {
    "Kind": None,
    "ID": None,
    "Service": None,
    "Tags": [None],
    "Address": None,
    "TaggedAddresses": MAP,
    "Meta": MAP,
    "Port": None,
    "SocketPath": None,
    "Weights": {"Passing": None, "Warning": None},
    "EnableTagOverride": None,
    "Proxy": _PROXY_SCHEMA,
    "Connect": {"Native": None},
    "PeerName": None,
}
CHECK_SCHEMA: Schema = {
    k: None
    for k in (
        "Node",
        "CheckID",
        "Name",
        "Status",
        "Notes",
        "Output",
        "ServiceID",
        "ServiceName",
        "Type",
        "Interval",
        "Timeout",
        "ExposedPort",
        "PeerName",
    )
} | {"ServiceTags": [None]}
NODE_SCHEMA: Schema = {
    "ID": None,
    "Node": None,
    "Address": None,
    "Datacenter": None,
    "TaggedAddresses": MAP,
    "Meta": MAP,
    "PeerName": None,
    "Partition": None,
}
CHECK_SERVICE_NODE_SCHEMA: Schema = {
    "Node": NODE_SCHEMA,
    "Service": _NODE_SERVICE_SCHEMA,
    "Checks": [CHECK_SCHEMA],
}
SERVICE_NODE_SCHEMA: Schema = {
    "ID": None,
    "Node": None,
    "Address": None,
    "Datacenter": None,
    "TaggedAddresses": MAP,
    "NodeMeta": MAP,
    "ServiceKind": None,
    "ServiceID": None,
    "ServiceName": None,
    "ServiceTags": [None],
    "ServiceAddress": None,
    "ServiceTaggedAddresses": MAP,
    "ServiceWeights": {"Passing": None, "Warning": None},
    "ServiceMeta": MAP,
    "ServicePort": None,
    "ServiceSocketPath": None,
    "ServiceEnableTagOverride": None,
    "ServiceProxy": _PROXY_SCHEMA,
    "ServiceConnect": {"Native": None},
    "PeerName": None,
}
NODE_SERVICE_SCHEMA: Schema = _NODE_SERVICE_SCHEMA


def compile_request_filter(req: Request, schema: Schema) -> Filter:
    """The request's ``?filter=`` compiled against ``schema``.

    A bad filter is answered as Consul answers it: 500 with the evaluator's text (the
    endpoints return the compile error as a plain error). Only ``filter`` is read
    (Consul's ``parseFilter``): the agent-local lists do not validate ``index``,
    ``wait`` or the consistency flags, and the catalog reads validate them first.
    """
    try:
        return compile_filter(req.param("filter"), schema)
    except BexprError as exc:
        raise HTTPError(500, str(exc)) from None


def apply_filter(req: Request, schema: Schema, items: list[Any], key: Any = None) -> list[Any]:
    """``items`` kept by the request's filter (``key(item)`` gives the record to test)."""
    return compile_request_filter(req, schema).apply(items, key)


# -- the state object ---------------------------------------------------------------------


class CatalogState:
    """In-memory helpers around the catalog tables: TTL/reap deadlines and index bookkeeping."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.ttl_deadlines: dict[str, float] = {}
        self.reap_deadlines: dict[str, float] = {}
        # HTTP/TCP checks the agent runs itself: next run, running probe, thresholds.
        self.probe_deadlines: dict[str, float] = {}
        self.probe_tasks: dict[str, asyncio.Task[None]] = {}
        self.probe_thresholds: dict[str, probes.Thresholds] = {}
        self.wakeup = asyncio.Event()
        self.running = False
        for t in ALL_TABLES:
            self.store.table(t)
        self._ensure_local_node()

    # tables
    @property
    def nodes(self) -> dict[str, Any]:
        """``catalog.nodes``."""
        return self.store.table(T_NODES)

    @property
    def services(self) -> dict[str, Any]:
        """``catalog.services``."""
        return self.store.table(T_SERVICES)

    @property
    def checks(self) -> dict[str, Any]:
        """``catalog.checks``."""
        return self.store.table(T_CHECKS)

    @property
    def index(self) -> dict[str, Any]:
        """``catalog.index``."""
        return self.store.table(T_INDEX)

    @property
    def node_name(self) -> str:
        """The agent's own node name."""
        return self.ctx.config.node_name

    def _ensure_local_node(self) -> None:
        name = self.node_name
        cfg = self.ctx.config
        want: dict[str, Any] = {
            "ID": self.ctx.node_id,
            "Node": name,
            "Address": "127.0.0.1",
            "Datacenter": cfg.datacenter,
            "TaggedAddresses": {
                "lan": "127.0.0.1",
                "lan_ipv4": "127.0.0.1",
                "wan": "127.0.0.1",
                "wan_ipv4": "127.0.0.1",
            },
            "Meta": {"consul-network-segment": "", "consul-version": CONSUL_VERSION},
        }
        cur = self.nodes.get(name)
        serf = self.checks.get(key(name, SERF_CHECK_ID))
        if cur is not None and _public_eq(cur, want) and serf is not None:
            return
        idx = self.store.next_index()
        rec = dict(want)
        rec["CreateIndex"] = cur["CreateIndex"] if cur else idx
        rec["ModifyIndex"] = idx
        self.nodes[name] = rec
        if serf is None:
            self.checks[key(name, SERF_CHECK_ID)] = {
                "Node": name,
                "CheckID": SERF_CHECK_ID,
                "Name": "Serf Health Status",
                "Status": "passing",
                "Notes": "",
                "Output": "Agent alive and reachable",
                "ServiceID": "",
                "ServiceName": "",
                "ServiceTags": [],
                "Type": "",
                "Interval": "",
                "Timeout": "",
                "ExposedPort": 0,
                "CreateIndex": idx,
                "ModifyIndex": idx,
                "_ttl": 0.0,
                "_deregister_after": 0.0,
                "_critical_since": None,
                "_def": {},
                # Maintained by the server, not part of the agent's local checks.
                "_server": True,
            }
        self.store.commit(T_NODES, T_CHECKS)

    # lookups
    def local_services(self) -> list[dict[str, Any]]:
        """Services registered on the agent's own node, in ID order."""
        name = self.node_name
        return sorted(
            (s for s in self.services.values() if s["Node"] == name), key=lambda s: s["ID"]
        )

    def service(self, sid: str, node: str | None = None) -> dict[str, Any] | None:
        """The service ``sid`` on ``node`` (default: the agent's node)."""
        rec: dict[str, Any] | None = self.services.get(key(node or self.node_name, sid))
        return rec

    def local_checks(self) -> list[dict[str, Any]]:
        """Checks the agent itself manages (its node, minus ``serfHealth``), in ID order."""
        name = self.node_name
        return sorted(
            (c for c in self.checks.values() if c["Node"] == name and not c.get("_server")),
            key=lambda c: c["CheckID"],
        )

    def local_check(self, check_id: str) -> dict[str, Any] | None:
        """The agent-managed check ``check_id``, or None."""
        rec: dict[str, Any] | None = self.checks.get(key(self.node_name, check_id))
        if rec is None or rec.get("_server"):
            return None
        return rec

    def checks_of_service(self, node: str, sid: str) -> list[dict[str, Any]]:
        """The checks bound to service ``sid`` on ``node``."""
        return sorted(
            (c for c in self.checks.values() if c["Node"] == node and c["ServiceID"] == sid),
            key=lambda c: c["CheckID"],
        )

    # index bookkeeping
    def index_keys(self, svc: Mapping[str, Any]) -> set[str]:
        """The ``catalog.index`` keys a change to ``svc`` affects."""
        keys = {f"service:{svc['Service'].lower()}"}
        if svc["Native"]:
            keys.add(f"connect:{svc['Service'].lower()}")
        if svc["Kind"] == "connect-proxy" and svc["Proxy"]["DestinationServiceName"]:
            keys.add(f"connect:{svc['Proxy']['DestinationServiceName'].lower()}")
        return keys

    def bump(self, idx: int, keys: Iterable[str]) -> None:
        """Record ``idx`` as the latest change of each key."""
        for k in keys:
            self.index[k] = idx

    def bump_node(self, idx: int, node: str) -> None:
        """A node-level change touches every service on that node."""
        for s in self.services.values():
            if s["Node"] == node:
                self.bump(idx, self.index_keys(s))

    # check status changes
    def set_check_status(self, ck: str, status: str, output: str, *, commit: bool = True) -> bool:
        """Set a check's status and output; True when something changed (and was committed)."""
        rec = self.checks.get(ck)
        if rec is None:
            return False
        limit = (rec.get("_def") or {}).get("OutputMaxSize") or OUTPUT_MAX
        if len(output.encode()) > limit:
            total = len(output.encode())
            output = (
                output.encode()[:limit].decode(errors="ignore")
                + f" ... (captured {limit} of {total} bytes)"
            )
        self._track_critical(ck, rec, status)
        if rec["Status"] == status and rec["Output"] == output:
            return False
        idx = self.store.next_index()
        rec["Status"] = status
        rec["Output"] = output
        rec["ModifyIndex"] = idx
        self._bump_for_check(idx, rec)
        if commit:
            self.store.commit(T_CHECKS, T_INDEX)
        return True

    def _bump_for_check(self, idx: int, rec: Mapping[str, Any]) -> None:
        if rec["ServiceID"]:
            svc = self.services.get(key(rec["Node"], rec["ServiceID"]))
            if svc is not None:
                self.bump(idx, self.index_keys(svc))
        else:
            self.bump_node(idx, rec["Node"])

    def _track_critical(self, ck: str, rec: dict[str, Any], status: str) -> None:
        after = rec.get("_deregister_after") or 0.0
        if status == "critical":
            if rec.get("_critical_since") is None:
                rec["_critical_since"] = time.time()
            if after > 0 and rec["ServiceID"] and rec["Node"] == self.node_name:
                elapsed = time.time() - rec["_critical_since"]
                self.reap_deadlines[ck] = _loop_time() + max(0.0, after - elapsed)
                self.wakeup.set()
        else:
            rec["_critical_since"] = None
            self.reap_deadlines.pop(ck, None)

    def arm_ttl(self, ck: str) -> None:
        """(Re)start the TTL timer of check ``ck``."""
        rec = self.checks.get(ck)
        if rec is None or not rec.get("_ttl"):
            self.ttl_deadlines.pop(ck, None)
            return
        self.ttl_deadlines[ck] = _loop_time() + float(rec["_ttl"])
        self.wakeup.set()

    def arm_probe(self, ck: str) -> None:
        """(Re)start running HTTP/TCP check ``ck`` now and then every interval."""
        rec = self.checks.get(ck)
        task = self.probe_tasks.pop(ck, None)
        if task is not None:
            task.cancel()
        d = (rec or {}).get("_def") or {}
        if rec is None or not probes.probed(d):
            self.probe_deadlines.pop(ck, None)
            self.probe_thresholds.pop(ck, None)
            return
        self.probe_thresholds[ck] = probes.Thresholds(
            int(d.get("FailuresBeforeWarning") or 0),
            int(d.get("FailuresBeforeCritical") or 0),
            int(d.get("SuccessBeforePassing") or 0),
        )
        self.probe_deadlines[ck] = _loop_time()
        self.wakeup.set()

    def forget_check(self, ck: str) -> None:
        """Drop timers of a removed check."""
        self.ttl_deadlines.pop(ck, None)
        self.reap_deadlines.pop(ck, None)
        self.probe_deadlines.pop(ck, None)
        self.probe_thresholds.pop(ck, None)
        task = self.probe_tasks.pop(ck, None)
        if task is not None:
            task.cancel()

    def _start_probes(self) -> None:
        now = _loop_time()
        for ck in [c for c, d in self.probe_deadlines.items() if d <= now]:
            del self.probe_deadlines[ck]
            rec = self.checks.get(ck)
            if rec is None or ck in self.probe_tasks:
                continue
            self.probe_tasks[ck] = asyncio.get_running_loop().create_task(
                self._run_probe(ck, rec["_def"])
            )

    async def _run_probe(self, ck: str, definition: Mapping[str, Any]) -> None:
        try:
            status, output = await probes.probe(definition)
        finally:
            if self.probe_tasks.get(ck) is asyncio.current_task():
                del self.probe_tasks[ck]
        rec = self.checks.get(ck)
        thresholds = self.probe_thresholds.get(ck)
        if rec is None or rec.get("_def") != definition or thresholds is None:
            return  # deregistered or redefined meanwhile
        verdict = thresholds.apply(status, output)
        if verdict is not None:
            self.set_check_status(ck, *verdict)
        self.probe_deadlines[ck] = _loop_time() + float(definition["Interval"])
        self.wakeup.set()

    def arm_all(self) -> None:
        """Start timers for every check (at agent start, TTLs get a fresh period)."""
        for ck, rec in self.checks.items():
            self.arm_probe(ck)
            if rec.get("_ttl"):
                self.arm_ttl(ck)
            if rec["Status"] == "critical":
                self._track_critical(ck, rec, "critical")

    # service add/remove
    def put_service(
        self,
        idx: int,
        rec: dict[str, Any],
        check_defs: list[CheckDef],
        *,
        replace_checks: bool,
    ) -> bool:
        """Insert or replace a service and its checks at index ``idx``; True if anything changed."""
        node, sid = rec["Node"], rec["ID"]
        sk = key(node, sid)
        old = self.services.get(sk)
        changed = False
        if old is not None:
            rec["CreateIndex"] = old["CreateIndex"]
            rec["ModifyIndex"] = old["ModifyIndex"]
            if not _public_eq(old, rec) or old.get("_sidecar_of") != rec.get("_sidecar_of"):
                rec["ModifyIndex"] = idx
                self.bump(idx, self.index_keys(old) | self.index_keys(rec))
                changed = True
        else:
            rec["CreateIndex"] = rec["ModifyIndex"] = idx
            self.bump(idx, self.index_keys(rec))
            changed = True
        self.services[sk] = rec
        wanted: set[str] = set()
        for i, cd in enumerate(check_defs):
            cid = cd.check_id
            if cid == "":
                cid = f"service:{sid}"
                if len(check_defs) > 1:
                    cid += f":{i + 1}"
            name = cd.name or f"Service '{rec['Service']}' check"
            wanted.add(cid)
            changed |= self.put_check(idx, check_record(cd, node, rec, cid, name))
        for c in self.checks_of_service(node, sid):
            if c["CheckID"] in wanted:
                continue
            if replace_checks:
                self.delete_check(idx, key(node, c["CheckID"]))
                changed = True
            elif c["ServiceTags"] != rec["Tags"] or c["ServiceName"] != rec["Service"]:
                c["ServiceTags"] = list(rec["Tags"])
                c["ServiceName"] = rec["Service"]
                c["ModifyIndex"] = idx
                changed = True
        return changed

    def put_check(self, idx: int, rec: dict[str, Any]) -> bool:
        """Insert or replace a check; an existing check keeps its status and output."""
        ck = key(rec["Node"], rec["CheckID"])
        old = self.checks.get(ck)
        if old is not None:
            rec["Status"] = old["Status"]
            rec["Output"] = old["Output"]
            rec["_critical_since"] = old.get("_critical_since")
            rec["CreateIndex"] = old["CreateIndex"]
            rec["ModifyIndex"] = old["ModifyIndex"]
            if _full_eq(old, rec):
                self.checks[ck] = rec
                # Re-registering restarts the TTL timer, as a fresh CheckTTL would.
                self.arm_ttl(ck)
                if ck not in self.probe_tasks and ck not in self.probe_deadlines:
                    self.arm_probe(ck)
                return False
        else:
            rec["CreateIndex"] = idx
        rec["ModifyIndex"] = idx
        self.checks[ck] = rec
        self._bump_for_check(idx, rec)
        self._track_critical(ck, rec, rec["Status"])
        self.arm_ttl(ck)
        self.arm_probe(ck)
        return True

    def delete_check(self, idx: int, ck: str) -> None:
        """Remove a check (no commit)."""
        rec = self.checks.pop(ck, None)
        if rec is None:
            return
        self.forget_check(ck)
        self._bump_for_check(idx, rec)

    def delete_service(self, idx: int, node: str, sid: str) -> None:
        """Remove a service, its checks, and a sidecar it registered (no commit)."""
        rec = self.services.pop(key(node, sid), None)
        if rec is None:
            return
        self.bump(idx, self.index_keys(rec))
        for c in self.checks_of_service(node, sid):
            self.delete_check(idx, key(node, c["CheckID"]))
        sidecar = self.services.get(key(node, sid + SIDECAR_SUFFIX))
        if sidecar is not None and sidecar.get("_sidecar_of") == sid:
            self.delete_service(idx, node, sidecar["ID"])

    def commit(self) -> int:
        """Commit the catalog tables."""
        return self.store.commit(T_NODES, T_SERVICES, T_CHECKS, T_INDEX)

    # background work
    async def _expire(self) -> None:
        now = _loop_time()
        changed = False
        for ck in [c for c, d in self.ttl_deadlines.items() if d <= now]:
            self.ttl_deadlines.pop(ck, None)
            rec = self.checks.get(ck)
            if rec is None:
                continue
            last = rec.get("_ttl_output", "")
            output = (
                "TTL expired"
                if not last
                else f"TTL expired (last output before timeout follows): {last}"
            )
            changed |= self.set_check_status(ck, "critical", output, commit=False)
        for ck in [c for c, d in self.reap_deadlines.items() if d <= now]:
            self.reap_deadlines.pop(ck, None)
            rec = self.checks.get(ck)
            if rec is None or rec["Status"] != "critical" or not rec["ServiceID"]:
                continue
            idx = self.store.next_index()
            self.delete_service(idx, rec["Node"], rec["ServiceID"])
            changed = True
        if changed:
            self.commit()

    async def run(self) -> None:
        """Fire TTL expiries and critical-service reaping at their deadlines, forever."""
        self.running = True
        self.arm_all()
        try:
            while True:
                await self._expire()
                self._start_probes()
                pending = [
                    *self.ttl_deadlines.values(),
                    *self.reap_deadlines.values(),
                    *self.probe_deadlines.values(),
                ]
                self.wakeup.clear()
                timeout = max(0.0, min(pending) - _loop_time()) if pending else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), timeout)
        finally:
            # The agent is stopping: no probe outlives it.
            for task in list(self.probe_tasks.values()):
                task.cancel()
            self.probe_tasks.clear()


def _loop_time() -> float:
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


def _public_eq(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    skip = ("CreateIndex", "ModifyIndex")
    pa = {k: v for k, v in _public(a).items() if k not in skip}
    pb = {k: v for k, v in _public(b).items() if k not in skip}
    return pa == pb


def _full_eq(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    skip = ("CreateIndex", "ModifyIndex", "_critical_since", "_ttl_output")
    pa = {k: v for k, v in a.items() if k not in skip}
    pb = {k: v for k, v in b.items() if k not in skip}
    return pa == pb


_EXT_KEY = "catalog"


def catalog_state(ctx: AgentContext) -> CatalogState:
    """The :class:`CatalogState` of ``ctx`` (created on first use)."""
    st = ctx.extensions.get(_EXT_KEY)
    if st is None:
        st = ctx.extensions[_EXT_KEY] = CatalogState(ctx)
    assert isinstance(st, CatalogState)
    return st


async def ttl_task(ctx: AgentContext) -> None:
    """Background task (registered in ``ctx.background``): TTL expiry and reaping."""
    await catalog_state(ctx).run()


# -- health / catalog reads ------------------------------------------------------------------------


def service_matches(svc: Mapping[str, Any], name: str, connect: bool) -> bool:
    """True when ``svc`` is an instance of ``name`` (with ``connect``: Connect-capable for it)."""
    lname = name.lower()
    if not connect:
        return bool(svc["Service"].lower() == lname)
    if svc["Native"] and svc["Service"].lower() == lname:
        return True
    return bool(
        svc["Kind"] == "connect-proxy" and svc["Proxy"]["DestinationServiceName"].lower() == lname
    )


def health_index(st: CatalogState, name: str, connect: bool) -> int:
    """The index of a health/catalog read of ``name`` (the services table index when never seen)."""
    k = f"{'connect' if connect else 'service'}:{name.lower()}"
    idx = st.index.get(k)
    return int(idx) if idx else st.store.max_index(T_SERVICES)


def node_meta_filter(req: Request) -> dict[str, str]:
    """``?node-meta=key:value`` pairs."""
    out: dict[str, str] = {}
    for pair in req.params("node-meta"):
        k, _, v = pair.partition(":")
        out[k] = v
    return out


def _meta_ok(node: Mapping[str, Any], filters: Mapping[str, str]) -> bool:
    meta = node.get("Meta") or {}
    return all(k in meta and meta[k] == v for k, v in filters.items())


def select_services(
    st: CatalogState,
    name: str,
    *,
    connect: bool,
    tags: list[str] | None = None,
    node_meta: Mapping[str, str] | None = None,
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(service, node)`` pairs for ``name``, filtered by tags (all must match) and node meta."""
    out = []
    for svc in st.services.values():
        if not service_matches(svc, name, connect):
            continue
        node = st.nodes.get(svc["Node"])
        if node is None:
            continue
        if tags:
            have = {t.lower() for t in svc["Tags"]}
            if not all(t.lower() in have for t in tags):
                continue
        if node_meta and not _meta_ok(node, node_meta):
            continue
        out.append((svc, node))
    out.sort(key=lambda p: (p[1]["Node"], p[0]["ID"]))
    return out


def check_service_nodes(
    st: CatalogState, pairs: list[tuple[dict[str, Any], dict[str, Any]]]
) -> list[dict[str, Any]]:
    """``CheckServiceNode`` objects (node, service, node checks then service checks)."""
    out = []
    for svc, node in pairs:
        node_checks = [
            c for c in st.checks.values() if c["Node"] == node["Node"] and not c["ServiceID"]
        ]
        node_checks.sort(key=lambda c: c["CheckID"])
        svc_checks = st.checks_of_service(node["Node"], svc["ID"])
        out.append(
            {
                "Node": node_json(node),
                "Service": node_service_json(svc),
                "Checks": [check_json(c) for c in node_checks + svc_checks],
            }
        )
    return out


def acl_filter_entries(
    req: Request, entries: list[Any], node_of: Any, service_of: Any
) -> tuple[list[Any], bool]:
    """Drop entries whose node (``node:read``) or service (``service:read``) the token cannot read.

    Returns the kept entries and whether anything was dropped.
    """
    authz = req.authz
    kept = []
    for e in entries:
        node = node_of(e)
        svc = service_of(e)
        if node and not authz.allowed("node", "read", node):
            continue
        if svc and not authz.allowed("service", "read", svc):
            continue
        kept.append(e)
    return kept, len(kept) != len(entries)


def filtered_header(req: Request, dropped: bool) -> dict[str, str]:
    """``X-Consul-Results-Filtered-By-ACLs: true`` when something was dropped for a token."""
    if dropped and req.authz.has_token:
        return {"X-Consul-Results-Filtered-By-ACLs": "true"}
    return {}


def content_hash(data: Any) -> str:
    """An opaque hash of a JSON-able value (``X-Consul-ContentHash``)."""
    digest = hashlib.blake2b(json.dumps(data, sort_keys=True).encode(), digest_size=8).digest()
    return f"{int.from_bytes(digest, 'big'):x}"
