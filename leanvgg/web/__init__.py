"""The dashboard and JSON API: a Flask application factory over a ``ComparisonService``."""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import IO

from flask import Flask, Request
from waitress.server import create_server

from leanvgg.service import ComparisonService
from leanvgg.web.views import bp

ENVELOPE = 64 * 1024  # room for the multipart headers and boundaries around the image
# The names the server answers to on loopback; anything else in Host is refused (400), which
# closes DNS rebinding (a hostile name resolving to 127.0.0.1).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


class InMemoryRequest(Request):
    """Keeps the uploaded part in memory: the request bound caps it, and it never touches disk
    (Werkzeug's default spools parts over 500 KB to a temporary file)."""

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None,
                         content_length: int | None = None) -> IO[bytes]:
        return io.BytesIO()


def request_bound(service: ComparisonService) -> int:
    """The largest request body accepted: one image at the upload limit plus its envelope."""
    return service.limits.max_bytes + ENVELOPE


def allowed_hosts(host: str, extra: Iterable[str] = ()) -> list[str]:
    """The Host names a server bound to ``host`` answers to: loopback, ``host``, ``extra``."""
    names = [*LOOPBACK_HOSTS, *extra]
    if host not in ("0.0.0.0", ""):
        names.append(host)
    return list(dict.fromkeys(names))


def create_app(service: ComparisonService, test_config: dict | None = None) -> Flask:
    """Build the app over ``service`` (started or not: the page answers while it warms up).

    ``TRUSTED_HOSTS`` (default: loopback) lists the Host names answered; the request-size bounds
    follow the service's upload limit.
    """
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config.from_mapping(
        TRUSTED_HOSTS=list(LOOPBACK_HOSTS),
        MAX_FORM_PARTS=8,
    )
    if test_config:
        app.config.update(test_config)
    # Requests above the image limit (plus the multipart envelope) get a 413: from waitress
    # before the body is read (see cli's serve), from Flask under other WSGI servers. Werkzeug
    # applies the form-memory bound to the uploaded part too, so it must admit a whole image.
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_FORM_MEMORY_SIZE"] = request_bound(service)
    app.extensions["leanvgg"] = service
    app.register_blueprint(bp)
    return app


def make_server(service: ComparisonService, *, host: str = "127.0.0.1", port: int = 8000,
                allowed: Iterable[str] = (), threads: int | None = None):
    """The app on waitress, bound at once (a taken port raises OSError here, before any
    warm-up). Limits sit at the front door: waitress refuses a body above the request bound
    from its Content-Length, unread, and Host names outside ``allowed_hosts`` get 400.
    """
    app = create_app(service, {"TRUSTED_HOSTS": allowed_hosts(host, allowed)})
    # Enough threads for every admitted comparison to wait for the measurement slot while a
    # few more still answer bad uploads, health checks and the page at once.
    # channel_request_lookahead lets a request see that its client has gone
    # (``waitress.client_disconnected``), so an abandoned comparison is never measured.
    return create_server(app, host=host, port=port,
                         threads=threads or service.max_queue + 4,
                         max_request_body_size=request_bound(service),
                         channel_request_lookahead=1)
