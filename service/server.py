"""Running the app: start-up checks, then uvicorn with connection limits and timeouts.

uvicorn holds a connection that never finishes its request headers for as long as the client
likes (its keep-alive timer is reset by every byte and is not armed before the first request),
so a few hundred silent sockets can pin the server. :class:`HeaderTimeoutH11Protocol` closes a
connection whose request headers are not complete ``OAML_HEADER_TIMEOUT`` seconds after it opened
(or after its previous response). ``OAML_LIMIT_CONCURRENCY`` caps connections and requests in
flight (503 beyond it), ``OAML_KEEP_ALIVE_TIMEOUT`` closes idle keep-alive connections, and the
``server`` banner is off. Behind a proxy, set the proxy's own header and body timeouts as well.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.h11_impl import H11Protocol

from model.card import WeightsCard
from model.checkpoint import read_metadata
from model.errors import OAMLError
from service.app import create_app
from service.config import Settings, invalid_settings
from service.errors import GalleryVersionError
from service.state import open_store

__all__ = ["HeaderTimeoutH11Protocol", "preflight", "serve"]

logger = logging.getLogger(__name__)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that are too slow to send their request headers."""

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _disarm(self) -> None:
        timer = self._header_timer
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # the headers are in: the request is being served

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _header_timeout_expired(self) -> None:
        self._header_timer = None
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            logger.debug("closing a connection that sent no complete request headers in %.1f s", self.header_timeout)
            self.transport.close()


def preflight(settings: Settings) -> None:
    """Check what start-up needs before binding the port; raises :class:`OAMLError` with one clear sentence."""
    try:
        card = WeightsCard.from_metadata(read_metadata(settings.weights))
    except OSError as exc:
        raise OAMLError(f"cannot read the weights {settings.weights}: {exc.strerror or exc}") from exc
    store = open_store(settings, card.model_version)  # a store that cannot be written is served read-only
    try:
        shelf = {card.model_version}
        folder = settings.weights_dir or settings.weights.resolve().parent
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            try:
                shelf.add(str(read_metadata(path)["model_version"]))
            except (OAMLError, KeyError, ValueError):
                continue
        for record in store.collections():
            if record.model_version and record.model_version not in shelf:
                raise GalleryVersionError(
                    f"collection {record.name!r} is matched with model {record.model_version}, whose weights are "
                    "not in OAML_WEIGHTS_DIR: put them there, or serve a gallery without that collection",
                    internal=f"looked in {folder}",
                )
    finally:
        store.close()


def serve(settings: Settings) -> int:
    """Run the service until interrupted; a failed start-up check exits with status 2 and one log line."""
    try:
        preflight(settings)
    except OAMLError as exc:
        logging.getLogger("oaml").error("cannot start: %s", exc.full)
        return 2
    protocol = type("OAMLH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": settings.header_timeout})
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        workers=1,
        http=protocol,
        server_header=False,
        timeout_keep_alive=settings.keep_alive_timeout,
        limit_concurrency=settings.limit_concurrency,
    )
    uvicorn.Server(config).run()
    return 0


def main() -> int:
    """``python -m service.server``: serve with settings from the environment (invalid ones named, never echoed)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
    except ValidationError as exc:
        logging.getLogger("oaml").error("cannot start: invalid settings: %s", invalid_settings(exc))
        return 2
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
