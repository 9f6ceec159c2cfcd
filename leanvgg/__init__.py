"""leanvgg: compressed VGG-19 variants for CPUs, measured side by side.

    import leanvgg
    variants = leanvgg.build("random", ["int8_static", "turbo"])
    result = leanvgg.compare("cat.jpg", variants)
    leanvgg.export(variants, "turbo", "out/", formats=["onnx", "safetensors"])
    model = leanvgg.load("out/turbo.safetensors")
"""

__version__ = "0.1.0"

from leanvgg.api import build, compare, export  # noqa: E402
from leanvgg.portable import load  # noqa: E402

__all__ = ["build", "compare", "export", "load"]
