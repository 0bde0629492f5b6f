"""AgentConfig.from_env follows the Go API client's CONSUL_* rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from consul_connect.agent.config import AgentConfig, parse_bool
from consul_connect.errors import ConfigError


def test_empty_environment_gives_local_http_agent() -> None:
    cfg = AgentConfig.from_env({})
    assert cfg.address == "127.0.0.1:8500"
    assert cfg.scheme == "http"
    assert cfg.path_prefix == ""
    assert cfg.unix_socket is None
    assert cfg.token == ""
    assert cfg.http_auth is None
    assert cfg.verify is True
    assert cfg.namespace is None and cfg.partition is None and cfg.datacenter is None
    assert cfg.base_url == "http://127.0.0.1:8500"


def test_bare_host_port_keeps_http() -> None:
    cfg = AgentConfig.from_env({"CONSUL_HTTP_ADDR": "consul.local:8501"})
    assert (cfg.address, cfg.scheme) == ("consul.local:8501", "http")


def test_https_address_forces_https() -> None:
    cfg = AgentConfig.from_env({"CONSUL_HTTP_ADDR": "https://consul.local:8501"})
    assert (cfg.address, cfg.scheme) == ("consul.local:8501", "https")
    assert cfg.base_url == "https://consul.local:8501"


def test_http_address_does_not_downgrade_ssl_from_env() -> None:
    cfg = AgentConfig.from_env(
        {"CONSUL_HTTP_ADDR": "http://consul.local:8501", "CONSUL_HTTP_SSL": "true"}
    )
    assert cfg.scheme == "https"


def test_bare_address_with_ssl_env_uses_https() -> None:
    cfg = AgentConfig.from_env({"CONSUL_HTTP_ADDR": "10.0.0.1:8501", "CONSUL_HTTP_SSL": "1"})
    assert cfg.base_url == "https://10.0.0.1:8501"


@pytest.mark.parametrize("value", ["1", "t", "T", "TRUE", "true", "True"])
def test_ssl_env_accepts_every_go_true_spelling(value: str) -> None:
    assert AgentConfig.from_env({"CONSUL_HTTP_SSL": value}).scheme == "https"


@pytest.mark.parametrize("value", ["0", "f", "F", "FALSE", "false", "False"])
def test_ssl_env_false_spellings_keep_http(value: str) -> None:
    assert AgentConfig.from_env({"CONSUL_HTTP_SSL": value}).scheme == "http"


@pytest.mark.parametrize("value", ["yes", "on", "tRuE", " true", "2"])
def test_unparseable_ssl_env_is_ignored_with_warning(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = AgentConfig.from_env({"CONSUL_HTTP_SSL": value})
    assert cfg.scheme == "http"
    assert "CONSUL_HTTP_SSL" in caplog.text


def test_parse_bool_rejects_non_go_spellings() -> None:
    with pytest.raises(ValueError):
        parse_bool("yes")


def test_path_after_host_becomes_prefix() -> None:
    cfg = AgentConfig.from_env({"CONSUL_HTTP_ADDR": "https://proxy.example:443/consul/api"})
    assert cfg.address == "proxy.example:443"
    assert cfg.path_prefix == "/consul/api"
    assert cfg.base_url == "https://proxy.example:443/consul/api"


def test_trailing_slash_alone_gives_no_prefix() -> None:
    cfg = AgentConfig.from_env({"CONSUL_HTTP_ADDR": "http://127.0.0.1:8500/"})
    assert cfg.path_prefix == ""
    assert cfg.base_url == "http://127.0.0.1:8500"


def test_unix_address_uses_the_whole_rest_as_socket_path() -> None:
    cfg = AgentConfig.from_env({"CONSUL_HTTP_ADDR": "unix:///var/run/consul/http.sock"})
    assert cfg.unix_socket == "/var/run/consul/http.sock"
    assert cfg.address == "/var/run/consul/http.sock"
    assert cfg.path_prefix == ""
    assert cfg.base_url == "http://localhost"


@pytest.mark.parametrize(("addr", "scheme"), [("ftp://x:1", "ftp"), ("HTTP://x:1", "HTTP")])
def test_unknown_scheme_is_a_config_error_with_consul_text(addr: str, scheme: str) -> None:
    with pytest.raises(ConfigError, match=f"^Unknown protocol scheme: {scheme}$"):
        AgentConfig.from_env({"CONSUL_HTTP_ADDR": addr})


def test_token_from_env() -> None:
    assert AgentConfig.from_env({"CONSUL_HTTP_TOKEN": "s3cret"}).token == "s3cret"


def test_token_file_wins_over_token_and_is_trimmed(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  from-file\n\n")
    cfg = AgentConfig.from_env(
        {"CONSUL_HTTP_TOKEN": "from-env", "CONSUL_HTTP_TOKEN_FILE": str(token_file)}
    )
    assert cfg.token == "from-file"


def test_blank_token_file_leaves_env_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(" \n")
    cfg = AgentConfig.from_env(
        {"CONSUL_HTTP_TOKEN": "from-env", "CONSUL_HTTP_TOKEN_FILE": str(token_file)}
    )
    assert cfg.token == "from-env"


def test_missing_token_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Error loading token file"):
        AgentConfig.from_env({"CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "nope")})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("alice", ("alice", "")), ("alice:pw", ("alice", "pw")), ("alice:p:w", ("alice", "p:w"))],
)
def test_http_auth_splits_on_first_colon(raw: str, expected: tuple[str, str]) -> None:
    assert AgentConfig.from_env({"CONSUL_HTTP_AUTH": raw}).http_auth == expected


def test_ssl_verify_false_disables_verification() -> None:
    assert AgentConfig.from_env({"CONSUL_HTTP_SSL_VERIFY": "false"}).verify is False
    assert AgentConfig.from_env({"CONSUL_HTTP_SSL_VERIFY": "true"}).verify is True


def test_unparseable_ssl_verify_keeps_verification_on() -> None:
    assert AgentConfig.from_env({"CONSUL_HTTP_SSL_VERIFY": "nope"}).verify is True


def test_tls_files_are_taken_from_env() -> None:
    cfg = AgentConfig.from_env(
        {
            "CONSUL_CACERT": "/etc/consul/ca.pem",
            "CONSUL_CAPATH": "/etc/consul/cas",
            "CONSUL_CLIENT_CERT": "/etc/consul/cli.pem",
            "CONSUL_CLIENT_KEY": "/etc/consul/cli-key.pem",
        }
    )
    assert cfg.ca_file == "/etc/consul/ca.pem"
    assert cfg.ca_path == "/etc/consul/cas"
    assert cfg.client_cert == "/etc/consul/cli.pem"
    assert cfg.client_key == "/etc/consul/cli-key.pem"


@pytest.mark.parametrize("only", ["CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY"])
def test_client_cert_without_key_is_an_error(only: str) -> None:
    with pytest.raises(ConfigError, match="both client cert and client key must be provided"):
        AgentConfig.from_env({only: "/x.pem"})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("consul.service", "consul.service"),
        ("consul.service:8501", "consul.service"),
        ("[::1]:8501", "::1"),
        ("::1", "::1"),
    ],
)
def test_tls_server_name_loses_its_port(raw: str, expected: str) -> None:
    assert AgentConfig.from_env({"CONSUL_TLS_SERVER_NAME": raw}).tls_server_name == expected


def test_namespace_and_partition_from_env() -> None:
    cfg = AgentConfig.from_env({"CONSUL_NAMESPACE": "team-a", "CONSUL_PARTITION": "p1"})
    assert (cfg.namespace, cfg.partition) == ("team-a", "p1")


def test_empty_variables_count_as_unset() -> None:
    cfg = AgentConfig.from_env(
        {
            "CONSUL_HTTP_ADDR": "",
            "CONSUL_NAMESPACE": "",
            "CONSUL_CACERT": "",
            "CONSUL_HTTP_AUTH": "",
        }
    )
    assert cfg.address == "127.0.0.1:8500"
    assert cfg.namespace is None and cfg.ca_file is None and cfg.http_auth is None


def test_repr_hides_token_and_password() -> None:
    cfg = AgentConfig(token="very-secret-token", http_auth=("alice", "hunter2"))
    text = repr(cfg)
    assert "very-secret-token" not in text
    assert "hunter2" not in text
    assert "alice" in text and "<hidden>" in text


def test_from_address_accepts_any_env_form() -> None:
    cfg = AgentConfig.from_address("https://127.0.0.1:8501/prefix", token="t")
    assert (cfg.scheme, cfg.address, cfg.path_prefix, cfg.token) == (
        "https",
        "127.0.0.1:8501",
        "/prefix",
        "t",
    )


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "https://envhost:1234")
    assert AgentConfig.from_env().address == "envhost:1234"


def test_config_is_frozen() -> None:
    cfg = AgentConfig()
    with pytest.raises(AttributeError):
        cfg.token = "x"  # type: ignore[misc]
