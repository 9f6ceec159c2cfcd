"""A model in other runtimes' formats: ONNX (for ONNX Runtime) and OpenVINO IR.

A static INT8 model (``leanvgg.quantize.StaticInt8``, PT2E) is exported as it is: its INT8
weights and activation scales become ONNX QuantizeLinear/DequantizeLinear pairs (QDQ), which
ONNX Runtime and OpenVINO fuse into their own INT8 kernels. So every runtime runs the very
quantization Inductor runs, calibrated once; nothing is quantized again here. OpenVINO's IR is
OpenVINO's conversion of the ONNX file (its PyTorch frontend cannot read a PT2E graph). The
runtimes are the optional extra ``leanvgg[export]``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from leanvgg.quantize import StaticInt8

log = logging.getLogger(__name__)

EXTRA = "export"
INPUT, OUTPUT = "input", "logits"
# per format: the libraries that write it (OpenVINO converts the ONNX export)
WRITTEN_WITH = {"onnx": ("onnx", "onnxscript"), "openvino": ("onnx", "onnxscript", "openvino")}


class MissingRuntime(ImportError):
    """An optional runtime is not installed; the message says which extra installs it."""


def require(module: str) -> ModuleType:
    """``import module``, or a MissingRuntime naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingRuntime(
            f"{module} is not installed: it comes with leanvgg's '{EXTRA}' extra "
            f"(pip install 'leanvgg[{EXTRA}]', or from a clone: pip install -e '.[{EXTRA}]')."
        ) from None


def installed(*modules: str) -> bool:
    """Whether every module can be imported, found without importing any of them."""
    return all(importlib.util.find_spec(module) is not None for module in modules)


_STDOUT = threading.Lock()


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """What libraries print during the block goes to stderr: leanvgg's stdout carries only its
    own output (``--json`` must parse). Redirected at the file descriptor too, since some write
    to the process's stdout directly (NNCF's progress bars, through rich: the peers benchmark
    quantizes with it)."""
    with _STDOUT:
        original = sys.stdout
        original.flush()
        saved = os.dup(1)
        try:
            os.dup2(2, 1)
            with contextlib.redirect_stdout(sys.stderr):
                yield
        finally:
            original.flush()
            os.dup2(saved, 1)
            os.close(saved)


def write_onnx(model: nn.Module, input_size: int, path: Path, *,
               metadata: dict[str, str] | None = None) -> None:
    """``model`` as ONNX (any batch size) at ``path``: a float model as FP32, a static INT8
    one as QDQ with its own weights and scales. ``metadata``: written to the model's
    ``metadata_props`` (e.g. its labels)."""
    onnx = require("onnx")
    with stdout_to_stderr():
        proto = _export_onnx(model, input_size)
    _set_metadata(proto, metadata)
    onnx.save(proto, str(path))


def copy_onnx(source: Path, path: Path, metadata: dict[str, str] | None = None) -> None:
    """The ONNX file ``source`` written to ``path``, ``metadata`` added to its
    ``metadata_props`` on the way (keys it names replaced): one read and one write."""
    onnx = require("onnx")
    proto = onnx.load(str(source))
    _set_metadata(proto, metadata)
    onnx.save(proto, str(path))


def _set_metadata(proto, metadata: dict[str, str] | None) -> None:
    if metadata:
        kept = {p.key: p.value for p in proto.metadata_props if p.key not in metadata}
        require("onnx").helper.set_model_props(proto, {**kept, **metadata})


def _export_onnx(model: nn.Module, input_size: int):
    # torch.export's ONNX exporter: the TorchScript one cannot export VGG's adaptive pooling
    # where 7 is not a multiple of the feature map (160 px: 5×5, 32 px: 1×1). One file, weights
    # inside (VGG-19 is far below ONNX's 2 GB limit), any batch size.
    example = torch.zeros(2, 3, input_size, input_size)  # a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=4096)
    # a PT2E graph is exported itself (its wrapper's attribute ``graph`` would shadow the
    # GraphModule's own when torch.export lifts its state); it is fixed in eval mode already
    module = model.graph if isinstance(model, StaticInt8) else model.eval()
    with torch.no_grad(), warnings.catch_warnings(), _quiet("onnx_ir", "onnxscript"):
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        exported = torch.onnx.export(program, input_names=[INPUT], output_names=[OUTPUT],
                                     dynamo=True, optimize=True, verbose=False)
    proto = exported.model_proto
    _unshare_weight_zero_points(proto)
    return proto


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """The exporter's passes log every step at INFO (a line per constant they merge: 286 for
    four variants), which ``--verbose`` would print: only their warnings are kept."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _unshare_weight_zero_points(proto) -> None:
    """Each INT8 weight gets its own zero-point constant. The exporter's optimizer makes one
    constant of equal ones (all 0: the weights are symmetric), so a conv's weights and a
    Linear's with as many output channels (turbo_svd: block 3's convs and fc7's first factor,
    256) shared it, and OpenVINO then ran those convs in FP32, dequantizing their weights on
    every pass. Dropping the zero points instead slowed ONNX Runtime, which fuses QDQ into its
    INT8 kernels only with them. Measured round-robin (2 threads, batch 1, AVX-512 EPYC, ms,
    OpenVINO f32 hint / ONNX Runtime): turbo_svd shared 77.3 / 49.7, none 44.2 / 61.3, own
    45.3 / 49.2; int8_static shared 50.7 / 56.1, none 49.4 / 89.0, own 48.9 / 54.4."""
    onnx = require("onnx")
    constants = {tensor.name: tensor for tensor in proto.graph.initializer}
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for index, node in enumerate(proto.graph.node):
        if (node.op_type != "DequantizeLinear" or len(node.input) < 3
                or node.input[0] not in constants or node.input[2] not in constants
                or uses[node.input[2]] == 1):
            continue
        shared = constants[node.input[2]]
        own = onnx.TensorProto()
        own.CopyFrom(shared)
        own.name = f"{node.input[0]}_zero_point_{index}"
        proto.graph.initializer.append(own)
        uses[shared.name] -= 1
        node.input[2] = own.name


def openvino_model(model: nn.Module, input_size: int):
    """``model`` converted to an OpenVINO model (any batch size), through its ONNX export
    (``write_onnx``): a static INT8 model keeps its own quantization."""
    with tempfile.TemporaryDirectory(prefix="leanvgg-onnx-") as folder:
        path = Path(folder) / "model.onnx"
        write_onnx(model, input_size, path)
        return openvino_from_onnx(path)


def openvino_from_onnx(path: Path):
    """The OpenVINO model of an ONNX file (``write_onnx``'s), its weights read into memory.

    OpenVINO's converter prints its arguments and its own time and memory whenever
    ``--verbose`` is among the process's arguments (``leanvgg --verbose``, and every builder
    process a server starts): eight lines per conversion in the server's log. They are kept
    for the debug log."""
    ov = require("openvino")
    with stdout_to_stderr(), contextlib.redirect_stdout(io.StringIO()) as said:
        converted = ov.convert_model(str(path))
    if said.getvalue().strip():
        log.debug("OpenVINO's converter said: %s", said.getvalue().strip())
    return converted


def read_openvino(path: Path):
    """The OpenVINO model of an IR (.xml, its .bin beside it), to convert or save again."""
    return require("openvino").Core().read_model(str(path))


def write_openvino(ov_model, path: Path, metadata: dict[str, str] | None = None) -> None:
    """IR at ``path`` (.xml) and its .bin, weights kept at their precision (OpenVINO would
    otherwise halve FP32 weights to FP16 on saving); ``metadata`` in its ``rt_info`` under
    ``leanvgg`` (``model.get_rt_info(["leanvgg", key])``)."""
    for key, value in (metadata or {}).items():
        ov_model.set_rt_info(value, ["leanvgg", key])
    require("openvino").save_model(ov_model, str(path), compress_to_fp16=False)


class Runner:
    """A function from an N×3×H×W batch to logits on another runtime, with the settings it
    runs under as that runtime reports them back (threads, precision hint)."""

    def __init__(self, run: Callable[[torch.Tensor], np.ndarray], settings: dict) -> None:
        self.run = run
        self.settings = settings

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.run(batch)


def onnxruntime_settings(threads: int) -> dict:
    """The session options leanvgg runs ONNX Runtime with (model.json repeats them):
    ``threads`` intra-op threads and one inter-op thread."""
    return {"intra_op_num_threads": threads, "inter_op_num_threads": 1}


def onnxruntime_runner(path: Path, threads: int) -> Runner:
    """Runs the ONNX file with ``onnxruntime_settings(threads)``."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    for name, value in onnxruntime_settings(threads).items():
        setattr(options, name, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    read = session.get_session_options()
    return Runner(lambda batch: session.run(None, {INPUT: batch.contiguous().numpy()})[0],
                  {"intra_op_num_threads": read.intra_op_num_threads,
                   "inter_op_num_threads": read.inter_op_num_threads})


def openvino_config(threads: int, *, f32: bool = True) -> dict:
    """The settings leanvgg compiles OpenVINO models with (model.json repeats them).
    ``f32``: what is not INT8 runs in FP32, as on the other runtimes; OpenVINO's default runs
    it in bf16 on CPUs with native bf16."""
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return config


def openvino_runner(ov_model, threads: int, *, f32: bool = True) -> Runner:
    """Runs ``ov_model`` (or an .xml path) on the CPU with ``threads``, tuned for latency
    (``openvino_config``)."""
    ov = require("openvino")
    if isinstance(ov_model, Path):  # its .bin beside it; OpenVINO reads and frees the model
        ov_model = str(ov_model)
    compiled = ov.Core().compile_model(ov_model, "CPU", openvino_config(threads, f32=f32))
    request = compiled.create_infer_request()
    settings = {name: _text(compiled.get_property(name)) for name in (
        "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT")}
    return Runner(lambda batch: request.infer({0: batch.contiguous().numpy()})[0], settings)


def _text(value) -> str:
    """An OpenVINO property as its config spelling (an element type as 'f32', not its repr)."""
    return value.to_string() if hasattr(value, "to_string") else str(value)
