"""bench/where.py reads py-spy's raw stacks into shares of the serving thread's busy time."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "scenarios"))

import where  # noqa: E402

LOOP = (
    "main (server.py:1);_run_once (asyncio/base_events.py:1922);"
    "Handle._run (asyncio/events.py:80)"
)


def test_shares_count_only_the_busy_loop_thread(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "\n".join(
            [
                f"{LOOP};SSLProtocol._do_handshake (asyncio/sslproto.py:555);"
                "SSLObject.do_handshake (ssl.py:977);"
                "_ssl__SSLSocket_do_handshake (_ssl.c.h:19) 6",
                f"{LOOP};H11Protocol.data_received (uvicorn/protocols/http/h11_impl.py:172);"
                "Connection.next_event (h11/_connection.py:1) 3",
                f"{LOOP};authorize_peer (consul_connect/service.py:692) 1",
                f"{LOOP};TLSSocketTransport._read_ready (consul_connect/integrations/"
                "_tlsserver.py:191);_ssl__SSLSocket_read (_ssl.c:2) 2",
                "main (server.py:1);_run_once (asyncio/base_events.py:1922);"
                "EpollSelector.select (selectors.py:468) 50",
                "worker (concurrent/futures/thread.py:81);wait (threading.py:1) 40",
            ]
        )
        + "\n"
    )
    s = where.summarise(raw)
    assert s["busy_samples"] == 12 and s["idle_samples"] == 50
    shares = s["inclusive_pct"]
    assert isinstance(shares, dict)
    assert shares["OpenSSL handshake (do_handshake)"] == 50.0
    assert shares["asyncio SSL protocol and below"] == 50.0
    assert shares["h11 (HTTP parsing and writing)"] == 25.0
    assert shares["TLS record read (SSL_read)"] == shares["direct TLS transport and below"]
    # Three samples end in a library frame; only one of them in its own Python code.
    assert s["library_innermost_pct"] == 25.0
    assert round(s["library_own_pct"], 2) == round(100 / 12, 2)  # type: ignore[call-overload]
    text = where.render("conn", s, 123.0)
    assert "50.0 %  OpenSSL handshake" in text and "123 req/s" in text
