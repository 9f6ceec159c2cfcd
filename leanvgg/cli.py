"""The ``leanvgg`` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from leanvgg.compare import ComparisonResult, Settings, compare
from leanvgg.images import ImageError, decode, read_file
from leanvgg.models import WEIGHTS_CHOICES, WeightsError, load_baseline
from leanvgg.recipes import RECIPES
from leanvgg.store import Store
from leanvgg.variants import build_variants, resolve_names

log = logging.getLogger("leanvgg")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _variant_list(text: str) -> list[str]:
    try:
        return resolve_names(n.strip() for n in text.split(",") if n.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leanvgg",
        description="Build compressed VGG-19 variants and measure them side by side on this CPU.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log build steps")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    weights = argparse.ArgumentParser(add_help=False)
    weights.add_argument(
        "--weights", default="auto", metavar="W",
        help=f"{' | '.join(WEIGHTS_CHOICES)} | PATH to a VGG-19 state dict (default: auto = "
             "ImageNet when cached or downloadable, otherwise seeded random weights)")
    weights.add_argument(
        "--variants", type=_variant_list, default=None, metavar="A,B",
        help=f"comma-separated subset of {', '.join(RECIPES)} (default: all)")

    timing = argparse.ArgumentParser(add_help=False)
    timing.add_argument("--runs", type=_positive, default=10, help="timed runs (default 10)")
    timing.add_argument("--warmup", type=_non_negative, default=2,
                        help="untimed warm-up runs (default 2)")
    timing.add_argument("--threads", type=_positive, default=None,
                        help="PyTorch intra-op threads (default: PyTorch's default)")

    cmp = commands.add_parser(
        "compare", parents=[weights, timing], help="measure every variant on one image",
        description="Measure size, parameters, MACs, latency, speedup and top-3 predictions of "
                    "every variant on IMAGE, one variant after another.")
    cmp.add_argument("image", metavar="IMAGE", help="JPEG, PNG, WebP, BMP, GIF or TIFF file")
    cmp.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    commands.add_parser("build", parents=[weights], help="build and cache the variants",
                        description="Build every variant missing from the cache "
                                    "($LEANVGG_HOME, default ~/.cache/leanvgg).")

    srv = commands.add_parser(
        "serve", parents=[weights, timing], help="run the dashboard and JSON API",
        description="Serve the dashboard on a production WSGI server (waitress). The variants "
                    "load in the background; until then the page says 'warming up'.")
    srv.add_argument("--host", default="127.0.0.1",
                     help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    srv.add_argument("--port", type=_positive, default=8000, help="TCP port (default 8000)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    verbose = args.verbose or args.command == "serve"  # a server's log is its progress report
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose
                        else "%(levelname)s %(name)s: %(message)s")
    commands = {"compare": _compare, "build": _build, "serve": _serve}
    try:
        return commands[args.command](args)
    except (ImageError, WeightsError) as err:
        print(f"leanvgg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanvgg: interrupted", file=sys.stderr)
        return 130


def _compare(args: argparse.Namespace) -> int:
    image = decode(read_file(args.image))  # fail on a bad image before any model work
    variant_set = build_variants(load_baseline(args.weights), _with_baseline(args.variants),
                                 store=Store())
    result = compare(image, variant_set,
                     Settings(runs=args.runs, warmup=args.warmup, threads=args.threads),
                     progress=True)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return 0


def _with_baseline(names: list[str] | None) -> list[str] | None:
    return None if names is None else ["baseline", *names]  # speedups are relative to it


def _build(args: argparse.Namespace) -> int:
    variant_set = build_variants(load_baseline(args.weights), args.variants, store=Store())
    for variant in variant_set.variants.values():
        print(f"{variant.name:<17} {variant.facts['size_bytes'] / 2**20:8.1f} MB  "
              f"{variant.facts['params']:>12,} params")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from waitress import serve

    from leanvgg.web import create_app

    app = create_app({"LEANVGG_WEIGHTS": args.weights,
                      "LEANVGG_VARIANTS": _with_baseline(args.variants),
                      "LEANVGG_RUNS": args.runs, "LEANVGG_WARMUP": args.warmup,
                      "LEANVGG_THREADS": args.threads})
    log.info("Dashboard on http://%s:%d/ (variants loading in the background)",
             args.host, args.port)
    serve(app, host=args.host, port=args.port, threads=4)
    return 0


def format_table(result: ComparisonResult) -> str:
    """A fixed-width table of a comparison, with where its figures come from."""
    header = (f"{'variant':<17}{'input':>6}{'size MB':>9}{'params':>13}{'GMACs':>7}"
              f"{'median ms':>11}{'p90 ms':>9}{'speedup':>9}  top-3")
    lines = [header, "-" * len(header)]
    for v in result.variants:
        top3 = ", ".join(f"{p.label} {p.prob:.1%}" for p in v.top3)
        lines.append(
            f"{v.name:<17}{v.input_size:>6}{v.size_mb:>9.1f}{v.params:>13,}{v.macs / 1e9:>7.2f}"
            f"{v.latency_ms.median:>11.1f}{v.latency_ms.p90:>9.1f}{v.speedup:>8.2f}×  {top3}")
    m = result.machine
    not_tuned = [v.name for v in result.variants if v.fine_tuned is False]
    lines += [
        "",
        f"{result.note}",
        f"{result.runs} timed runs after {result.warmup} warm-up, {result.threads} threads, "
        f"{m['cpu']}, torch {m['torch']}",
    ]
    if not_tuned:
        lines.append(f"not fine-tuned: {', '.join(not_tuned)}")
    return "\n".join(lines)
