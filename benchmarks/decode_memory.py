"""Peak memory of decoding one worst-case upload (decode + tensors), each in a fresh process.

The images are the largest the default limits accept (50 megapixels, 20 MB files) plus the
1,000,000 × 32 PNG that used to blow up to 10.9 GB. Growth of the peak RSS (VmHWM, reset just
before decoding) is printed per image and saved to benchmarks/results/decode_memory.json.

Run: .venv/bin/python benchmarks/decode_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from leanvgg import schema

RESULTS = Path(__file__).parent / "results"

_CHILD = r"""
import io, json, re, sys, time
from pathlib import Path
from PIL import Image
from leanvgg.images import decode

def status(field):
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

kind = sys.argv[1]
buffer = io.BytesIO()
gradient = Image.linear_gradient("L").resize((7071, 7071))
if kind == "1000000x32-png":
    Image.new("RGB", (1_000_000, 32), (10, 200, 30)).save(buffer, "PNG")
elif kind == "50mp-rgba-png":
    Image.merge("RGBA", [gradient] * 4).save(buffer, "PNG", compress_level=1)
elif kind == "50mp-progressive-jpeg":
    gradient.convert("RGB").save(buffer, "JPEG", progressive=True)
elif kind == "50mp-16bit-tiff":
    gradient.convert("I;16").save(buffer, "TIFF", compression="tiff_deflate")
data = buffer.getvalue()
del gradient
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
start = time.perf_counter()
picture = decode(data)
tensors = picture.batches([224, 160])
print(json.dumps({"image": kind, "file_mb": len(data) / 2**20,
                  "size": [picture.width, picture.height], "kept": list(picture.square.size),
                  "seconds": time.perf_counter() - start,
                  "peak_growth_mb": status("VmHWM") - before}))
"""
IMAGES = ("1000000x32-png", "50mp-rgba-png", "50mp-progressive-jpeg", "50mp-16bit-tiff")


def main() -> None:
    rows = []
    for kind in IMAGES:
        result = subprocess.run([sys.executable, "-c", _CHILD, kind], capture_output=True,
                                text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append({"name": row.pop("image"), **row})
        print(f"{kind:<24}{row['file_mb']:>7.2f} MB file  {row['size'][0]}×{row['size'][1]} → "
              f"{row['kept'][0]}² kept  {row['seconds']:.2f} s  peak +{row['peak_growth_mb']:.0f} MB")
    schema.write(RESULTS / "decode_memory.json", schema.document(
        "benchmark/decode_memory", rows, config={"images": list(IMAGES)},
        threads=torch.get_num_threads()))


if __name__ == "__main__":
    main()
