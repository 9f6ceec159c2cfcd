"""Routes: the page, ``/api/compare``, ``/api/variants`` and ``/healthz``."""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from leanvgg.images import ImageError, ImageTooLarge, UnsupportedFormat
from leanvgg.service import Busy, ComparisonService, NotReady

log = logging.getLogger(__name__)
bp = Blueprint("leanvgg", __name__)

# The page loads only its own files; nothing external, nothing inline.
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _service() -> ComparisonService:
    return current_app.extensions["leanvgg"]


def _error(message: str, status: int):
    return jsonify(error=message), status


@bp.after_app_request
def _secure(response):
    response.headers.update(_SECURITY_HEADERS)
    return response


@bp.app_errorhandler(HTTPException)
def _http_error(err: HTTPException):
    if err.code == 413:
        limit = _service().limits.max_bytes / 2**20
        return _error(f"The upload is too large: the limit is {limit:g} MB.", 413)
    return _error(err.description or err.name, err.code or 500)


@bp.app_errorhandler(Exception)
def _unexpected(err: Exception):
    log.exception("Unhandled error")  # the details go to the log, never to the client
    return _error("Internal error; the server log has the details.", 500)


@bp.get("/")
def index():
    return render_template("index.html")


@bp.get("/healthz")
def healthz():
    status = _service().status()
    return jsonify(status), 200 if status["status"] == "ready" else 503


@bp.get("/api/variants")
def variants():
    try:
        variant_set = _service().variant_set()
    except NotReady as err:
        return _error(str(err), 503)
    baseline = variant_set.baseline
    return jsonify(weights=baseline.weights, predictions_meaningful=baseline.meaningful,
                   note=baseline.note,
                   variants=[v.summary() for v in variant_set.variants.values()])


@bp.get("/api/tune")
def tune_front():
    """The latest ``leanvgg tune`` search: every candidate, the Pareto front and the choice.

    No search yet is a normal state of the page, not an error: ``search`` is then null.
    """
    report = _service().tune_report()
    if report is None:
        return jsonify(search=None,
                       message="No search yet: run 'leanvgg tune --max-drop 1.0 …' to make one.")
    return jsonify(search=report)


@bp.post("/api/compare")
def compare():
    if request.mimetype != "multipart/form-data":
        return _error("Send the image as multipart/form-data in a field named 'image'.", 415)
    files = request.files.getlist("image")
    if len(files) != 1:
        return _error(f"Expected exactly one file in the field 'image', got {len(files)}.", 400)
    try:
        result = _service().compare(files[0].read())
    except ImageTooLarge as err:
        return _error(str(err), 413)
    except UnsupportedFormat as err:
        return _error(str(err), 415)
    except ImageError as err:
        return _error(str(err), 400)
    except (NotReady, Busy) as err:
        return _error(str(err), 503)
    return jsonify(result.to_dict())
