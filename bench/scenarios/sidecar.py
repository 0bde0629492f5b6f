"""nginx (Debian) as the sidecar pair and as the OpenSSL ceiling.

Three nginx processes, each ``worker_processes 1`` and run in the foreground:

* **server-side sidecar** (stream): terminates mTLS with the "api" leaf, requires a
  client certificate chaining to the Connect roots (``ssl_verify_client on``), and
  proxies the plaintext bytes to the Python server: one extra hop, as Envoy would be;
* **client-side sidecar** (stream): accepts the client's plaintext and dials the
  server-side sidecar over mTLS with the "web" leaf;
* **ceiling** (http): nginx answering ``200`` with the same 100-byte body itself over
  mTLS, no backend: OpenSSL plus the fastest C HTTP server on this machine;
* **HTTP-aware pair** (http, keep-alive scenarios only): the same two hops with nginx's
  HTTP proxy, which parses every request and pools its upstream connections (mTLS
  between the sidecars, plaintext to the app), as a mesh proxy does for a service whose
  intentions have HTTP rules. Pooling means a client's new connection costs no new
  mTLS handshake, so this pair is not measured with a new connection per request.

Key material: nginx reads certificates and keys only from files. For this benchmark
(and only here) the leaf keys are written to a fresh ``/dev/shm`` directory (tmpfs,
mode 0700, files 0600) and deleted when :meth:`NginxSet.close` runs. The library itself
never writes a key to a file.

Honest differences from Envoy: nginx's stream module does no SPIFFE (URI SAN) check on
either side, and nginx cannot verify a server certificate that names no DNS host, so the
client-side sidecar does not verify the server's chain (``proxy_ssl_verify off``). Both
make the sidecar pair *cheaper* than a faithful mesh proxy.

Session resumption: for the full-handshake scenarios, exactly as in the first run:
no tickets, no session cache, ``proxy_ssl_session_reuse off`` (the cheapest nginx: a
ticket costs OpenSSL 3.0 ~0.3 ms per handshake). For the ``+resume`` scenarios a second
set with tickets on (nginx's default) and ``proxy_ssl_session_reuse on`` (Envoy also
resumes upstream sessions by default).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from common import BODY, Pem, Proc, wait_port

STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def nginx_available() -> bool:
    """True when the nginx binary and its stream module are installed."""
    return shutil.which("nginx") is not None and os.path.exists(STREAM_MODULE)


def _head(prefix: Path, *, stream: bool) -> str:
    load = f"load_module {STREAM_MODULE};\n" if stream else ""
    return (
        f"{load}daemon off;\nmaster_process on;\nworker_processes 1;\n"
        f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log error;\n"
        "events { worker_connections 8192; multi_accept on; }\n"
    )


_HTTP_COMMON = """  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 30s;
  client_body_temp_path @PREFIX@/body;
  proxy_temp_path @PREFIX@/proxy;
  fastcgi_temp_path @PREFIX@/fastcgi;
  uwsgi_temp_path @PREFIX@/uwsgi;
  scgi_temp_path @PREFIX@/scgi;"""

# HTTP/1.1 with keep-alive to the upstream, no buffering of the (tiny) responses to disk.
_HTTP_PROXY = """      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_buffering off;"""


def _mtls_listener(keys: Path, port: int, *, tickets: bool) -> str:
    """A listener terminating mesh mTLS as "api": a client certificate from the roots."""
    return f"""    listen 127.0.0.1:{port} ssl backlog=4096;
    ssl_certificate {keys}/api.crt;
    ssl_certificate_key {keys}/api.key;
    ssl_client_certificate {keys}/roots.pem;
    ssl_verify_client on;
    ssl_verify_depth 3;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_tickets {'on' if tickets else 'off'};
    ssl_session_cache off;"""


class NginxSet:
    """Starts the nginx processes it is asked for; :meth:`close` stops all and wipes keys."""

    def __init__(self, api: Pem, web: Pem) -> None:
        self.keys = Path(tempfile.mkdtemp(prefix="cc-bench-", dir="/dev/shm"))
        os.chmod(self.keys, stat.S_IRWXU)
        self.work = Path(tempfile.mkdtemp(prefix="cc-bench-nginx-"))
        self.procs: list[Proc] = []
        for name, text in (
            ("api.crt", api.cert),
            ("api.key", api.key),
            ("web.crt", web.cert),
            ("web.key", web.key),
            ("roots.pem", api.roots),
        ):
            fd = os.open(self.keys / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)

    def _start(self, name: str, conf: str, port: int) -> Proc:
        prefix = self.work / name
        prefix.mkdir()
        (prefix / "nginx.conf").write_text(conf.replace("@PREFIX@", str(prefix)))
        proc = Proc(["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                     "-e", str(prefix / "error.log")], name=name)
        self.procs.append(proc)
        try:
            wait_port(port, 10, proc.popen)
        except Exception as exc:
            err = (prefix / "error.log").read_text() if (prefix / "error.log").exists() else ""
            raise RuntimeError(f"nginx {name} did not start: {exc}; {err[-800:]}") from exc
        return proc

    def server_sidecar(self, port: int, backend_port: int, *, tickets: bool = False,
                       name: str = "server-sidecar") -> Proc:
        k = self.keys
        conf = _head(self.work / name, stream=True) + f"""
stream {{
  server {{
{_mtls_listener(k, port, tickets=tickets)}
    proxy_pass 127.0.0.1:{backend_port};
  }}
}}
"""
        return self._start(name, conf, port)

    def client_sidecar(self, port: int, upstream_port: int, *, reuse: bool = False,
                       name: str = "client-sidecar") -> Proc:
        k = self.keys
        conf = _head(self.work / name, stream=True) + f"""
stream {{
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    proxy_pass 127.0.0.1:{upstream_port};
    proxy_ssl on;
    proxy_ssl_certificate {k}/web.crt;
    proxy_ssl_certificate_key {k}/web.key;
    proxy_ssl_trusted_certificate {k}/roots.pem;
    proxy_ssl_verify off;
    proxy_ssl_session_reuse {'on' if reuse else 'off'};
    proxy_ssl_protocols TLSv1.2 TLSv1.3;
  }}
}}
"""
        return self._start(name, conf, port)

    def server_sidecar_http(self, port: int, backend_port: int,
                            name: str = "server-sidecar-http") -> Proc:
        k = self.keys
        conf = _head(self.work / name, stream=False) + f"""
http {{
{_HTTP_COMMON}
  upstream app {{
    server 127.0.0.1:{backend_port};
    keepalive 64;
  }}
  server {{
{_mtls_listener(k, port, tickets=False)}
    location / {{
{_HTTP_PROXY}
      proxy_pass http://app;
    }}
  }}
}}
"""
        return self._start(name, conf, port)

    def client_sidecar_http(self, port: int, upstream_port: int,
                            name: str = "client-sidecar-http") -> Proc:
        k = self.keys
        conf = _head(self.work / name, stream=False) + f"""
http {{
{_HTTP_COMMON}
  upstream mesh {{
    server 127.0.0.1:{upstream_port};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
{_HTTP_PROXY}
      proxy_pass https://mesh;
      proxy_ssl_certificate {k}/web.crt;
      proxy_ssl_certificate_key {k}/web.key;
      proxy_ssl_trusted_certificate {k}/roots.pem;
      proxy_ssl_verify off;
      proxy_ssl_protocols TLSv1.2 TLSv1.3;
    }}
  }}
}}
"""
        return self._start(name, conf, port)

    def ceiling(self, port: int, *, tickets: bool = False, name: str = "ceiling") -> Proc:
        k = self.keys
        body = BODY.decode().rstrip("\n")
        conf = _head(self.work / name, stream=False) + f"""
http {{
{_HTTP_COMMON}
  server {{
{_mtls_listener(k, port, tickets=tickets)}
    location / {{
      default_type text/plain;
      return 200 "{body}\\n";
    }}
  }}
}}
"""
        return self._start(name, conf, port)

    def close(self) -> None:
        for p in self.procs:
            p.close()
        self.procs.clear()
        # The keys go first: they are the reason this directory exists.
        for f in list(self.keys.iterdir()) if self.keys.exists() else []:
            with contextlib.suppress(OSError):
                f.unlink()
        shutil.rmtree(self.keys, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)
