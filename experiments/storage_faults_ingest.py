"""Ingest through a faulty store: what the retry path costs.

Starts moto's S3 server on 127.0.0.1, writes the built-in scenes there as JPEG files, and runs
``python -m rayssl.bench --only ingest`` against it through the tests' fault-injecting proxy
(``tests/faultproxy.py``), first with no faults, then with a given fraction of the object
requests failing (503, 500, cut bodies, stalls longer than the read timeout, in turn). Prints
one JSON line per setting: images/s, the faults injected, the proxy's request count.

    python experiments/storage_faults_ingest.py [--images 1024] [--fault-rate 0.05] [--seconds 20]

Loopback only; fake credentials are set for this process and its children.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from faultproxy import FaultProxy, moto_on_loopback, use_test_credentials  # noqa: E402

BUCKET = "faults-bench"
KINDS = ("503", "500", "truncate", "stall", "stall_body")


def rate_plan(rate: float, kinds=KINDS):
    """Every round(1/rate)-th GET of an object gets the next fault kind in turn."""
    if rate <= 0:
        return lambda method, path, number: None
    k = max(1, round(1 / rate))
    count = {"n": 0}

    def plan(method, path, number):
        if method != "GET" or number % k:
            return None
        count["n"] += 1
        return kinds[(count["n"] - 1) % len(kinds)]
    return plan


def ingest(endpoint: str, seconds: float, timeout_s: float) -> dict:
    # Ray Data alone: the DataLoader baseline's reads would add to the faults the proxy injects.
    cmd = [sys.executable, "-m", "rayssl.bench", "--only", "ingest", "--skip", "dataloader",
           "--data", f"s3://{BUCKET}/scenes", "--s3-endpoint", endpoint, "--ingest-seconds", str(seconds),
           "--set", f"data.s3_timeout_s={timeout_s}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--fault-rate", type=float, default=0.05)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--kinds", default=",".join(KINDS), help=f"fault kinds, in turn (default {','.join(KINDS)})")
    p.add_argument("--timeout-s", type=float, default=1.0, help="data.s3_timeout_s (a stall lasts 1.5x)")
    args = p.parse_args()

    use_test_credentials()
    with moto_on_loopback() as upstream:
        from rayssl import storage
        from rayssl.storage import S3Options

        fs = storage.s3_filesystem(S3Options(endpoint=upstream))
        fs.mkdir(BUCKET)
        scenes = Path(tempfile.mkdtemp(prefix="faults-bench-")) / "scenes"
        subprocess.run([sys.executable, "-m", "rayssl.data.scenes", "--out", str(scenes), "--n", str(args.images),
                        "--format", "jpg"], cwd=REPO, check=True, capture_output=True)
        fs.put(f"{scenes}/", f"{BUCKET}/scenes/", recursive=True)
        shutil.rmtree(scenes.parent)
        for rate in (0.0, args.fault_rate):
            proxy = FaultProxy(upstream, rate_plan(rate, tuple(args.kinds.split(","))), stall_s=1.5 * args.timeout_s).start()
            try:
                result = ingest(proxy.url, args.seconds, args.timeout_s)
            finally:
                proxy.stop()
            print(json.dumps({"fault_rate": rate, "ingest": result.get("ingest"),
                              "injected": dict(proxy.injected), "object_requests": proxy.requests}), flush=True)


if __name__ == "__main__":
    main()
