"""``--enable-ssl-refresh``: the HTTP port's new connections get the certificate on disk now, not
the one the server started with, as Kubernetes rotates a Secret's files under a running pod.

The files are polled (two ``stat`` calls every ``REFRESH_INTERVAL_S``) from a task in uvicorn's
event loop, the thread that also runs every TLS handshake: OpenSSL does not allow changing an
``SSL_CTX`` while another thread makes connections from it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile

import uvicorn

log = logging.getLogger("stepserve.server")

REFRESH_INTERVAL_S = 2.0


class CertRefresher:
    """Loads the key and certificate into ``context`` again whenever either file changes."""

    def __init__(self, context: ssl.SSLContext, certfile: str, keyfile: str) -> None:
        self.context = context
        self.certfile = certfile
        self.keyfile = keyfile
        self._seen = self._stamp()

    def _stamp(self) -> tuple:
        """What identifies the files' current content: a replaced file (Kubernetes swaps a
        Secret's files by a symlink) has a new inode, an edited one a new mtime or size."""
        stamp = []
        for path in (self.certfile, self.keyfile):
            try:
                st = os.stat(path)
            except OSError:
                stamp.append(None)
                continue
            stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def check(self) -> bool:
        """Reload if the files changed; True when it did. A pair that does not load (one file
        written, the other not yet) keeps the old certificate and is tried again next time."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        try:
            self._load()
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS files changed but do not load yet, keeping the old certificate: %s", exc)
            return False
        self._seen = stamp
        log.info("reloaded the TLS certificate from %s", self.certfile)
        return True

    def _load(self) -> None:
        """Load a copy of the pair into a scratch context first: OpenSSL replaces the certificate
        before it checks the key, so a pair that fails would leave the server's context with
        none. The copy (in a private directory) is what both loads read, in case the files
        change between them."""
        with tempfile.TemporaryDirectory(prefix="stepserve-tls-") as folder:
            certfile, keyfile = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
            for source, copy in ((self.certfile, certfile), (self.keyfile, keyfile)):
                with open(source, "rb") as src, open(copy, "wb") as dst:
                    dst.write(src.read())
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile)
            self.context.load_cert_chain(certfile, keyfile)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL_S)
            self.check()


class RefreshingServer(uvicorn.Server):
    """uvicorn's server, watching its TLS files once it listens (``config.ssl`` exists by then)."""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        config = self.config
        refresher = CertRefresher(config.ssl, config.ssl_certfile, config.ssl_keyfile)
        # Kept on self so the task is not collected; asyncio.run cancels it at the end.
        self._refresh_task = asyncio.get_running_loop().create_task(refresher.watch())
