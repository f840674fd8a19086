"""Running the hub under uvicorn."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import uvicorn

from hub.app import Hub, create_app
from hub.config import HubSettings

__all__ = ["serve", "bind_socket"]

_QUIET = ("amqtt", "transitions", "uvicorn.access", "httpx")


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the API socket up front so that port 0 resolves before we announce it.

    Raises:
        OSError: the address is taken or not ours.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    settings: HubSettings,
    *,
    on_ready: Callable[[Hub, str], None] | None = None,
    log_level: str = "info",
) -> None:
    """Serve the hub until interrupted. ``on_ready(hub, api_url)`` runs once it is up.

    Raises:
        OSError: the API address cannot be bound.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    url = f"http://{settings.host}:{port}"
    app = create_app(settings, on_ready=(lambda hub: on_ready(hub, url)) if on_ready else None)
    config = uvicorn.Config(app, log_level=log_level, log_config=None, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
