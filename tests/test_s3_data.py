"""Data from object storage: sources, uncurated files, S3 outputs, against moto on loopback.

The S3 server is moto's ThreadedMotoServer on 127.0.0.1 (``s3_endpoint`` in conftest);
credentials are fake values set for the whole session (``aws_test_env``). End-to-end
runs are tiny (<= 96 images of 32 px, batch 32, 1 epoch, quick preset), and every one of them
reaches the store through a proxy that fails every third object request in one of six ways
(503, 500, a dropped connection, a cut body, a stall before or inside the body:
``tests/faultproxy.py``): their counts are a clean run's, plus the retries. The runs whose
subject is the data (an uncurated bucket, WebDataset shards) train in-process (``--num-workers
0``): their images still stream through Ray Data's tasks, which read the store with the run's
options; Ray Train workers reading and writing the store are the Parquet run's below and
tests/test_storage_travels.py's.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import exit_code, image_bytes, make_tar, tiny_args
from faultproxy import KINDS, every
from rayssl import storage
from rayssl.cli import train
from rayssl.checkpoint import MODEL_FILE, CheckpointError, verify_checkpoint_dir
from rayssl.cli import shards
from rayssl.eval.evaluate import EvalRequest, open_sources
from rayssl.data.sources import DataError, count_samples, expand_braces, resolve_source
from rayssl.data.tar import count_tar_images, index_tar_images, iter_tar_images, iter_tar_samples
from rayssl.storage import S3Options

# ----------------------------------------------------------------------------- helpers


def _fs(endpoint):
    return storage.s3_filesystem(S3Options(endpoint=endpoint))


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    fs = _fs(s3_endpoint)
    fs.mkdir("rayssl-data")
    return "rayssl-data"


def _summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _error(capsys, argv) -> str:
    assert exit_code(train.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def _tiny(output, data, *extra):
    # 2 x 32 + 2 x 16 crops of 32 px images; no kNN evaluation: these tests are about data.
    # A read that stalls is cut after 1 s (the proxy stalls for 1.5 s). tiny_args' test backbone:
    # checkpoints of 5 MB, not 100, go through the proxy.
    return tiny_args(output, "--data", data, "--preset", "quick", "--epochs", "1",
                     "--set", "data.crop_sizes=[32,16]", "--set", "data.crop_counts=[2,2]",
                     "--set", "data.min_scale=[0.3,0.1]", "--set", "data.max_scale=[1.0,0.3]",
                     "--set", "swav.num_prototypes=16", "--set", "eval.num_test_images=0",
                     "--set", "data.s3_timeout_s=1", *extra)


def _faulty_store(fault_proxy, refuse=None):
    """A proxy failing every third object request in turn in each of the six ways (no object
    more than twice: the client retries 4 times); ``refuse``
    (a mutable list holding a predicate on (method, path)) answers 503 to every request it
    matches, for as long as it is set."""
    transient = every(3, KINDS, per_path=2)

    def plan(method, path, number):
        if refuse and refuse[0] and refuse[0](method, path):
            return "503"
        return transient(method, path, number)
    return fault_proxy(plan, stall_s=1.5)


def _no_skips(data: dict) -> bool:
    return not any(k.startswith("skipped.") for k in data)


# ----------------------------------------------------------------------------- no Ray


def test_brace_expansion():
    assert expand_braces("s3://b/train-{000000..000002}.tar") == [
        "s3://b/train-000000.tar", "s3://b/train-000001.tar", "s3://b/train-000002.tar"]
    assert expand_braces("x{8..11}") == ["x8", "x9", "x10", "x11"]  # unpadded bounds stay unpadded
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad in ("x{3..1}", "x{1..2", "x{}"):
        with pytest.raises(DataError, match="data source"):
            expand_braces(bad)


def test_tar_reading_groups_members_by_key_and_streams():
    data = make_tar([("d/000.png", b"img0"), ("d/000.json", b"{}"), ("d/001.cls", b"3"),
                 ("d/001.jpg", b"img1"), ("d/001.png", b"second image of 001"), ("d/002.txt", b"no image")])
    assert list(iter_tar_images(io.BytesIO(data))) == [("000", b"img0"), ("001", b"img1")]
    samples = list(iter_tar_samples(io.BytesIO(data)))
    assert [s["__key__"] for s in samples] == ["000", "001", "002"] and samples[0]["json"] == b"{}"
    assert count_tar_images(io.BytesIO(data)) == 2

    class NoSeek(io.BytesIO):  # what a network stream looks like: reading must not seek
        def seek(self, *a):
            raise OSError("not seekable")

        def seekable(self):
            return False

    assert len(list(iter_tar_images(NoSeek(data)))) == 2
    # A truncated shard yields what precedes the damage, then raises.
    got = []
    with pytest.raises((tarfile.TarError, EOFError, OSError)):
        for item in iter_tar_images(io.BytesIO(data[:1536 + 100])):
            got.append(item)
    assert got == [("000", b"img0")]


def test_tar_index_addresses_the_bytes_the_stream_yields():
    """``index_tar_images`` (headers only) gives, per sample, the byte range of the image the
    streaming reader yields; a long member name (a PAX header before it) shifts the offsets."""
    long_dir = "x" * 120
    members = [("d/000.png", b"img0"), ("d/000.json", b"{}"), (f"{long_dir}/001.jpg", b"img1" * 300),
               ("d/001.png", b"second image of 001"), ("d/002.txt", b"no image"), ("d/003.webp", b"i3")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        folder = tarfile.TarInfo("d")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)  # not a file: passed over
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    data = buf.getvalue()
    index = index_tar_images(io.BytesIO(data))
    streamed = list(iter_tar_images(io.BytesIO(data)))
    assert [k for k, _, _ in index] == [k for k, _ in streamed] == ["000", "001", "003"]
    assert [data[o:o + n] for _, o, n in index] == [b for _, b in streamed]
    # Cut inside 001's data: the header index stops where the stream does, keeping what came before.
    cut = index[1][1] + 10
    kept: list = []
    with pytest.raises(tarfile.ReadError, match="truncated"):
        index_tar_images(io.BytesIO(data[:cut]), kept)
    assert [k for k, _, _ in kept] == ["000"]
    # Byte ranges need an uncompressed tar.
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb") as z:
        z.write(data)
    with pytest.raises(tarfile.ReadError):
        index_tar_images(io.BytesIO(gz.getvalue()))


def test_resolve_kinds_and_clear_errors(s3_endpoint, bucket):
    fs = _fs(s3_endpoint)
    opts = S3Options(endpoint=s3_endpoint)
    fs.pipe({f"{bucket}/kinds/img/a/{i}.png": image_bytes(i) for i in range(3)})
    fs.pipe(f"{bucket}/kinds/img/labels.csv", b"id,classes\n0,x\n")  # ignored: not an image
    fs.pipe({f"{bucket}/kinds/tar/train-{i:03d}.tar": make_tar([(f"{i}.png", image_bytes(i))]) for i in range(3)})
    fs.pipe(f"{bucket}/kinds/mixed/x.png", image_bytes(0))
    fs.pipe(f"{bucket}/kinds/mixed/y.tar", make_tar([]))

    src = resolve_source(f"s3://{bucket}/kinds/img", opts)
    assert src.kind == "images" and len(src.paths) == 3 and all(p.endswith(".png") for p in src.paths)
    tars = resolve_source(f"s3://{bucket}/kinds/tar/", opts)
    assert tars.kind == "webdataset" and tars.manifest is None
    assert count_samples(tars) == 3  # no manifest: counted from the tar headers over S3
    # Anonymous (unsigned) requests go through the same code; moto serves them like a public bucket.
    assert len(resolve_source(f"s3://{bucket}/kinds/img", S3Options(s3_endpoint, anonymous=True)).paths) == 3
    pattern = resolve_source(f"s3://{bucket}/kinds/tar/train-{{000..002}}.tar", opts)
    assert pattern.kind == "webdataset" and [p.rsplit("/", 1)[1] for p in pattern.paths] == [
        "train-000.tar", "train-001.tar", "train-002.tar"]
    assert resolve_source(f"s3://{bucket}/kinds/img/a/1.png", opts).paths == [f"{bucket}/kinds/img/a/1.png"]

    def err(uri):
        with pytest.raises(DataError) as exc:
            resolve_source(uri, opts)
        msg = str(exc.value)
        assert "\n" not in msg and uri in msg
        return msg

    assert "prefix is empty or does not exist" in err(f"s3://{bucket}/nothing-here")
    assert "bucket 'no-such-bucket' does not exist" in err("s3://no-such-bucket/images")
    assert "1 of 4 files do not exist" in err(f"s3://{bucket}/kinds/tar/train-{{000..003}}.tar")
    assert "mixes kinds" in err(f"s3://{bucket}/kinds/mixed")
    # Nothing listening on the endpoint: a one-line error naming the endpoint, quickly.
    with pytest.raises(DataError, match="cannot reach the S3 endpoint http://127.0.0.1:9"):
        resolve_source(f"s3://{bucket}/kinds/img", S3Options(endpoint="http://127.0.0.1:9"))


def test_tar_members_on_s3_are_fetched_by_byte_range(s3_endpoint, bucket):
    """What CDUL's labelling job and training do with tar shards on S3: index the members from
    the headers (``scan_tar_shards``), then fetch and decode each by its byte range; a shard
    that is not a tar counts as damaged and contributes nothing."""
    from rayssl.data.indexed import fetch_decode_count
    from rayssl.data.tar import scan_tar_shards

    fs = _fs(s3_endpoint)
    images = {f"{i:03d}": image_bytes(7 + i, size=24) for i in range(5)}
    keys = list(images)
    fs.pipe(f"{bucket}/ranged/a.tar", make_tar([(f"{k}.png", images[k]) for k in keys[:3]]))
    fs.pipe(f"{bucket}/ranged/b.tar", make_tar([(f"{k}.png", images[k]) for k in keys[3:]] + [("bad.png", b"junk")]))
    fs.pipe(f"{bucket}/ranged/c.tar", b"not a tar at all" * 100)
    paths = [f"{bucket}/ranged/{n}.tar" for n in "abc"]
    rows, damaged = scan_tar_shards(fs, paths)
    assert damaged == 1 and [r[1] for r in rows] == keys + ["bad"]
    good = fetch_decode_count([r[0] for r in rows], fs=fs, min_side=8, starts=[r[2] for r in rows],
                              ends=[r[2] + r[3] for r in rows])
    assert [i for i, _ in good] == list(range(5))  # "bad" does not decode
    for (i, img), key in zip(good, keys):
        assert np.array_equal(img, np.asarray(Image.open(io.BytesIO(images[key])).convert("RGB")))


def test_parquet_image_column_is_checked(s3_endpoint, bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = _fs(s3_endpoint)
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["a"], "jpeg": pa.array([image_bytes(0)], pa.binary())}), buf)
    fs.pipe(f"{bucket}/pqcol/part-0.parquet", buf.getvalue())
    uri = f"s3://{bucket}/pqcol"
    with pytest.raises(DataError, match=r"no column 'image' \(columns: key, jpeg\)"):
        resolve_source(uri, S3Options(endpoint=s3_endpoint))
    assert resolve_source(uri, S3Options(endpoint=s3_endpoint), image_column="jpeg").kind == "parquet"


def test_storage_text_files_honour_endpoint_option_and_env(s3_endpoint, bucket, monkeypatch):
    opts = S3Options(endpoint=s3_endpoint)
    uri = f"s3://{bucket}/store/run/config.yaml"
    assert not storage.exists(uri, opts)
    storage.write_text(uri, "a: 1\n", opts)
    assert storage.exists(uri, opts) and storage.read_text(uri, opts) == "a: 1\n"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # the standard variable, read where a command starts
    resolved = S3Options.resolved()
    assert resolved.endpoint == s3_endpoint and storage.read_text(uri, resolved) == "a: 1\n"
    storage_path, name, fs = storage.run_location(f"s3://{bucket}/store/run", resolved)
    assert (storage_path, name) == (f"{bucket}/store", "run") and fs is not None


def test_missing_prefix_and_refused_credentials_fail_before_training(s3_endpoint, bucket, capsys, tmp_path):
    from moto.core.authorization import enable_iam_authentication

    uri = f"s3://{bucket}/does/not/exist"
    msg = _error(capsys, ["--data", uri, "--s3-endpoint", s3_endpoint, "--output", str(tmp_path / "a")])
    assert uri in msg and "empty or does not exist" in msg

    _fs(s3_endpoint).pipe(f"{bucket}/private/0.png", image_bytes(0))
    uri = f"s3://{bucket}/private"
    with enable_iam_authentication():  # moto now checks keys: ours are unknown to it
        msg = _error(capsys, ["--data", uri, "--s3-endpoint", s3_endpoint, "--output", str(tmp_path / "b")])
    assert uri in msg and "access denied (InvalidAccessKeyId)" in msg
    assert "rayssl-test-secret" not in msg and "rayssl-test-key" not in msg
    assert not (tmp_path / "b").exists()  # nothing started


# ----------------------------------------------------------------------------- on Ray


def test_bucket_of_uncurated_images_trains_and_counts_exactly(ray_session, s3_endpoint, bucket, tmp_path, capsys,
                                                              fault_proxy):
    fs = _fs(s3_endpoint)
    prefix = f"{bucket}/uncurated"
    files = {f"{prefix}/good/{i:03d}.png": image_bytes(i) for i in range(60)}
    files.update({f"{prefix}/good/{i:03d}.jpg": image_bytes(i, fmt="JPEG") for i in range(60, 64)})
    jpeg = image_bytes(999, fmt="JPEG")
    files.update({
        f"{prefix}/bad/corrupt.jpg": jpeg[:200] + bytes(range(256)) * 4,  # header, then garbage
        f"{prefix}/bad/zero.jpg": b"",
        f"{prefix}/bad/notes.png": b"this is a text file, not an image\n",
        f"{prefix}/odd/gray.png": image_bytes(7, mode="L"),
        f"{prefix}/odd/tiny.png": image_bytes(8, size=16),  # smaller than the 32 px crops
        f"{prefix}/README.txt": b"not listed: no image extension",
    })
    # Labelled images of the user's beside it, one unreadable: scored at the end (issue 23), read
    # through the same faulty store with the run's storage options.
    labelled = {f"{bucket}/labelled/{i:03d}.png": image_bytes(100 + i) for i in range(30)}
    labelled[f"{bucket}/labelled/broken.png"] = b"\x89PNG but no more"
    labels = "id,classes\n" + "".join(f"{i:03d},{'abc'[i % 3]}\n" for i in range(30)) + "broken,a\n"
    fs.pipe({**files, **labelled, f"{bucket}/labelled.csv": labels.encode()})
    proxy = _faulty_store(fault_proxy)
    assert train.main(_tiny(tmp_path / "run", f"s3://{prefix}", "--s3-endpoint", proxy.url,
                            "--eval-data", f"s3://{bucket}/labelled", "--eval-labels", f"s3://{bucket}/labelled.csv",
                            "--set", "eval.knn_k=5", "--num-workers", "0")) == 0
    s = _summary(capsys)
    assert s["eval_data"] == f"s3://{bucket}/labelled" and 0 <= s["knn_top1"] <= 1
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "step"' not in line]
    assert row["eval_images"] == 30 and row["eval_skipped_images"] == 1 and row["knn_top1"] == s["knn_top1"]
    # The broken files are the only skips: no image lost to a fault, none counted as corrupt.
    assert s["data"].pop("retried") > 0 and set(proxy.injected) == set(KINDS)
    assert s["data"] == {"seen": 69, "skipped.decode_error": 2, "skipped.empty": 1, "skipped.too_small": 1,
                         "converted.grayscale": 1}
    assert s["steps"] == 69 // 32 and s["images_seen"] == 64
    stored = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {k: v for k, v in stored["data"].items() if k != "retried"} == s["data"]


def test_mostly_broken_data_stops_with_the_counts(ray_session, tmp_path):
    from rayssl.config import Config
    from rayssl.data.pipeline import build_train_data
    from rayssl.runtime.errors import data_error_message

    for i in range(70):
        (tmp_path / f"{i:03d}.jpg").write_bytes(b"<html>404</html>")
    for i in range(4):
        (tmp_path / f"ok{i}.png").write_bytes(image_bytes(i))
    cfg = Config.from_dict({"data": {"source": str(tmp_path), "crop_sizes": [32, 16], "crop_counts": [2, 2],
                                     "min_scale": [0.3, 0.1], "max_scale": [1.0, 0.3]}})
    data = build_train_data(cfg.data, cfg.run.seed)
    with pytest.raises(Exception) as exc:
        for _ in data.dataset.iter_batches(batch_size=8):
            pass
    # The one line the driver reports, found inside Ray's wrapping of the task error.
    msg = data_error_message(exc.value)
    assert f"images in {tmp_path} were unusable" in msg
    assert "decode_error=" in msg and "more than data.max_bad_fraction=0.5" in msg
    seen, bad = (int(x) for x in re.match(r"(\d+) of (\d+)", msg).groups()[::-1])
    assert seen >= 64 and bad > seen / 2


def test_shards_without_a_manifest_are_counted_once_or_numbered_by_the_user(ray_session, s3_endpoint, bucket,
                                                                             tmp_path, capsys, monkeypatch):
    """A user's tar shards with no manifest.json: their images are counted from the tar headers
    (a ranged read per image on S3), said before it starts, once per listing (a sweep's trials
    share it); ``data.shard_images`` skips the count, and sizes the epoch in its place."""
    import rayssl.data.sources as sources
    from rayssl.data.pipeline import build_train_data, resolve_data_source
    from rayssl.sections import DataSection

    fs = _fs(s3_endpoint)
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 60)).save(jpeg, format="JPEG")
    for k, n in enumerate((20, 24, 20)):
        fs.pipe(f"{bucket}/user-shards/part-{k}.tar",
                make_tar([(f"{k}-{i:03d}.jpg", jpeg.getvalue()) for i in range(n)]))
    uri = f"s3://{bucket}/user-shards/"
    d = DataSection(source=uri, s3_endpoint=s3_endpoint, crop_sizes=[32, 16], crop_counts=[2, 2])
    source, told = resolve_data_source(d), []
    assert build_train_data(d, 0, source=source, announce=told.append).num_images == 64
    assert told == [f"counting the images of 3 webdataset shard(s) of {uri} from their tar headers (no manifest.json "
                    "lists them); set data.shard_images to their number to skip the count"]

    def unread(*args):
        raise AssertionError("a shard was read to count its images")

    monkeypatch.setattr(sources, "index_shard", unread)
    assert build_train_data(d, 0, source=source, announce=told.append).num_images == 64 and len(told) == 1
    numbered = DataSection(source=uri, s3_endpoint=s3_endpoint, crop_sizes=[32, 16], crop_counts=[2, 2],
                           shard_images=128)
    assert build_train_data(numbered, 0, announce=told.append).num_images == 128 and len(told) == 1
    # A run told 128 images trains 4 steps an epoch at most; the 64 there end each epoch at 2.
    assert train.main(_tiny(tmp_path / "run", uri, "--s3-endpoint", s3_endpoint, "--num-workers", "0",
                            "--epochs", "2", "--set", "data.shard_images=128")) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert "128 images, 4 steps/epoch x 2 epochs" in captured.err and "counting the images" not in captured.err
    assert summary["steps"] == 4 and summary["data"] == {"seen": 128}
    # An image folder's listing counts it: the setting is refused there, before training.
    fs.pipe(f"{bucket}/user-images/a.jpg", jpeg.getvalue())
    assert "data.shard_images: s3://" in _error(capsys, _tiny(tmp_path / "r2", f"s3://{bucket}/user-images/",
                                                             "--s3-endpoint", s3_endpoint,
                                                             "--set", "data.shard_images=5"))


def test_webdataset_shards_on_s3_train(ray_session, s3_endpoint, bucket, tmp_path, capsys, fault_proxy):
    out = f"s3://{bucket}/wds"
    assert shards.main(["--source", "scenes", "--out", out, "--format", "webdataset", "--shard-size", "32",
                        "--num-scenes", "96", "--scene-size", "32", "--s3-endpoint", s3_endpoint]) == 0
    capsys.readouterr()
    data = f"{out}/train-{{000000..000002}}.tar"
    # The scenes' labels table beside the shards, found through their manifest, as rayssl eval --data reads it.
    labelled = open_sources(EvalRequest(data=data), S3Options(endpoint=s3_endpoint)).train
    assert labelled.labels_uri == f"{out}/train-labels.csv" and len(labelled.labels) == 96
    proxy = _faulty_store(fault_proxy)
    assert train.main(_tiny(tmp_path / "run", data, "--s3-endpoint", proxy.url, "--num-workers", "0")) == 0
    s = _summary(capsys)
    # Shards stream by range reads: a fault mid-shard is retried at its offset, no image lost.
    assert s["steps"] == 3 and s["data"].pop("retried") > 0 and s["data"] == {"seen": 96}


def test_parquet_shards_with_s3_output_and_resume(ray_session, s3_endpoint, bucket, tmp_path, capsys,
                                                  monkeypatch, fault_proxy):
    out = f"s3://{bucket}/pq"
    assert shards.main(["--source", "scenes", "--out", out, "--format", "parquet", "--shard-size", "32",
                        "--num-scenes", "64", "--scene-size", "32", "--s3-endpoint", s3_endpoint]) == 0
    capsys.readouterr()
    # Endpoint from the standard environment variable only: data, config, summary, checkpoints
    # -- all through the faulty store.
    refuse: list = [None]
    proxy = _faulty_store(fault_proxy, refuse)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    run = f"s3://{bucket}/runs/pq"
    assert train.main(_tiny(run, out)) == 0
    s1 = _summary(capsys)
    # (Parquet is read by Ray Data's own read tasks: retried through the same filesystem, not counted.)
    assert s1["steps"] == 2 and _no_skips(s1["data"]) and s1["data"]["seen"] == 64
    assert s1["checkpoint"].startswith(f"s3://{bucket}/runs/pq/checkpoint_")
    fs = _fs(s3_endpoint)
    assert fs.exists(f"{bucket}/runs/pq/config.yaml") and fs.exists(f"{bucket}/runs/pq/summary.json")
    # Written by Ray Train's controller, whose own environment names another endpoint.
    assert fs.exists(f"{bucket}/runs/pq/metrics.jsonl") and fs.exists(f"{bucket}/runs/pq/curves.png")
    assert fs.find(s1["checkpoint"].split("://", 1)[1])  # checkpoint files are in the bucket
    first = s1["checkpoint"].rsplit("/", 1)[1]

    # The store now refuses every write of a newer checkpoint's model.pt: its upload fails after
    # the retries and the run stops; what else of that checkpoint landed is never complete.
    refuse[0] = lambda method, path: (method in ("PUT", "POST") and path.split("?")[0].endswith(f"/{MODEL_FILE}")
                                      and first not in path)
    # The epoch-2 checkpoint uploads asynchronously (epoch 3 trains meanwhile): its failure stops the run.
    assert train.main(["--output", run, "--resume", "--epochs", "3", "--max-failures", "0"]) != 0
    err = capsys.readouterr().err
    assert "a checkpoint did not reach the store: writing" in err and "--resume once fixed" in err
    assert proxy.injected["503"] >= 5  # the first attempt and its 4 retries
    # (Ray Train copies a checkpoint's files in name order: the manifest lands, model.pt does not.)
    partial = sorted(d for d in fs.ls(f"{bucket}/runs/pq") if "/checkpoint_2" in d and first not in d)
    # The epoch-2 one; and the epoch-3 one, when the epoch-2 upload was still retrying as epoch 3
    # ended (the failure is then found after the last checkpoint's own refused upload).
    assert 1 <= len(partial) <= 2 and all(fs.exists(f"{d}/manifest.json") for d in partial)
    for d in partial:
        with pytest.raises(CheckpointError):
            verify_checkpoint_dir(d, fs=fs)

    # Resumed again through the (still faulty) store: the run goes on from the epoch-1
    # checkpoint, and its counts are a clean run's.
    refuse[0] = None
    assert train.main(["--output", run, "--resume", "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    s2 = json.loads(captured.out.strip().splitlines()[-1])
    assert any(f"skipping incomplete checkpoint s3://{d}" in captured.err for d in partial)
    # (From the epoch-1 checkpoint: its counts carried, below. The workers' own "resumed from"
    # line reaches this process through Ray's log forwarding, which may still hold it.)
    assert s2["epochs"] == 2 and s2["steps"] == 4 and s2["checkpoint"] not in [s1["checkpoint"], *partial]
    assert _no_skips(s2["data"]) and s2["data"]["seen"] == 128  # the first epoch's 64 carried over the resume
    assert json.loads(fs.cat_file(f"{bucket}/runs/pq/summary.json"))["steps"] == 4
