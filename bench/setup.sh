#!/bin/sh
# Installs what the benchmark needs and is missing: Debian's nginx (with the stream
# module, for the L4 sidecar pair), a C compiler and libssl headers (the two-host
# view's C load generator), matplotlib (plots), pyinstrument and py-spy (profiles), uvloop,
# httptools, and this project.
# Idempotent; safe to run again. Needs root (or sudo) for apt-get.
set -eu

SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo"
fi

have_stream_module() {
    ls /usr/lib/nginx/modules/ngx_stream_module.so >/dev/null 2>&1
}

if ! command -v nginx >/dev/null 2>&1 || ! have_stream_module; then
    $SUDO apt-get update
    # nginx-light is the smallest Debian build; the stream module is packaged apart.
    if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends \
            nginx-light libnginx-mod-stream; then
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends \
            nginx libnginx-mod-stream
    fi
    # The package starts a system nginx on port 80; the benchmark runs its own.
    $SUDO systemctl stop nginx 2>/dev/null || $SUDO service nginx stop 2>/dev/null || true
fi

if ! command -v cc >/dev/null 2>&1 || [ ! -f /usr/include/openssl/ssl.h ]; then
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends \
        gcc libc6-dev libssl-dev
fi

PY="${PYTHON:-python3}"
"$PY" -c "import matplotlib" 2>/dev/null || "$PY" -m pip install --quiet matplotlib
"$PY" -c "import pyinstrument" 2>/dev/null || "$PY" -m pip install --quiet pyinstrument
# Optional: bench/where.py (py-spy's view of the native server) is skipped without it.
command -v py-spy >/dev/null 2>&1 || "$PY" -m pip install --quiet py-spy || true
# Optional: the uvloop scenarios are skipped without it.
"$PY" -c "import uvloop" 2>/dev/null || "$PY" -m pip install --quiet uvloop || true
# Optional: uvicorn's httptools parser (--http httptools).
"$PY" -c "import httptools" 2>/dev/null || "$PY" -m pip install --quiet httptools || true
"$PY" -c "import consul_connect" 2>/dev/null || "$PY" -m pip install --quiet -e "$(dirname "$0")/.."

nginx -v
"$PY" -c "import matplotlib, pyinstrument; print('matplotlib', matplotlib.__version__, 'pyinstrument', pyinstrument.__version__)"
