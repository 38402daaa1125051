"""The rendezvous service: a torch.distributed TCPStore that every role finds by host:port.

Several experiments may share one metaserver: each keeps its keys under its own
prefix (transport.namespace). It binds to loopback unless told otherwise.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch.distributed as dist

from fedshard.core.files import write_atomic

log = logging.getLogger(__name__)


def serve(host: str = "127.0.0.1", port: int = 0, address_file: str | None = None) -> None:
    """Listen until SIGTERM/SIGINT; port 0 lets the OS choose. The address goes to the log
    and, atomically, to `address_file` (how the launcher learns an OS-assigned port)."""
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, use_libuv=True)
    address = f"{host}:{store.port}"
    log.info(f"metaserver listening on {address}")
    if address_file:
        write_atomic(address_file, address.encode())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("metaserver stopped")
