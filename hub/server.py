"""Running the hub under uvicorn."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import uvicorn
from alembic.util.exc import CommandError as AlembicError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from agent.connection import shown_url
from hub.app import Hub, create_app, start_hub
from hub.broker import BrokerStartError
from hub.config import HubSettings

__all__ = ["serve", "bind_socket", "HubStartError"]


class HubStartError(Exception):
    """Something the hub needs kept it from starting; the message says what."""

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

    The hub starts before the web server, so that what keeps it from starting is one
    error here, not a traceback from inside the server's start-up.

    Raises:
        OSError: the API address cannot be bound.
        HubStartError: the database, the embedded broker, the key passphrase or the data
            folder kept the hub from starting; the message says which and why.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        db_url = make_url(settings.database_url)
        _ = db_url.port  # parsed only when asked
    except Exception as e:  # its text may quote the password (a ':' or '@' in it): not shown
        raise HubStartError(f"cannot use the database {shown_url(settings.database_url)!r}: not a database "
                            "URL (dialect+driver://user:password@host:port/name; percent-encode '@', ':' "
                            "and '/' in a password)") from e
    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    url = f"http://{settings.host}:{port}"
    try:
        hub = start_hub(settings)
    except (SQLAlchemyError, AlembicError, ImportError) as e:
        # A URL of no known dialect (ArgumentError), a server that refuses us, a schema
        # from a newer hub (alembic's CommandError), a database driver not installed.
        sock.close()
        first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, AlembicError):
            first += " (its schema is from a version of the hub this one does not know: a newer one?)"
        shown = db_url.render_as_string(hide_password=True)
        raise HubStartError(f"cannot use the database {shown}: {first}") from e
    except BrokerStartError as e:
        sock.close()
        raise HubStartError(f"cannot start the embedded MQTT broker on {settings.embedded_broker_host}:"
                            f"{settings.embedded_broker_port}: {e}") from e
    except (ValueError, OSError) as e:
        sock.close()
        raise HubStartError(str(e)) from e
    app = create_app(settings, on_ready=(lambda hub: on_ready(hub, url)) if on_ready else None, started=hub)
    config = uvicorn.Config(app, log_level=log_level, log_config=None, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
