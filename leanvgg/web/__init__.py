"""The dashboard and JSON API: a Flask application factory over ``ComparisonService``."""

from __future__ import annotations

from flask import Flask

from leanvgg.compare import Settings
from leanvgg.images import DEFAULT_LIMITS, ImageLimits
from leanvgg.service import ComparisonService
from leanvgg.web.views import bp

_ENVELOPE = 64 * 1024  # room for the multipart headers and boundaries around the image


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app; ``LEANVGG_SERVICE`` may be given ready-made (tests), else one is started.

    ``LEANVGG_LIMITS`` (an ``ImageLimits``) bounds uploads; the request-size bounds follow it.
    """
    app = Flask(__name__)
    app.config.from_mapping(
        LEANVGG_WEIGHTS="auto",
        LEANVGG_VARIANTS=None,  # None: every registered variant
        LEANVGG_RUNS=10,
        LEANVGG_WARMUP=2,
        LEANVGG_THREADS=None,
        LEANVGG_SERVICE=None,
        LEANVGG_LIMITS=DEFAULT_LIMITS,
        LEANVGG_CALIBRATION=None,  # a folder of images for static INT8; None: bundled photos
        MAX_FORM_PARTS=8,
    )
    if test_config:
        app.config.update(test_config)
    service = app.config["LEANVGG_SERVICE"]
    if service is None:
        service = ComparisonService(
            weights=app.config["LEANVGG_WEIGHTS"], names=app.config["LEANVGG_VARIANTS"],
            settings=Settings(runs=app.config["LEANVGG_RUNS"], warmup=app.config["LEANVGG_WARMUP"],
                              threads=app.config["LEANVGG_THREADS"]),
            limits=app.config["LEANVGG_LIMITS"], calibration=app.config["LEANVGG_CALIBRATION"])
        service.start()
    # Requests above the image limit (plus the multipart envelope) get a 413 before their body
    # is read in full. Behind waitress, Werkzeug applies the form-memory bound to the uploaded
    # file part too, so it must admit a whole image.
    bound = service.limits.max_bytes + _ENVELOPE
    app.config["MAX_CONTENT_LENGTH"] = bound
    app.config["MAX_FORM_MEMORY_SIZE"] = bound
    app.extensions["leanvgg"] = service
    app.register_blueprint(bp)
    return app
