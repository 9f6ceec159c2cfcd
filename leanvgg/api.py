"""The Python API: what ``import leanvgg`` offers a PyTorch user. The CLI, the JSON API and the
dashboard run the same library functions underneath."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from torchvision.models import VGG

from leanvgg.compare import ComparisonResult, Settings
from leanvgg.compare import compare as _compare
from leanvgg.export import Exported, check, export_each
from leanvgg.images import decode, read_file
from leanvgg.labels import Labels, attach, read_labels, remember
from leanvgg.models import Baseline, baseline_of, load_baseline
from leanvgg.store import Store
from leanvgg.variants import VariantSet, build_variants


def build(weights: str | Path | VGG | Baseline = "auto",
          variants: Sequence[str] | None = None, *,
          labels: Sequence[str] | str | Path | None = None, input_size: int = 224,
          calibration: str | Path | None = None,
          home: str | Path | None = None, runtime: str = "auto", threads: int | None = None,
          progress: bool = False) -> VariantSet:
    """The baseline and each named variant (default: all), built or loaded from the cache.

    ``weights``: ``"auto"`` (ImageNet when downloadable, else random), ``"imagenet"``,
    ``"random"``, a weights file of any torchvision VGG (state dict, checkpoint holding one,
    or .safetensors), or a torchvision VGG model in memory (any layout; cached by its weights'
    content). ``labels``: the class names in output order, or a file of them (default: those
    last given for these weights, ImageNet's for 1,000 classes, else ``class 0`` …);
    ``input_size``: the resolution the model was trained at. ``variants``: names such as ``"turbo"``, ``"int8_static"``
    or ``"tuned"``; the baseline is always included (speedups are relative to it).
    ``calibration``: a folder of images for static INT8 (default: the bundled photos).
    ``home``: the cache folder (default ``$LEANVGG_HOME`` or ``~/.cache/leanvgg``).
    ``runtime``: where compiled variants run: ``"auto"`` (the fastest of Inductor, ONNX Runtime
    and OpenVINO here, measured once per machine and kept), or one of them pinned.
    ``threads``: the thread count every runtime is set up for (compiled packages, ONNX Runtime
    and OpenVINO sessions; default: PyTorch's current setting); ``compare`` runs on it.
    """
    if isinstance(labels, (str, Path)):
        given = read_labels(labels)
    else:
        given = None if labels is None else Labels(tuple(labels), "given")
    if isinstance(weights, VGG):
        baseline = baseline_of(weights, input_size=input_size)
    elif isinstance(weights, Baseline):
        baseline = weights
    else:
        baseline = load_baseline(str(weights), input_size=input_size, progress=progress)
    store = Store(Path(home)) if home else Store()
    baseline = attach(baseline, store, given)
    remember(store, baseline.weights_id, baseline.labels)
    names = None if variants is None else ["baseline", *variants]
    return build_variants(baseline, names, store=store,
                          progress=progress, runtime=runtime, threads=threads,
                          calibration=str(calibration) if calibration else None)


def compare(image: str | Path | bytes | Image.Image, variant_set: VariantSet, *,
            runs: int = 10, warmup: int = 2, threads: int | None = None,
            batch_size: int = 1) -> ComparisonResult:
    """Every variant of ``variant_set`` on one image: size, parameters, MACs, latency (``runs``
    timed passes after ``warmup``), speedup, top-3, and with ``batch_size`` > 1 throughput.
    ``threads``: None runs on the count the variants were built for (another is refused).

    ``image``: a file path, encoded bytes or a PIL image; files and bytes pass the same checks
    as uploads (size, format, pixel count). ``result.to_dict()`` is the report schema's
    document (``leanvgg.schema``), as ``leanvgg compare --json`` prints it.
    """
    if isinstance(image, (str, Path)):
        image = read_file(image)
    picture = decode(image) if isinstance(image, bytes) else image
    return _compare(picture, variant_set, Settings(runs=runs, warmup=warmup, threads=threads,
                                                   batch_size=batch_size))


def export(variant_set: VariantSet, names: str | Sequence[str], out: str | Path, *,
           formats: Sequence[str] = ("pt2",)) -> list[Exported]:
    """Write each named variant of ``variant_set`` in each format into ``out``, each variant
    with its ``VARIANT.model.json`` (preprocessing, recipe, facts, latency profile, versions).

    Formats: ``pt2`` (AOTInductor), ``onnx``, ``openvino`` (both need
    ``pip install 'leanvgg[export]'``), ``safetensors`` (read back with ``leanvgg.load``).
    Raises ``ExportError`` before writing anything if a format cannot hold a variant.
    """
    names = [names] if isinstance(names, str) else list(names)
    missing = [n for n in names if n not in variant_set.variants]
    if missing:
        raise ValueError(f"Invalid variants {missing}: not in this set "
                         f"({', '.join(variant_set.variants)}). Build them first.")
    if variant_set.builder is None:
        raise ValueError("This variant set was not made by leanvgg.build; build it there.")
    check([variant_set.variants[n].recipe for n in names], formats)
    return list(export_each((variant_set.variants[n] for n in names), formats, Path(out),
                            builder=variant_set.builder))
