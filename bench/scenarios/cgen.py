"""The C load generator (``bench/cgen/loadgen.c``): building it and the key material it reads.

:func:`build` compiles it once per source version (``cc``, libssl headers) into a
temporary directory. :class:`KeyFds` holds the "web" leaf, its key and the roots in
memfds, which the generator opens as ``/proc/self/fd/N`` (inherited with ``pass_fds``):
the key never reaches a disk file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import Pem

SOURCE = Path(__file__).resolve().parent.parent / "cgen" / "loadgen.c"


def build(dest: Path | None = None) -> Path | str:
    """The generator's executable, or why it cannot be built."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler (apt-get install gcc)"
    if not Path("/usr/include/openssl/ssl.h").exists():
        return "no OpenSSL headers (apt-get install libssl-dev)"
    source = SOURCE.read_bytes()
    where = dest or Path(tempfile.gettempdir()) / "cc-bench-cgen"
    exe = where / f"loadgen-{hashlib.sha256(source).hexdigest()[:12]}"
    if exe.exists():
        return exe
    where.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_suffix(f".{os.getpid()}")
    done = subprocess.run([cc, "-O2", "-pthread", "-o", str(tmp), str(SOURCE), "-lssl",
                           "-lcrypto"], capture_output=True, timeout=120, check=False)
    if done.returncode != 0:
        return f"cannot build the C load generator: {done.stderr.decode()[-400:]}"
    os.replace(tmp, exe)
    return exe


class KeyFds:
    """A leaf, its key and the roots in memfds, for ``--cert/--key/--ca``."""

    def __init__(self, pem: Pem) -> None:
        self._fds: dict[str, int] = {}
        for flag, text in (("--cert", pem.cert), ("--key", pem.key), ("--ca", pem.roots)):
            fd = os.memfd_create(f"cc-bench{flag}", 0)  # inheritable: no MFD_CLOEXEC
            os.write(fd, text.encode())
            self._fds[flag] = fd

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(self._fds.values())

    def args(self) -> list[str]:
        return [x for flag, fd in self._fds.items() for x in (flag, f"/proc/self/fd/{fd}")]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
