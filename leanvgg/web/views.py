"""Routes: the page, ``/api/compare`` (whole or streamed), ``/api/variants``, ``/api/tune``
and ``/healthz``."""

from __future__ import annotations

import json
import logging
import re
from urllib.parse import urlsplit

from flask import (Blueprint, Response, current_app, jsonify, render_template, request,
                   stream_with_context)
from werkzeug.exceptions import BadRequest, HTTPException

from leanvgg.images import ImageError, ImageTooLarge, UnsupportedFormat
from leanvgg.service import Abandoned, Busy, ComparisonService, NotReady, ReportError

log = logging.getLogger(__name__)
bp = Blueprint("leanvgg", __name__)
MAX_RUNS = 100  # ?runs=N: timed passes per variant in one request
MAX_BATCH = 16  # ?batch=N: images per batch of the throughput scenario (memory grows with N)
_COUNT = re.compile(r"[0-9]{1,6}")

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


@bp.before_app_request
def _same_origin_writes_only():
    """Refuse POSTs that a browser says come from another site (another page the user has
    open must not make this server compute); clients that send neither header (curl,
    scripts) are not browsers and pass."""
    if request.method != "POST":
        return None
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if site not in (None, "same-origin", "none") or (
            origin is not None and urlsplit(origin).netloc != request.host):
        return _error("Cross-site requests are refused: upload from this server's own page "
                      "or from a client that is not a browser.", 403)
    return None


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
    """200 while comparisons can be served (``ready``, or ``degraded``/``warming up`` with the
    baseline ready), else 503; each variant's state either way."""
    status = _service().status()
    return jsonify(status), 200 if status["serving"] else 503


@bp.get("/api/variants")
def variants():
    """Every variant's state (queued, building, compiling, ready, failed with its reason) and,
    once ready, its facts and latency profile. Answers at once, from the first second."""
    service = _service()
    status = service.status()
    ready = {}
    try:
        variant_set = service.variant_set()
        ready = variant_set.variants
    except NotReady:
        pass
    profiles = service.profiles(ready)
    rows = []
    for state in service.variant_statuses():
        row = {"name": state.name, "state": state.state, "settled": state.state.settled,
               "reason": state.reason}
        if state.name in ready:
            profile = profiles.get(state.name)
            row.update(ready[state.name].summary().to_dict(),
                       profile=profile.to_dict() if profile else None)
        rows.append(row)
    return jsonify(status=status["status"], error=status.get("error"), **service.weights_info(),
                   builder_process=status.get("builder_process", False),
                   pending_choice=status.get("pending_choice", []), variants=rows)


@bp.get("/api/tune")
def tune_front():
    """The latest ``leanvgg tune`` search: every candidate, the Pareto front and the choice.

    No search yet is a normal state of the page, not an error: ``search`` is then null.
    """
    try:
        report = _service().tune_report()
    except ReportError as err:
        return jsonify(search=None, message=str(err))
    if report is None:
        return jsonify(search=None,
                       message="No search yet: run 'leanvgg tune --max-drop 1.0 …' to make one.")
    return jsonify(search=report)


def _upload() -> bytes | tuple:
    if request.mimetype != "multipart/form-data":
        return _error("Send the image as multipart/form-data in a field named 'image'.", 415)
    files = request.files.getlist("image")
    if len(files) != 1:
        return _error(f"Expected exactly one file in the field 'image', got {len(files)}.", 400)
    return files[0].read()


def _count(name: str, maximum: int) -> int | None:
    """The query parameter ``name`` as an integer in 1..``maximum`` (None when absent)."""
    value = request.args.get(name)
    if value is None:
        return None
    # ASCII digits only, and few of them: str.isdigit() also admits '²' (which int() refuses)
    # and int() of thousands of digits is refused by Python itself
    if not _COUNT.fullmatch(value) or not 1 <= int(value) <= maximum:
        shown = value if len(value) <= 20 else value[:20] + "…"
        raise BadRequest(f"Invalid {name} {shown!r}: an integer in 1..{maximum}.")
    return int(value)


def _runs() -> int | None:
    """``?runs=N``: measure latency in this request (N passes) instead of the profiles."""
    return _count("runs", MAX_RUNS)


def _batch() -> int:
    """``?batch=N``: also measure throughput at batch N (the offline scenario)."""
    return _count("batch", MAX_BATCH) or 1


def _disconnected():
    """waitress's check of whether the client has gone (needs channel_request_lookahead)."""
    return request.environ.get("waitress.client_disconnected", lambda: False)


def _refusal(err: Exception):
    """The HTTP answer for what ``admit`` and ``measure`` raise, or None."""
    if isinstance(err, ImageTooLarge):
        return _error(str(err), 413)
    if isinstance(err, UnsupportedFormat):
        return _error(str(err), 415)
    if isinstance(err, ImageError):
        return _error(str(err), 400)
    if isinstance(err, Busy):
        response, status = _error(str(err), 503)
        response.headers["Retry-After"] = str(err.retry_after_s)
        return response, status
    if isinstance(err, NotReady):
        return _error(str(err), 503)
    return None


@bp.post("/api/compare")
def compare():
    """The whole comparison as one JSON object (the ``leanvgg compare --json`` object)."""
    data = _upload()
    if not isinstance(data, bytes):
        return data
    runs, batch = _runs(), _batch()
    try:
        result = _service().compare(data, runs=runs, batch_size=batch,
                                    disconnected=_disconnected())
    except Abandoned:
        log.info("Dropped a comparison whose client had gone.")
        return _error("The client went away.", 499)
    except (ImageError, NotReady, Busy) as err:
        return _refusal(err)
    return jsonify(result.to_dict())


@bp.post("/api/compare/stream")
def compare_stream():
    """The comparison as NDJSON: ``{"event": "row", "row": …}`` per variant as soon as it is
    computed, then ``{"event": "done", "result": …}`` (or ``{"event": "error", …}``).
    Bad uploads and a full queue are refused with a status code before anything streams."""
    data = _upload()
    if not isinstance(data, bytes):
        return data
    runs, batch = _runs(), _batch()
    service = _service()
    try:
        ticket = service.admit(data)
    except (ImageError, NotReady, Busy) as err:
        return _refusal(err)
    disconnected = _disconnected()

    def events():
        def line(document: dict) -> str:
            return json.dumps(document) + "\n"

        yield line({"event": "start", "variants": list(ticket.variant_set.variants),
                    "not_ready": ticket.not_ready})
        try:
            with service.measurement(ticket, runs=runs, batch_size=batch,
                                     disconnected=disconnected) as measured:
                for event, payload in measured:
                    if event == "row":
                        yield line({"event": "row", "row": payload.to_dict()})
                    else:
                        yield line({"event": "done", "result": payload.to_dict()})
        except Abandoned:
            log.info("Dropped a comparison whose client had gone.")
        except Busy as err:
            yield line({"event": "error", "status": 503, "error": str(err)})
        except Exception:  # the 200 is sent: end the stream with an event, not a cut
            log.exception("Comparison failed while streaming")
            yield line({"event": "error", "status": 500,
                        "error": "Internal error; the server log has the details."})

    response = Response(stream_with_context(events()), mimetype="application/x-ndjson",
                        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    response.call_on_close(ticket.release)  # also when the stream never started
    return response
