"""Run by the front-door tests: a real leanvgg server (waitress) over the tiny VGG on 127.0.0.1.

Prints its port on stdout once it listens; stops on SIGTERM. Its memory is the test's subject,
so it runs in a process of its own.
"""

import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from leanvgg.compare import Settings  # noqa: E402
from leanvgg.service import ComparisonService  # noqa: E402
from leanvgg.store import Store  # noqa: E402
from leanvgg.variants import build_variants  # noqa: E402
from leanvgg.web import make_server  # noqa: E402
from tiny import tiny_baseline  # noqa: E402


def main(cache: str) -> None:
    variant_set = build_variants(tiny_baseline(), ["baseline", "res160"], store=Store(cache),
                                 progress=False)
    service = ComparisonService(settings=Settings(runs=1, warmup=0, threads=1),
                                variant_set=variant_set)
    server = make_server(service, port=0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(server.effective_port, flush=True)
    server.run()


if __name__ == "__main__":
    main(sys.argv[1])
