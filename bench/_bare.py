"""The floor for an unthrottled client, as a program of its own: `python _bare.py URL KEY DATASET OUTPUT [THREADS]`.

THREADS (16) threads share one `httpx.Client`; each posts a file of DATASET (every file, sorted) as the API
document's example does and writes the answer to OUTPUT; nothing else (no inventory, hashing, manifest,
retries or rate guard). Prints a JSON summary. Run as a script (not `-m`): it imports only httpx, so its
start-up is what a bare loop's would be.
"""

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

API_PATH = "/portrait-surface-normals/v1"


def main() -> int:
    url, key, dataset, output, *rest = sys.argv[1:]
    threads = int(rest[0]) if rest else 16
    paths = sorted(path for path in Path(dataset).iterdir() if path.is_file())
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    limits = httpx.Limits(max_connections=threads, max_keepalive_connections=threads)

    def one(path: Path) -> int:
        response = client.post(
            url + API_PATH,
            files={"image_file": (path.name, path.read_bytes(), "image/jpeg")},
            headers={"x-api-key": key},
        )
        response.raise_for_status()
        (out / f"{path.stem}.jpg").write_bytes(response.content)
        return response.status_code

    with httpx.Client(limits=limits, timeout=60) as client, ThreadPoolExecutor(threads) as pool:
        started_at, started = time.time(), time.perf_counter()
        codes = list(pool.map(one, paths))
        loop_s = time.perf_counter() - started
    summary = {"images": len(paths), "ok": codes.count(200), "threads": threads, "loop_s": loop_s}
    print(json.dumps({**summary, "started_at": started_at, "ended_at": time.time()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
