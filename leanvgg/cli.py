"""The ``leanvgg`` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.distributed
from tqdm.auto import tqdm

from leanvgg import cache
from leanvgg.compare import ComparisonResult, Settings, compare
from leanvgg.data import (DataUnavailable, cifar10, folder_classes, group_index_tensor,
                          stratified_subset)
from leanvgg.distributed import distributed_context
from leanvgg.evaluate import (Labelled, MappingError, cifar10_test, evaluate, image_folder,
                              labelled_folder, load_mapping, save_report, split)
from leanvgg.capabilities import FORMATS as EXPORT_FORMATS
from leanvgg.export import ExportError, export_each
from leanvgg.export import check as check_export
from leanvgg.interop import MissingRuntime
from leanvgg.portable import LoadError
from leanvgg.runtimes import AUTO, plan
from leanvgg.runtimes import CHOICES as RUNTIME_CHOICES
from leanvgg.schema import write as write_report
from leanvgg.images import DEFAULT_LIMITS, ImageError, decode, read_file
from leanvgg.labels import GENERIC, IMAGENET, Labels, LabelsError, attach, read_labels, remember
from leanvgg.builder import Builder, Variant, stored_baseline
from leanvgg.models import WEIGHTS_CHOICES, Baseline, WeightsError, load_baseline
from leanvgg.recipes import RECIPES, at_input_size, finetune_loss
from leanvgg.machine import native_bf16
from leanvgg.documents import SEARCH, SEARCH_PLOT, TUNED
from leanvgg.store import CacheError, Store
from leanvgg.tune import Space, search
from leanvgg.tune_report import format_front, plot_front, tuned_config
from leanvgg.variants import (NotTuned, VariantBuilder, build_in_stages, build_variants,
                              finetune_variant, register_tuned, resolve_names)

log = logging.getLogger("leanvgg")
# recipes with their own fine-tuning artifact (others share one of these)
FINETUNABLE = ("pruned", "turbo", "turbo_svd")

# One epoch over 500 images took about 11 minutes on the 2-core dev machine (0.73 images/s for
# the pruned VGG-19 at 224×224, batch 16): minutes, not hours.
DEFAULT_SUBSET = 500


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _float_list(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _word_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


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


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {value}")
    return value


def _folder(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing folder")
    return text


def _variant_list(text: str) -> list[str]:
    try:
        # `tuned` exists once `leanvgg tune` has chosen one; build_variants checks that
        return resolve_names((n.strip() for n in text.split(",") if n.strip()),
                             {**RECIPES, TUNED: None})
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _variant_name(text: str) -> str:
    return _variant_list(text)[0]


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line, like every other error of leanvgg (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


@dataclass(frozen=True)
class _Shared:
    """Argument groups several commands take (argparse parents)."""

    weights_only: argparse.ArgumentParser
    calibration: argparse.ArgumentParser
    weights: argparse.ArgumentParser
    runtime: argparse.ArgumentParser
    labelled: argparse.ArgumentParser
    threads: argparse.ArgumentParser
    timing: argparse.ArgumentParser


def get_args_parser() -> argparse.ArgumentParser:
    """The parser of every command; each command's own arguments are added by its
    ``_add_*`` function, which names the function that runs it."""
    parser = _Parser(
        prog="leanvgg",
        description="Build compressed variants of a VGG (ImageNet's VGG-19, or your own with its "
                    "labels) and measure them side by side on this CPU.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log build steps")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    weights_only = _Parser(add_help=False)
    weights_only.add_argument(
        "--weights", default="auto", metavar="W",
        help=f"{' | '.join(WEIGHTS_CHOICES)} | PATH to your own VGG's weights: any torchvision "
             "VGG (vgg11…vgg19, _bn), any class count, as a state dict, a checkpoint holding "
             "one, or .safetensors (default: auto = ImageNet VGG-19 when cached or "
             "downloadable, otherwise seeded random weights)")
    weights_only.add_argument(
        "--labels", metavar="FILE", default=None,
        help="the model's class names: one per line, or a JSON list, in output order "
             "(default: those last given for these weights, a labelled --data folder's "
             "sub-folder names, ImageNet's for 1,000 classes, else 'class 0' … 'class N-1')")
    weights_only.add_argument(
        "--input-size", type=_positive, default=224, metavar="PX",
        help="the input size the model was trained at (default 224); res160 and turbo160 "
             "run at 160/224 of it")
    calibration = _Parser(add_help=False)
    calibration.add_argument(
        "--calibration", metavar="DIR", default=None, type=_folder,
        help="images to calibrate static INT8 on (default: the photos shipped with leanvgg)")
    weights = _Parser(add_help=False, parents=[weights_only, calibration])
    weights.add_argument(
        "--variants", type=_variant_list, default=None, metavar="A,B",
        help=f"comma-separated subset of {', '.join(RECIPES)}, {TUNED} (default: all, bf16 "
             "only where the CPU computes in bf16, tuned once 'leanvgg tune' chose one)")

    runtime = _Parser(add_help=False)
    runtime.add_argument(
        "--runtime", choices=RUNTIME_CHOICES, default=AUTO,
        help="where compiled variants run (default auto: the fastest of inductor, onnxruntime "
             "and openvino on this machine, measured once and kept; without leanvgg[export] "
             "installed, inductor)")

    # A labelled set, as 'evaluate' and 'tune' read it (see _labelled).
    labelled = _Parser(add_help=False)
    labelled.add_argument(
        "--dataset", choices=("cifar10", "imagenet", "folder"), default=None,
        help="folder: a labelled image folder, one sub-folder per label named after the "
             "model's labels (the default for a model with its own classes; with --mapping, "
             "any folder mapped to ImageNet classes); cifar10: the test split mapped to "
             "ImageNet groups (the default for 1,000-class models); imagenet: a validation "
             "folder of the 1000 WordNet-id folders")
    labelled.add_argument(
        "--data", metavar="DIR", default=None,
        help="the data folder (for cifar10: holding cifar-10-batches-py/; default: download)")
    labelled.add_argument(
        "--mapping", metavar="FILE", default=None,
        help="JSON {folder name: [ImageNet class indices]} for --dataset folder")

    threads = _Parser(add_help=False)
    threads.add_argument("--threads", type=_positive, default=None,
                         help="threads every runtime runs on: PyTorch, the compiled packages "
                              "(made for that count), ONNX Runtime and OpenVINO sessions "
                              "(default: PyTorch's default)")
    timing = _Parser(add_help=False, parents=[threads])
    timing.add_argument("--runs", type=_positive, default=10, help="timed runs (default 10)")
    timing.add_argument("--warmup", type=_non_negative, default=2,
                        help="untimed warm-up runs (default 2)")

    shared = _Shared(weights_only=weights_only, calibration=calibration, weights=weights,
                     runtime=runtime, labelled=labelled, threads=threads, timing=timing)
    for add in (_add_compare, _add_build, _add_finetune, _add_tune, _add_evaluate,
                _add_export, _add_cache, _add_serve):
        add(commands, shared)
    return parser


def _add_compare(commands, shared: _Shared) -> None:
    cmp = commands.add_parser(
        "compare", parents=[shared.weights, shared.timing, shared.runtime],
        help="measure every variant on one image",
        description="Measure size, parameters, MACs, latency, speedup and top-3 predictions of "
                    "every variant on IMAGE, one variant after another.")
    cmp.add_argument("image", metavar="IMAGE", help="JPEG, PNG, WebP, BMP, GIF or TIFF file")
    cmp.add_argument("--json", action="store_true",
                     help="print the report (leanvgg's report schema) instead of a table")
    cmp.add_argument("--output", metavar="FILE", default=None,
                     help="also write the report (JSON, report schema) to FILE, atomically")
    cmp.add_argument("--batch-size", type=_positive, default=1, metavar="N",
                     help="above 1: also measure throughput (images/s) at batch N, beside the "
                          "batch-1 latency (default 1: latency only)")
    cmp.set_defaults(func=_compare)


def _add_build(commands, shared: _Shared) -> None:
    command = commands.add_parser(
        "build", parents=[shared.weights, shared.runtime, shared.threads],
        help="build and cache the variants",
        description="Build every variant missing from the cache ($LEANVGG_HOME, default "
                    "~/.cache/leanvgg), each made for --threads.")
    # the server's builder process (leanvgg.service.worker): JSON events on stdout
    command.add_argument("--events", action="store_true", help=argparse.SUPPRESS)
    # its helper: the first stage only, beside it (each builds the variants it claims first)
    command.add_argument("--helper", action="store_true", help=argparse.SUPPRESS)
    command.set_defaults(func=_build)


def _add_finetune(commands, shared: _Shared) -> None:
    fit = commands.add_parser(
        "finetune", parents=[shared.weights_only],
        help="recover the pruned variants' accuracy on your data (also under torchrun)",
        description="Fine-tune the pruned model and cache the result, so 'pruned' and "
                    "'pruned_quantized' become fine-tuned. A model with its own classes trains "
                    "with cross-entropy on --data DIR, a labelled image folder (one sub-folder "
                    "per label, torchvision's ImageFolder layout); ImageNet's 1,000-class "
                    "VGG-19 on a class-stratified CIFAR-10 subset (each CIFAR class as the "
                    "union of its ImageNet classes). Under 'torchrun --nproc-per-node N' it "
                    "trains with DistributedDataParallel.")
    fit.add_argument("--data", metavar="DIR", default=None,
                     help="a labelled image folder (your own classes), or for ImageNet models "
                          "a folder holding cifar-10-batches-py/ (default: download CIFAR-10)")
    fit.add_argument("--subset", type=_positive, default=None,
                     help="training images, stratified by class (default: every image of an "
                          f"image folder; {DEFAULT_SUBSET} of CIFAR-10)")
    fit.add_argument("--epochs", type=_positive, default=1, help="epochs (default 1)")
    fit.add_argument("--batch-size", type=_positive, default=16,
                     help="global batch size (default 16)")
    fit.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    fit.add_argument("--seed", type=int, default=0, help="subset and shuffling seed (default 0)")
    fit.add_argument("--variant", choices=FINETUNABLE, default="pruned",
                     help="whose pruned model to fine-tune: 'pruned' (shared with "
                          "pruned_quantized), 'turbo' (shared with turbo160) or 'turbo_svd' "
                          "(default pruned)")
    fit.set_defaults(func=_finetune)


def _add_tune(commands, shared: _Shared) -> None:
    tn = commands.add_parser(
        "tune", parents=[shared.weights_only, shared.labelled, shared.calibration],
        help="the fastest variant within an accuracy budget (Pareto front of a search)",
        description="Search filter pruning × classifier compression × precision × input "
                    "resolution (× fine-tuning), measuring each candidate's latency on this "
                    "machine and its accuracy (with its 95 %% interval) on the validation data; "
                    "print the Pareto front, save a JSON report and a PNG plot, and register "
                    "the fastest candidate within --max-drop as 'tuned' (the very cache entry "
                    "measured). Ctrl-C keeps every finished candidate; rerunning resumes. Under "
                    "'torchrun --nproc-per-node N' accuracy is counted over N shards; latency "
                    "is measured by rank 0 alone.")
    tn.add_argument("--val", metavar="DIR", default=None,
                    help="validation images of the model's own classes (default: 20 %% of each "
                         "class of --data, held out with seed 0; the report says so)")
    tn.add_argument("--output", metavar="FILE", default=None,
                    help="also write the search's report (report schema) to FILE, atomically")
    tn.add_argument("--max-drop", type=float, required=True,
                    help="accuracy points the choice may lose against FP32 (e.g. 1.0)")
    tn.add_argument("--subset", type=_positive, default=200,
                    help="validation images, stratified by class (default 200)")
    tn.add_argument("--budget-minutes", type=float, default=None,
                    help="stop measuring new candidates after this long (default: no limit)")
    tn.add_argument("--resolutions", type=_int_list, default=(224, 192, 160, 128),
                    metavar="A,B", help="input sizes (default 224,192,160,128)")
    tn.add_argument("--prune-ratios", type=_float_list, default=(0.0, 0.1, 0.2, 0.3, 0.5),
                    metavar="A,B", help="filter pruning ratios (default 0,0.1,0.2,0.3,0.5)")
    tn.add_argument("--precisions", type=_word_list,
                    default=("fp32", "bf16", "int8") if native_bf16() else ("fp32", "int8"),
                    metavar="A,B", help="of fp32, bf16, int8 (default: all; bf16 only where "
                                        "the CPU computes in bf16)")
    tn.add_argument("--neuron-ratios", type=_float_list, default=(0.0, 0.5), metavar="A,B",
                    help="share of the classifier's hidden neurons removed (classifier.0 and "
                         ".3, by L2 norm; default 0,0.5)")
    tn.add_argument("--ranks", type=_int_list, default=(0,), metavar="A,B",
                    help="inner widths of classifier.0 factorised by truncated SVD (0: not "
                         "factorised; e.g. 0,512,256; default 0)")
    tn.add_argument("--finetune-subset", type=_non_negative, default=0,
                    help="training images (the folder's training part, or CIFAR-10's) for one "
                         "recovery epoch per pruned model (default 0: no fine-tuned "
                         "candidates)")
    tn.add_argument("--runs", type=_positive, default=10, help="timed runs (default 10)")
    tn.add_argument("--warmup", type=_non_negative, default=2, help="warm-up runs (default 2)")
    tn.set_defaults(func=_tune)


def _add_evaluate(commands, shared: _Shared) -> None:
    ev = commands.add_parser(
        "evaluate", parents=[shared.weights, shared.labelled, shared.runtime, shared.threads],
        help="top-1 / top-3 accuracy of every variant on a labelled set",
        description="Measure each variant's top-1 and top-3 accuracy and its top-1 agreement with "
                    "the baseline (each with its 95 %% Wilson interval), and store the report so "
                    "'compare' and the dashboard show it. Under 'torchrun --nproc-per-node N' "
                    "each process counts its shard and rank 0 writes the report.")
    ev.add_argument("--subset", type=_positive, default=500,
                    help="images, stratified by class (default 500)")
    ev.add_argument("--batch-size", type=_positive, default=16, help="batch size (default 16)")
    ev.set_defaults(func=_evaluate)


def _add_export(commands, shared: _Shared) -> None:
    exp = commands.add_parser(
        "export", parents=[shared.weights_only, shared.calibration, shared.threads],
        help="write variants as files other programs run, each with a model.json",
        description="Export VARIANT(s) into --out: the model file and VARIANT.model.json (exact "
                    "preprocessing, recipe, kept filters, accuracy, latency profile, versions). "
                    "pt2: an AOTInductor package, run with torch._inductor.aoti_load_package"
                    "(path)(x) in a Python with the same torch and no leanvgg (compiled variants "
                    "export the very package leanvgg runs). onnx: for ONNX Runtime; openvino: "
                    "IR (.xml + .bin); INT8 variants are quantized there by the runtime's own "
                    "quantizer on the variant's calibration images (needs pip install "
                    "'leanvgg[export]'). safetensors: plain tensors, leanvgg.load(path) "
                    "rebuilds the model. A format that cannot hold a variant is refused, "
                    "saying which can.")
    exp.add_argument("variants", metavar="VARIANT", nargs="+", type=_variant_name,
                     help=f"of {', '.join(RECIPES)}, {TUNED}")
    exp.add_argument("--format", dest="formats", action="append", choices=EXPORT_FORMATS,
                     default=None, help="format (repeatable; default pt2)")
    exp.add_argument("--out", required=True, metavar="DIR", help="folder to write into")
    exp.set_defaults(func=_export)


def _add_cache(commands, shared: _Shared) -> None:
    cache = commands.add_parser(
        "cache", help="list or clear the cached models ($LEANVGG_HOME)",
        description="The cache holds every model leanvgg built (weights, and compiled packages "
                    "for this CPU and torch): 'list' shows each entry, 'clear' deletes them. "
                    "Reports (evaluation, tune's search and choice, latency profiles) are kept.")
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every entry: variant, key, kind, size, age, built from")
    clear = actions.add_parser("clear", help="delete entries (all, or only old ones)")
    clear.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                       help="only entries last written more than DAYS days ago")
    cache.set_defaults(func=_cache)


def _add_serve(commands, shared: _Shared) -> None:
    srv = commands.add_parser(
        "serve", parents=[shared.weights, shared.timing, shared.runtime],
        help="run the dashboard and JSON API",
        description="Serve the dashboard on a production WSGI server (waitress). The page "
                    "answers at once; each variant becomes usable as soon as it is loaded or "
                    "built. Latency is profiled per variant in the background (--runs passes "
                    "after --warmup, default 30 and 2); an upload runs each variant once.")
    srv.add_argument("--host", default="127.0.0.1",
                     help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    srv.set_defaults(runs=30)
    srv.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    srv.add_argument("--queue-timeout", type=_positive, default=120, metavar="SECONDS",
                     help="longest wait for the measurement slot before 503 with Retry-After "
                          "(default 120)")
    srv.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                     help="a further Host name to answer to (repeatable; default: only "
                          "127.0.0.1, localhost and --host; others get 400, which stops DNS "
                          "rebinding)")
    srv.add_argument("--max-upload-mb", type=_positive, default=DEFAULT_LIMITS.max_bytes // 2**20,
                     help="largest accepted upload in MB (default %(default)s)")
    srv.add_argument("--max-megapixels", type=_positive,
                     default=DEFAULT_LIMITS.max_pixels // 1_000_000,
                     help="largest accepted decoded image in megapixels (default %(default)s; "
                          "it may not exceed Pillow's decompression-bomb limit)")
    srv.set_defaults(func=_serve)

def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    verbose = args.verbose or args.command == "serve"  # a server's log is its progress report
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose
                        else "%(levelname)s %(name)s: %(message)s")
    _notices_to_the_debug_log()
    try:
        code = args.func(args)
        if code == 0 and getattr(args, "labelled_model", None):
            store, baseline = args.labelled_model
            remember(store, baseline.weights_id, baseline.labels)
        return code
    except (ImageError, WeightsError, LabelsError, DataUnavailable, MappingError, NotTuned,
            CacheError, ExportError, MissingRuntime, LoadError, OutputError) as err:
        print(f"leanvgg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanvgg: interrupted", file=sys.stderr)
        return 130


# Warnings torch logs on every run that concern neither a CPU nor a user of leanvgg (its logger,
# what the message says): an import of torchao registering an enum the way torch deprecates,
# and an import of torch.utils.cpp_extension (Inductor's compiler) finding a CUDA toolkit
# without a GPU. Each printed a line of its own format into every build's and server's output.
_NOTICES = (("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
            ("torch.utils.cpp_extension", "No CUDA runtime is found"))


class _ToTheDebugLog(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        log.debug("%s said: %s", record.name, record.getMessage())
        return False


def _notices_to_the_debug_log() -> None:
    """Keep torch's irrelevant notices (``_NOTICES``) for the debug log; every other warning
    of those loggers still shows. Set before the modules that log them are imported (their
    loggers are made here, and found there)."""
    for name, text in _NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ToTheDebugLog) and f.text == text for f in logger.filters):
            logger.addFilter(_ToTheDebugLog(text))


class OutputError(Exception):
    """A file or folder the user named cannot be written; the message says which and why."""


def _writable(path: str, *, folder: bool = False) -> Path:
    """``path`` checked before any work: its folder (``path`` itself with ``folder``) exists
    or can be made, and can be written into."""
    target = Path(path)
    place = target if folder else target.parent
    blocking = next((p for p in (place, *place.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise OutputError(f"cannot write {path!r}: {str(blocking)!r} is not a folder.")
    try:
        place.mkdir(parents=True, exist_ok=True)
        if not place.is_dir():
            raise OutputError(f"cannot write {path!r}: {str(place)!r} is not a folder.")
        if not os.access(place, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {path!r}: {str(place)!r} is not writable.")
    except OSError as err:
        raise OutputError(f"cannot write {path!r}: {err.strerror or err}.") from None
    if not folder and target.is_dir():
        raise OutputError(f"cannot write {path!r}: it is a folder.")
    return target


def _write_output(path: Path, report: dict) -> None:
    try:
        write_report(path, report)
    except OSError as err:
        raise OutputError(f"cannot write {str(path)!r}: {err.strerror or err}.") from None


def _baseline(args: argparse.Namespace, store: Store, folder: str | None = None, *,
              drawn: bool = True) -> Baseline:
    """The model the command works on, with its labels (``labels.attach``): checked, like the
    label file, before anything is built or cached. ``folder``: a labelled image folder whose
    sub-folder names label a model that has no names of its own. ``drawn=False``: random
    weights not drawn (``load_baseline``), for a caller that maps them from the store."""
    given = read_labels(args.labels) if args.labels else None
    baseline = load_baseline(args.weights, input_size=args.input_size, drawn=drawn)
    names = None
    if (folder is not None and not given and baseline.labels.source == GENERIC
            and not _is_cifar(folder)):
        names = Labels(folder_classes(folder), f"folder {folder}")
    baseline = attach(baseline, store, given, names)
    args.labelled_model = store, baseline  # its labels are kept once the command succeeds
    return baseline


def _is_cifar(folder: str) -> bool:
    return (Path(folder) / "cifar-10-batches-py").is_dir()


def _model_line(baseline: Baseline) -> str:
    """The model's identity, the first line of a command's output (and what to know of its
    labels)."""
    note = f"\n{baseline.labels.note}" if baseline.labels.note else ""
    return f"model: {baseline.describe()}{note}"


def _compare(args: argparse.Namespace) -> int:
    picture = decode(read_file(args.image))  # fail on a bad image before any model work
    output = _writable(args.output) if args.output else None
    store = Store()
    baseline = _baseline(args, store)
    variant_set = build_variants(baseline, _with_baseline(args.variants),
                                 store=store, calibration=args.calibration,
                                 runtime=args.runtime, threads=args.threads)
    result = compare(picture, variant_set,
                     Settings(runs=args.runs, warmup=args.warmup, threads=args.threads,
                              batch_size=args.batch_size),
                     progress=True)
    report = result.to_dict()
    if output is not None:
        _write_output(output, report)
    print(json.dumps(report, indent=2) if args.json else format_table(result))
    return 0


def _with_baseline(names: list[str] | None) -> list[str] | None:
    return None if names is None else ["baseline", *names]  # speedups are relative to it


def _build(args: argparse.Namespace) -> int:
    if args.events:
        from leanvgg.service import worker

        say = worker.events_channel()  # from here our stdout carries the events alone
    store = Store()
    baseline = _baseline(args, store, drawn=not args.events)
    if args.events:
        # a server's builder process: the weights mapped from the store, as the server maps
        # them (one copy in the page cache for all processes; random ones drawn only if the
        # store lacks them: the server stored them already)
        baseline = stored_baseline(baseline, store)
        stop = threading.Event()
        # The server stops it with SIGTERM (and the kernel sends one when the server dies):
        # leave through SystemExit, so the temporary folders of a conversion in progress
        # (half a GB of ONNX each) are removed and its helper is stopped, instead of being
        # left in the temporary directory for good.
        signal.signal(signal.SIGTERM, _exit_building)

        def emit(*event, **fields) -> None:
            # A library's bare ``except:`` may swallow the SystemExit when the signal lands
            # inside it (OpenVINO's converter has several: the build then went on and exited
            # 0); the next event leaves for good.
            if _STOPPED and threading.current_thread() is threading.main_thread():
                raise SystemExit(128 + _STOPPED[0])
            say(worker.Event(*event, **fields))

        def helper(names: list[str], threads: int):  # its helper, on the first stage
            return worker.run(worker.command(
                baseline, names, threads=threads, runtime=args.runtime,
                calibration=args.calibration, helper=True), store.root, stop)

        try:
            build_in_stages(baseline, args.variants, store=store, calibration=args.calibration,
                            runtime=args.runtime, threads=args.threads,
                            beside=helper if worker.JOBS > 1 and not args.helper else None,
                            helper=args.helper,
                            emit=emit)
        finally:
            stop.set()
        return 0
    variant_set = build_variants(baseline, args.variants, store=store,
                                 calibration=args.calibration, runtime=args.runtime,
                                 threads=args.threads)
    print(_model_line(baseline))
    for variant in variant_set.variants.values():
        where = variant.where
        print(f"{variant.name:<17} {variant.facts.size_mb:8.1f} MB  "
              f"{variant.facts.params:>12,} params  {where.runtime} ({where.how}, "
              f"{where.threads} threads)")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    store = Store()
    baseline = _baseline(args, store, folder=args.data)
    size = at_input_size(RECIPES[args.variant], baseline.input_size).input_size
    if finetune_loss(baseline.model) == "grouped-nll":  # ImageNet's classes: CIFAR-10 groups
        if args.data is not None and not _is_cifar(args.data):
            raise DataUnavailable(
                f"{args.data!r} holds no cifar-10-batches-py/: a 1,000-class (ImageNet) model "
                "is fine-tuned on CIFAR-10, each CIFAR class the union of its ImageNet classes.")
        dataset = stratified_subset(cifar10(args.data, train=True, size=size),
                                    args.subset or DEFAULT_SUBSET, seed=args.seed)
        membership, loss = group_index_tensor(), "grouped loss"
    else:
        if args.data is None:
            raise DataUnavailable(
                f"A model with its own {baseline.num_classes} classes is fine-tuned on its own "
                "images: pass --data DIR, a folder with one sub-folder of images per label.")
        dataset = labelled_folder(args.data, baseline.labels.names).dataset(size)
        if args.subset and args.subset < len(dataset):
            dataset = stratified_subset(dataset, args.subset, seed=args.seed)
        membership, loss = None, "cross-entropy"
    _, facts = finetune_variant(baseline, dataset, membership,
                                name=args.variant, store=store, epochs=args.epochs, lr=args.lr,
                                batch_size=args.batch_size, seed=args.seed)
    rank, world_size = distributed_context()
    if rank == 0:
        stats = facts["finetune"]
        print(_model_line(baseline))
        print(f"fine-tuned on {stats['images']} images × {stats['epochs']} epoch(s) in "
              f"{stats['seconds']:.0f} s on {stats['world_size']} process(es): {loss} "
              f"{stats['first_loss']:.3f} (first 10 %) → {stats['final_loss']:.3f} (last epoch)")
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return 0


def _dataset_kind(args: argparse.Namespace, baseline: Baseline) -> str:
    """--dataset, or by default: a folder of the model's own classes, CIFAR-10 for ImageNet's."""
    if args.dataset is not None:
        return args.dataset
    return "cifar10" if finetune_loss(baseline.model) == "grouped-nll" else "folder"


def _labelled(args: argparse.Namespace, baseline: Baseline, folder: str | None = None
              ) -> Labelled:
    """The labelled set ``--dataset`` names (``folder``: instead of ``--data``), whole."""
    kind, data = _dataset_kind(args, baseline), folder or args.data
    if kind == "cifar10":
        return cifar10_test(data)
    if data is None:
        raise DataUnavailable(f"--dataset {kind} needs --data DIR (for a model with its own "
                              "classes: a folder with one sub-folder of images per label).")
    if kind == "folder" and args.mapping is None:
        if baseline.labels.source == IMAGENET:
            raise MappingError("--dataset folder needs --mapping FILE for ImageNet's classes "
                               "(or --labels FILE naming the model's classes as the folder's "
                               "sub-folders are named).")
        return labelled_folder(data, baseline.labels.names)
    if baseline.num_classes != 1000:
        raise MappingError(f"--dataset {kind}{' with --mapping' if args.mapping else ''} maps "
                           "folders to ImageNet classes; this model has its own "
                           f"{baseline.num_classes}: name the sub-folders after its labels and "
                           "leave out --mapping.")
    return image_folder(data, load_mapping(args.mapping) if kind == "folder" else None)


def _evaluate(args: argparse.Namespace) -> int:
    store = Store()
    baseline = _baseline(args, store, folder=args.data)
    labelled = _labelled(args, baseline).subset(args.subset)
    variant_set = build_variants(baseline, _with_baseline(args.variants),
                                 store=store, calibration=args.calibration,
                                 runtime=args.runtime, threads=args.threads)
    results = evaluate(variant_set, labelled, batch_size=args.batch_size)
    rank, world_size = distributed_context()
    if rank == 0:
        save_report(store, results)
        print(_model_line(baseline))
        print(format_accuracy(results, labelled.name))
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return 0


def format_accuracy(results: dict, dataset: str) -> str:
    """Accuracies with their 95 % intervals, one variant a line."""
    def pct(value: float, interval: tuple[float, float]) -> str:
        return f"{value:.1%} ({100 * interval[0]:.1f}–{100 * interval[1]:.1f})"

    lines = [f"{'variant':<17}{'top-1 (95% CI)':>22}{'top-3 (95% CI)':>22}"
             f"{'agrees (95% CI)':>22}  on {dataset}"]
    for name, acc in results.items():
        lines.append(f"{name:<17}{pct(acc.top1, acc.top1_ci):>22}{pct(acc.top3, acc.top3_ci):>22}"
                     f"{pct(acc.agreement, acc.agreement_ci):>22}  ({acc.images} images, "
                     f"on {acc.runtime})")
    return "\n".join(lines)


def _tune(args: argparse.Namespace) -> int:
    try:
        space = Space(resolutions=args.resolutions, prune_ratios=args.prune_ratios,
                      precisions=args.precisions, neuron_ratios=args.neuron_ratios,
                      ranks=args.ranks)
    except ValueError as err:
        print(f"leanvgg: error: {err}", file=sys.stderr)
        return 2
    output = _writable(args.output) if args.output else None
    store = Store()
    baseline = _baseline(args, store, folder=args.data)
    validation, train = _tune_data(args, baseline)
    rank, world_size = distributed_context()
    try:
        result = search(baseline, validation, max_drop=args.max_drop, space=space, train=train,
                        store=store, runs=args.runs, warmup=args.warmup,
                        calibration=args.calibration,
                        budget_s=None if args.budget_minutes is None
                        else 60 * args.budget_minutes,
                        settings={"subset": args.subset,
                                  "finetune_subset": args.finetune_subset})
    except KeyboardInterrupt:
        print(f"leanvgg: interrupted; finished candidates are kept in "
              f"{store.documents.path(SEARCH)}; run the same command again to resume.",
              file=sys.stderr)
        return 130
    if rank == 0:
        plot_path = store.root / SEARCH_PLOT
        plot_front(result, plot_path)
        print(_model_line(baseline))
        print(format_front(result))
        if result.chosen is None:
            print(f"No candidate is within {args.max_drop:g} points of FP32; nothing "
                  "registered.")
        else:
            register_tuned(baseline, tuned_config(result), store)
            print(f"Registered {result.chosen} as 'tuned' (the cache entry measured above): "
                  "'leanvgg compare' and the dashboard now show it.")
        if output is not None:
            _write_output(output, json.loads(store.documents.path(SEARCH).read_text()))
        print(f"Report: {store.documents.path(SEARCH)}\nPlot: {plot_path}")
        for warning in result.warnings:
            print(f"leanvgg: WARNING: {warning}", file=sys.stderr)
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return 0


def _tune_data(args: argparse.Namespace, baseline: Baseline
               ) -> tuple[Labelled, Labelled | None]:
    """(validation, training or None): CIFAR-10's test and training splits, or a folder of the
    model's own classes with --val DIR, or one folder split (seeded, stratified, named so)."""
    own = _dataset_kind(args, baseline) == "folder" and args.mapping is None
    if args.val is not None and not own:
        raise DataUnavailable("--val DIR is for a folder of the model's own classes "
                              "(--dataset folder without --mapping).")
    if own and args.data is not None:
        if args.val is not None:
            validation, training = _labelled(args, baseline, args.val), _labelled(args, baseline)
        else:
            training, validation = split(_labelled(args, baseline))
    else:
        validation, training = _labelled(args, baseline), None
        if args.finetune_subset:
            if _dataset_kind(args, baseline) != "cifar10":
                raise DataUnavailable("--finetune-subset needs --dataset cifar10, or a folder "
                                      "of the model's own classes.")
            training = Labelled("cifar10-train", lambda size: cifar10(
                args.data, train=True, size=size), group_index_tensor())
    train = training.subset(args.finetune_subset) if args.finetune_subset else None
    return validation.subset(args.subset), train


def _export(args: argparse.Namespace) -> int:
    store = Store()
    baseline = _baseline(args, store)
    builder = VariantBuilder(baseline, store, args.calibration, threads=args.threads)
    names = builder.resolve(dict.fromkeys(args.variants))
    formats = list(dict.fromkeys(args.formats or ["pt2"]))
    check_export([builder.registry[name] for name in names], formats)
    out = _writable(args.out, folder=True)
    # described, not loaded: each format copies the stored file leanvgg runs, or makes it
    variants = (_placed(builder.builder.described(builder.registry[name]), builder.builder)
                for name in names)
    try:  # a file per variant and format: seconds each, a pt2 compiled now 25 s (VGG-19)
        exported = list(tqdm(export_each(variants, formats, out, builder=builder.builder),
                             total=len(names) * len(formats), desc="exporting", unit="file"))
    except PermissionError as err:
        raise OutputError(f"cannot write into {args.out!r}: {err.strerror or err}.") from None
    print(_model_line(baseline))
    for done in exported:
        print(f"{done.variant} as {done.format}: {done.path} "
              f"({done.size_bytes / 2**20:.1f} MB), {done.model_json}")
    return 0


def _placed(variant: Variant, builder: Builder) -> Variant:
    """``variant`` where the stored runtime choice runs it (nothing measured), so that its
    model.json describes what leanvgg runs: an IR the choice placed on OpenVINO's default
    precision with those settings, and the latency profile measured there; as built when no
    choice is stored."""
    placement = plan(variant.recipe, builder, AUTO)
    return dataclasses.replace(variant, placement=placement) if placement else variant


def _cache(args: argparse.Namespace) -> int:
    store = Store()
    entries = cache.entries(store)
    if args.action == "list":
        print(f"{'variant':<44}{'key':<22}{'kind':<9}{'MB':>9}{'age':>8}  built from")
        for e in entries:
            print(f"{e.recipe[:43]:<44}{e.key:<22}{e.kind:<9}{e.bytes / 2**20:>9.1f}"
                  f"{_age(e.modified):>8}  {e.built_from}")
        total = sum(e.bytes for e in entries) / 2**20
        print(f"{len(entries)} entries, {total:.1f} MB in {store.root}")
        return 0
    if args.older_than is not None and args.older_than < 0:
        print("leanvgg cache clear: error: --older-than must be at least 0 days", file=sys.stderr)
        return 2
    cutoff = None if args.older_than is None else time.time() - 86400 * args.older_than
    doomed = [e for e in entries if cutoff is None or e.modified < cutoff]
    for entry in doomed:
        cache.remove(store, entry)
    print(f"Removed {len(doomed)} of {len(entries)} entries "
          f"({sum(e.bytes for e in doomed) / 2**20:.1f} MB) from {store.root}; they are rebuilt "
          "when needed (fine-tuned weights only by 'leanvgg finetune' or 'leanvgg tune').")
    return 0


def _age(modified: float) -> str:
    seconds = max(0.0, time.time() - modified)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _serve(args: argparse.Namespace) -> int:
    from leanvgg.service import PROCESS, ComparisonService
    from leanvgg.web import make_server

    try:
        limits = dataclasses.replace(DEFAULT_LIMITS, max_bytes=args.max_upload_mb * 2**20,
                                     max_pixels=args.max_megapixels * 1_000_000)
    except ValueError as err:
        print(f"leanvgg: error: {err}", file=sys.stderr)
        return 2
    _fewer_malloc_arenas()
    store = Store()
    weights: str | Baseline = args.weights
    if args.labels or args.input_size != 224 or args.weights not in WEIGHTS_CHOICES:
        # the user's own model or labels: refused in one line before serving, not on the page
        weights = _baseline(args, store)
        log.info(_model_line(weights))
        remember(store, weights.weights_id, weights.labels)
    service = ComparisonService(
        weights=weights, names=_with_baseline(args.variants),
        settings=Settings(runs=args.runs, warmup=args.warmup, threads=args.threads),
        limits=limits, store=store, calibration=args.calibration, runtime=args.runtime,
        queue_timeout_s=args.queue_timeout, build_in=PROCESS)
    try:
        # Bound before the warm-up starts: a taken port fails in a second, not after minutes.
        server = make_server(service, host=args.host, port=args.port, allowed=args.allowed_host)
    except OSError as err:
        print(f"leanvgg: error: cannot listen on {args.host}:{args.port}: "
              f"{err.strerror or err}.", file=sys.stderr)
        return 2
    # waitress stops its workers cleanly on SystemExit; make SIGTERM (service managers, kill)
    # take that path instead of killing the process mid-answer. Installed before the banner
    # below, which callers may take as the moment the server can be stopped.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        service.start()
        log.info("Dashboard on http://%s:%d/ (variants loading in the background)",
                 args.host, args.port)
        server.run()
    except SystemExit:
        pass  # the signal came before waitress's loop (which catches it itself) had started
    log.info("Server stopped.")
    if not service.stop(timeout_s=5):
        # Torch work cannot be interrupted, and a daemon thread inside it aborts the interpreter
        # at exit. Leave at once instead: cache writes are atomic, so nothing half-written is
        # ever loaded (an interrupted write leaves only an ignored temporary file).
        log.info("Leaving the unfinished warm-up behind.")
        logging.shutdown()
        os._exit(0)
    return 0


def _fewer_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas before the server's threads start.

    By default every thread that allocates gets an arena of its own (up to 8 per core), and
    memory freed in one is rarely returned or reused by another: a server whose dozen threads
    each run forward passes and parse uploads keeps growing. Elsewhere than glibc, a no-op.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


_STOPPED: list[int] = []  # the signal that stopped the build, once received


def _exit_building(signum: int, _frame) -> None:
    if _STOPPED:  # leaving already: a second signal (the server's, then the kernel's as the
        return  # server dies) would cut the cleanup short, or print a traceback at exit
    log.info("Received %s; stopping the build.", signal.Signals(signum).name)
    _STOPPED.append(signum)
    # What the stop leaves half-done is finalised as the interpreter exits, some of it after
    # the modules it needs are gone (Inductor's handler contexts, mid-compile): Python would
    # print each failure as a traceback into the server's log ("Exception ignored in ...").
    sys.unraisablehook = _leaving
    raise SystemExit(128 + signum)


def _leaving(_unraisable) -> None:
    """Errors in finalisers of a build stopped on purpose: nothing to report."""


def _exit_on_signal(signum: int, _frame) -> None:
    log.info("Received %s; shutting down.", signal.Signals(signum).name)
    raise SystemExit(0)


def format_table(result: ComparisonResult) -> str:
    """A fixed-width table of a comparison, with where its figures come from."""
    batched = result.batch_size > 1
    # as wide as the longest name and runtime (openvino_bf16), two spaces after each
    name_w = max([len("variant"), *(len(row.facts.name) for row in result.variants)]) + 2
    run_w = max([len("runtime"), *(len(row.facts.runtime) for row in result.variants)]) + 2
    header = (f"{'variant':<{name_w}}{'runtime':<{run_w}}{'input':>5}{'size MB':>9}"
              f"{'params':>13}{'GMACs':>7}"
              f"{'median ms':>11}{'p90 ms':>9}{'speedup':>9}"
              + (f"{f'img/s @{result.batch_size}':>12}" if batched else "") + "  top-3")
    lines = [header, "-" * len(header)]
    for row in result.variants:
        v = row.facts
        top3 = ", ".join(f"{p.label} {p.prob:.1%}" for p in row.top3)
        throughput = (f"{row.throughput.images_per_s:>12.1f}" if batched and row.throughput
                      else "")
        lines.append(
            f"{v.name:<{name_w}}{v.runtime:<{run_w}}{v.input_size:>5}{v.size_mb:>9.1f}"
            f"{v.params:>13,}"
            f"{v.macs / 1e9:>7.2f}"
            f"{row.latency_ms.median:>11.1f}{row.latency_ms.p90:>9.1f}"
            + (f"{row.speedup:>8.2f}×" if row.speedup is not None else f"{'—':>9}")
            + f"{throughput}  {top3}")
    m = result.machine
    facts = [row.facts for row in result.variants]
    not_tuned = [v.name for v in facts if v.fine_tuned is False]
    lines += [
        "",
        f"model: {result.model.get('arch')}, {result.model.get('classes')} classes "
        f"({result.model.get('labels')} labels); {result.note}",
        *([result.labels_note] if result.labels_note else []),
        f"{result.runs} timed runs after {result.warmup} warm-up, {result.threads} threads, "
        f"{m['cpu']} ({', '.join(m['flags']) or 'no SIMD flags read'}), torch {m['torch']}",
    ]
    if batched:
        lines.append(f"throughput: batches of {result.batch_size} copies of the image, "
                     f"{result.runs} timed batches per variant, each run as one batch")
        lines += [f"{v.name} runs batches on {v.batch_runtime}" for v in facts
                  if v.batch_runtime != v.runtime]
    lines += [f"{row.name}: no speedup, {row.speedup_note}" for row in result.variants
              if row.speedup_note]
    if not_tuned:
        lines.append(f"not fine-tuned: {', '.join(not_tuned)}")
    beyond = [v.name for v in facts if not v.article]
    if beyond:
        lines.append(f"beyond the article: {', '.join(beyond)}")
    for v in facts:
        if v.preparation_s:
            costs = ", ".join(f"{k.removesuffix('_s')} {s:.1f} s"
                              for k, s in v.preparation_s.items())
            lines.append(f"{v.name} one-off: {costs}")
    for v in facts:
        if v.accuracy:
            a = v.accuracy
            lines.append(f"{v.name}: top-1 {a.top1:.1%}, top-3 {a.top3:.1%}, agrees with "
                         f"baseline {a.agreement:.1%} on {a.dataset} (measured on {a.runtime})")
    return "\n".join(lines)
