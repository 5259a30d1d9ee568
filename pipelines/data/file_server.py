"""A static file server on 127.0.0.1 (a thread in this process), to serve a generated dataset to the download
stage like any web host. Loopback only: it refuses to bind anything else."""
from __future__ import annotations

import contextlib
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

from pipelines.runtime import LOOPBACK


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client that hangs up (timeouts) is not an error
        pass


@contextlib.contextmanager
def serve_directory(root: str | Path, host: str = LOOPBACK, port: int = 0,
                    handler: type[SimpleHTTPRequestHandler] = QuietHandler) -> Iterator[str]:
    """Serve ``root`` over HTTP while the context is open; yields the base URL (``http://127.0.0.1:PORT``)."""
    if not host.startswith("127.") and host != "localhost":
        raise ValueError(f"serve_directory binds loopback only, got host {host!r}")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"serve_directory: {root} is not a folder")
    server = _Server((host, port), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, name="pgseg-file-server", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
