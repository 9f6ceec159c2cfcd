"""One versioned report schema for every measurement leanvgg writes.

``compare --json`` and ``--output``, the JSON API's ``/api/compare``, ``tune``'s report and every
benchmark's JSON are one shape, modelled on optimum-benchmark's reports and OpenVINO's
``benchmark_app``: what was measured (``kind``, ``config``), on what (``machine``: CPU model,
kernel flags, PyTorch's CPU capability, threads, library versions), and one row per measured
thing in ``results``. A row's latency (``latency_ms``) carries count, mean, stdev, min, median,
p10, p90, p99, max and the raw samples; a throughput measurement (``throughput``) says its
batch size and images per second. Readers check ``schema_version``; ``JSON_SCHEMA`` is the
contract as JSON Schema (draft 2020-12), validated in the tests for each producer.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from leanvgg.machine import machine_facts
from leanvgg.measure import Latency
from leanvgg.files import write_atomic

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Throughput:
    """The offline scenario: batches of ``batch_size`` images, timed per batch."""

    batch_size: int
    images_per_s: float  # batch_size / median seconds per batch
    latency_ms: Latency  # per batch

    @classmethod
    def of(cls, batch_size: int, latency: Latency) -> Throughput:
        return cls(batch_size, batch_size / (latency.median / 1e3), latency)

    def to_dict(self) -> dict:
        return {**asdict(self), "latency_ms": self.latency_ms.to_dict()}


def document(kind: str, results: list[dict], *, config: dict, threads: int,
             **extra) -> dict:
    """A report: ``kind`` says who made it (``compare``, ``tune``, ``benchmark/<name>``)."""
    return {"schema_version": SCHEMA_VERSION, "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine_facts(threads), "config": config, **extra,
            "results": results}


class SchemaError(ValueError):
    """A report does not follow the schema; the message says where."""


def validate(report: dict) -> None:
    """Raise SchemaError unless ``report`` (as JSON would hold it) follows ``JSON_SCHEMA``."""
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(JSON_SCHEMA).iter_errors(
        json.loads(json.dumps(report))), key=lambda e: list(e.absolute_path))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(top level)"
        raise SchemaError(f"Invalid report at {where}: {errors[0].message}")


def write(path: Path, report: dict) -> None:
    """Validate ``report`` and write it to ``path`` atomically (a reader sees the old file or
    the new one, never half of one)."""
    validate(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(report, indent=2) + "\n").encode())


_NUMBER = {"type": "number"}
_LATENCY = {
    "type": "object",
    "required": ["count", "mean", "stdev", "min", "median", "p90", "p99", "max", "samples"],
    "properties": {
        "count": {"type": "integer", "minimum": 1},
        **{k: _NUMBER for k in ("mean", "stdev", "min", "median", "p10", "p90", "p99", "max")},
        "samples": {"type": "array", "items": _NUMBER},
    },
}
JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "leanvgg report",
    "type": "object",
    "required": ["schema_version", "kind", "created", "machine", "config", "results"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "kind": {"type": "string", "pattern": "^(compare|tune|benchmark/[a-z0-9_]+)$"},
        "created": {"type": "string"},
        "machine": {
            "type": "object",
            "required": ["cpu", "flags", "capability", "logical_cpus", "threads", "versions"],
            "properties": {
                "cpu": {"type": "string"},
                "flags": {"type": "array", "items": {"type": "string"}},
                "capability": {"type": "string"},
                "logical_cpus": {"type": ["integer", "null"]},
                "threads": {"type": "integer", "minimum": 1},
                "versions": {"type": "object", "required": ["torch"],
                             "additionalProperties": {"type": ["string", "null"]}},
            },
        },
        "config": {"type": "object"},
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "latency_ms": _LATENCY,
                    "speedup": {"type": ["number", "null"]},  # null: no like figure to divide
                    "context": {"type": "object", "required": ["runtime", "threads", "batch"],
                                "properties": {"runtime": {"type": "string"},
                                               "threads": {"type": "integer", "minimum": 1},
                                               "batch": {"type": "integer", "minimum": 1}}},
                    "throughput": {  # null: not measured (batch 1 only)
                        "type": ["object", "null"],
                        "required": ["batch_size", "images_per_s", "latency_ms"],
                        "properties": {"batch_size": {"type": "integer", "minimum": 1},
                                       "images_per_s": _NUMBER, "latency_ms": _LATENCY},
                    },
                },
            },
        },
    },
}
