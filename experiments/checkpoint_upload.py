"""What checkpoints every N steps to S3 cost the training: asynchronous against synchronous upload.

Starts moto's S3 server on 127.0.0.1 (fake credentials, nothing leaves loopback) and runs
``python -m rayssl.train`` on the built-in scenes three times with the same settings and an
``s3://`` output: checkpoints only at the end (``none``), every ``--every`` steps uploaded
synchronously (``sync``), and the same uploaded asynchronously (``async``, the default). Prints
one JSON line per run (training images/s of the last epoch, which includes the checkpoints
written inside it, the time block's checkpoint seconds, the wall time) and, last, the ratios
against ``none``. The training images/s is rank 0's: steps and checkpoints inside the epoch,
not the end-of-epoch evaluation.

    python experiments/checkpoint_upload.py [--every 4] [--epochs 2] [--images 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _moto():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request
    from rayssl.dist import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=int, default=4, help="checkpoint every N steps (sync and async runs)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--images", type=int, default=512, help="built-in scenes per epoch")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "rayssl-bench", "AWS_SECRET_ACCESS_KEY": "rayssl-bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(env)
    server, url = _moto()
    try:
        import s3fs

        s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}).mkdir("rayssl-bench")
        results = {}
        with tempfile.TemporaryDirectory(prefix="rayssl-ckptbench-") as tmp:
            for mode in ("none", "sync", "async"):
                steps = [] if mode == "none" else ["--checkpoint-every-steps", str(args.every),
                                                   "--set", f"run.checkpoint_upload={mode}"]
                cmd = [sys.executable, "-m", "rayssl.train", "--output", f"s3://rayssl-bench/{mode}-{time.time_ns()}",
                       "--s3-endpoint", url, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                       "--checkpoint-every", str(args.epochs), "--keep-checkpoints", "2",
                       "--set", f"data.scenes_num_images={args.images}", "--set", "eval.num_test_images=0", *steps]
                t = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
                wall = time.perf_counter() - t
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr[-3000:])
                    raise SystemExit(f"{mode}: rayssl.train failed ({proc.returncode})")
                s = json.loads(proc.stdout.strip().splitlines()[-1])
                results[mode] = {"mode": mode, "images_per_s": s["images_per_s"], "steps": s["steps"],
                                 "checkpoint_s": s["time"].get("checkpoint_s"), "wall_s": round(wall, 1)}
                print(json.dumps(results[mode]), flush=True)
        base = results["none"]["images_per_s"]
        print(json.dumps({"every_steps": args.every,
                          "sync_over_none": round(results["sync"]["images_per_s"] / base, 3),
                          "async_over_none": round(results["async"]["images_per_s"] / base, 3)}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
