"""leanvgg: compressed VGG-19 variants for CPUs, measured side by side."""

__version__ = "0.1.0"

from leanvgg.portable import load  # noqa: E402

__all__ = ["load"]
