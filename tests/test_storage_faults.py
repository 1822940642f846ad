"""Storage faults stay survivable: through a fault-injecting proxy in front of moto, every
request kind is retried and counted, a stall is cut by the read timeout, a store that keeps
failing is a ``storage_error`` (never a corrupt image), a missing object is not retried.

Whole runs through the proxy (images, tar shards, Parquet shards with an S3 run directory,
checkpoints, resume, a checkpoint whose upload fails) are in tests/test_s3_data.py: its runs
on S3 all go through faults.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import image_bytes, make_tar
from faultproxy import FaultProxy, every
from rayssl import storage
from rayssl.data.tar import iter_tar_images
from rayssl.storage import S3Options
from rayssl.storage.retrying import RetryingS3FileSystem, fetch_objects, transient

BUCKET = "rayssl-faults"
# The client's read timeout where a stall is injected (it cuts the stall), and where an exact count
# of retries is asserted: 2 s, so that an answer of moto's on loopback late on a loaded machine is
# not cut and retried too (at 0.5 s a clean clone's CI once counted 3 retries for 2, 2026-12-07).
TIMEOUT_S = 2.0
FAST_TIMEOUT_S = 0.5  # where the counts are bounds only (the tar shard's many stalls)
STALL_S = 10.0  # a stall outlasts the read timeout by far, so "cut by the timeout" holds on a loaded machine


@pytest.fixture(scope="module")
def clean(s3_endpoint):
    """A filesystem straight to moto (no proxy), with the bucket made."""
    fs = storage.s3_filesystem(S3Options(endpoint=s3_endpoint))
    fs.mkdir(BUCKET)
    return fs


def _through(p: FaultProxy, max_retries: int = 4, timeout_s: float = TIMEOUT_S) -> RetryingS3FileSystem:
    return storage.s3_filesystem(S3Options(endpoint=p.url, timeout_s=timeout_s, max_retries=max_retries))


def _first(kind: str, method: str = "GET"):
    """A plan: the first ``method`` request of an object gets ``kind``; nothing else."""
    fired = []

    def plan(m, path, number):
        if m == method and not fired:
            fired.append(path)
            return kind
        return None
    return plan


# ----------------------------------------------------------------------------- no Ray


def test_the_filesystem_is_the_retrying_one_with_the_clients_loops_off(s3_endpoint):
    fs = storage.s3_filesystem(S3Options(endpoint=s3_endpoint, timeout_s=7, max_retries=3))
    assert isinstance(fs, RetryingS3FileSystem) and fs.max_retries == 3 and fs.retries == 1
    cfg = fs.config_kwargs
    assert cfg["connect_timeout"] == 7 and cfg["read_timeout"] == 7 and cfg["retries"]["max_attempts"] == 0


def test_transient_failures_are_told_from_permanent_ones():
    from botocore.exceptions import ClientError, ReadTimeoutError

    def client_error(status, code):
        return ClientError({"Error": {"Code": code, "Message": ""}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "GetObject")
    assert transient(client_error(503, "SlowDown")) and transient(client_error(500, "InternalError"))
    assert transient(client_error(429, "TooManyRequests")) and transient(client_error(400, "RequestTimeout"))
    assert not transient(client_error(404, "NoSuchKey")) and not transient(client_error(403, "AccessDenied"))
    assert transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    wrapped = OSError("s3fs wraps it")
    wrapped.__cause__ = client_error(503, "SlowDown")
    assert transient(wrapped)
    assert not transient(FileNotFoundError("bkt/x")) and not transient(ValueError("a bug"))


@pytest.mark.parametrize("kind", ["503", "500", "truncate", "stall", "stall_body"])
def test_each_fault_is_retried_once_and_the_bytes_are_whole(clean, fault_proxy, kind):
    data = bytes(range(256)) * 300
    clean.pipe(f"{BUCKET}/one/{kind}", data)
    p = fault_proxy(_first(kind), stall_s=STALL_S)
    fs = _through(p)
    t0 = time.monotonic()
    assert fs.cat_file(f"{BUCKET}/one/{kind}") == data
    assert p.injected == {kind: 1} and fs.retried == 1
    if kind.startswith("stall"):  # cut by the read timeout, not waited out
        assert time.monotonic() - t0 < STALL_S


def test_a_dropped_connection_is_survived(clean, fault_proxy):
    # aiohttp reconnects a dropped keep-alive connection itself, below the retry layer: the
    # bytes come back whole, and such a retry may not be counted.
    data = b"x" * 5000
    clean.pipe(f"{BUCKET}/one/drop", data)
    p = fault_proxy(_first("drop"))
    fs = _through(p)
    assert fs.cat_file(f"{BUCKET}/one/drop") == data and p.injected == {"drop": 1} and fs.retried <= 1


def test_a_store_that_keeps_failing_is_a_storage_error_and_a_missing_object_is_not_retried(clean, fault_proxy):
    clean.pipe({f"{BUCKET}/keep/ok": b"ok", f"{BUCKET}/keep/down": b"never served"})
    p = fault_proxy(lambda m, path, n: "503" if path.endswith("/down") else None)
    fs = _through(p, max_retries=2)
    blobs, counts = fetch_objects(fs, [f"{BUCKET}/keep/ok", f"{BUCKET}/keep/down", f"{BUCKET}/keep/missing"])
    assert blobs == [b"ok", None, None]
    # 1 attempt + 2 retries of the failing object; the missing one failed at once.
    assert counts == {"retried": 2, "skipped.storage_error": 1, "skipped.read_error": 1}
    assert p.injected == {"503": 3}


def test_ranged_reads_of_tar_shards_survive_every_fault(clean, fault_proxy):
    members = [(f"{i:03d}.png", image_bytes(i)) for i in range(12)]
    clean.pipe(f"{BUCKET}/tar/shard.tar", make_tar(members))
    want = [(name.rsplit(".", 1)[0], data) for name, data in members]
    p = fault_proxy(every(2, ("truncate", "503", "stall_body", "500", "stall", "drop"), methods=("GET",)))
    fs = _through(p, max_retries=6, timeout_s=FAST_TIMEOUT_S)
    with fs.open(f"{BUCKET}/tar/shard.tar", "rb", block_size=4096, cache_type="readahead") as f:
        got = [(key, data) for key, data in iter_tar_images(f)]
    assert got == want
    assert sum(p.injected.values()) >= 6 and fs.retried >= sum(p.injected.values()) - p.injected["drop"]


def test_writes_are_retried_whole_and_through_an_open_file(clean, fault_proxy):
    p = fault_proxy(every(1, ("503", "truncate", "500"), methods=("PUT", "POST")), budget=6)
    fs = _through(p)
    blob = bytes(range(256)) * 64
    fs.pipe(f"{BUCKET}/w/a", blob)
    # An open file writes by its own path (multipart parts and the final PUT): Ray Train's
    # checkpoint uploads and every text file of a run go that way. 5 MiB parts: 3 of them.
    big = np.random.default_rng(0).integers(0, 256, 11 << 20, dtype=np.uint8).tobytes()
    with fs.open(f"{BUCKET}/w/b", "wb", block_size=5 << 20) as f:
        f.write(big)
    assert clean.cat_file(f"{BUCKET}/w/a") == blob and clean.cat_file(f"{BUCKET}/w/b") == big
    # (A write's answer has no body to cut: "truncate" there is a dropped connection, which
    # aiohttp reopens itself, uncounted.)
    assert sum(p.injected.values()) == 6 and fs.retried >= p.injected["503"] + p.injected["500"] == 4


def test_a_failed_upload_inside_pyarrows_copy_is_recorded(clean, fault_proxy, tmp_path):
    # pyarrow.fs.copy_files (Ray Train's checkpoint upload) drops the error of closing a stream,
    # which is where a small S3 file is uploaded: the handler rayssl gives it records it.
    import pyarrow.fs as pafs

    from rayssl.storage.checked import take_write_failures

    for name in ("manifest.json", "model.pt", "rank_0.pt"):
        (tmp_path / name).write_bytes(name.encode() * 100)
    p = fault_proxy(lambda m, path, n: "503" if m == "PUT" and path.endswith("/model.pt") else None)
    take_write_failures()
    pafs.copy_files(str(tmp_path), f"{BUCKET}/ckpt", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=storage.pyarrow_filesystem(_through(p, max_retries=1)))
    assert sorted(clean.ls(f"{BUCKET}/ckpt")) == [f"{BUCKET}/ckpt/manifest.json", f"{BUCKET}/ckpt/rank_0.pt"]
    failed = take_write_failures()
    assert [path for path, _ in failed] == [f"{BUCKET}/ckpt/model.pt"] and transient(failed[0][1])
    assert take_write_failures() == [] and p.injected == {"503": 2}
