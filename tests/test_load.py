"""The short version of benchmarks/load_test.py: a real server, concurrent clients, a time limit."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import load_test  # noqa: E402


def test_short_load_serves_everything_without_5xx(variant_set, cache_dir):
    # two variants, one of them compiled, keep the server's warm-up short; the threads and the
    # runtime the session cache was built for, so the server loads and converts nothing
    # (converting for ONNX Runtime/OpenVINO during the load grew its memory, not the load)
    result = load_test.run(clients=6, seconds=15, home=str(cache_dir),
                           variants="res160,int8_static", threads=1, runtime="inductor")
    assert result["dropped"] == 0 and result["server_errors"] == 0
    statuses = result["by_status"]
    assert statuses.get("photo 200", 0) >= 1
    # bad uploads are refused before they queue, so only the photo can meet a full queue
    assert set(statuses) <= {"photo 200", "photo 503", "text 415", "truncated 400", "empty 400"}
    assert statuses.get("text 415", 0) >= 1 and statuses.get("truncated 400", 0) >= 1
    assert result["rss_mb"]["end"] < 1.5 * result["rss_mb"]["start"]
    assert result["server_exit_code"] == 0
