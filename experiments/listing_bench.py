"""How long an S3 prefix of many keys takes to list: s3fs's flat ``find`` (a request per
1,000 keys, one after another) against rayssl's ranged listing (``rayssl.storage.listing``,
what ``--data`` is listed with). Feeds docs/performance.md.

    python experiments/listing_bench.py [--layout folders|counted|hashed] [--folders 1000]
        [--per-folder 100] [--delay-s 0.05] [--repeats 3] [--pattern 'train/*/*.jpg']

With ``--pattern`` the two ways are fsspec's ``glob`` and rayssl's ``glob_files`` (what an
``s3://`` pattern given to ``--data`` is matched with) of that pattern below the bucket.

The store is a stand-in for S3's listing alone, on 127.0.0.1, in a process of its own: it
answers ListObjectsV2 (prefix, delimiter, start-after, continuation token, max-keys) from
FOLDERS x PER_FOLDER keys held sorted in memory, after holding each request DELAY_S, a store's
round trip. The keys (``--layout``): an ImageFolder's (``train/classNNNN/NNNNNN.jpg``), or as
many in one flat folder, named by counting up (``train/NNNNNNNN.jpg``) or by a hash
(``train/<16 hex digits>.jpg``). moto, which the tests use, scans and sorts the whole bucket
for every listing request, so there the server's CPU and not the client's order of requests
would be measured. Each way lists the prefix REPEATS times, alternated. Prints one JSON object:
the medians and every run, and the listing requests each way sent.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import multiprocessing
import statistics
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from faultproxy import use_test_credentials  # noqa: E402

BUCKET = "listing-bench"


def bench_keys(layout: str, folders: int, per_folder: int) -> list[str]:
    n = folders * per_folder
    if layout == "folders":
        return [f"train/class{f:04d}/{i:06d}.jpg" for f in range(folders) for i in range(per_folder)]
    if layout == "counted":
        return [f"train/{i:08d}.jpg" for i in range(n)]
    return [f"train/{hashlib.blake2b(str(i).encode(), digest_size=8).hexdigest()}.jpg" for i in range(n)]


class ListingStore:
    """ListObjectsV2 over sorted ``keys``, each answer after ``delay_s``, in a process of its own
    (started by ``serve``: its CPU is not the client's); ``requests`` counts them."""

    def __init__(self, keys: list[str], delay_s: float, counter):
        self.keys, self.delay_s, self.counter = sorted(keys), delay_s, counter

    @classmethod
    def serve(cls, layout: str, folders: int, per_folder: int, delay_s: float):
        """(the store's URL, its request counter, its process)."""
        ctx = multiprocessing.get_context("fork")
        counter, port = ctx.Value("l", 0), ctx.Queue()
        proc = ctx.Process(target=cls._run, args=(layout, folders, per_folder, delay_s, counter, port), daemon=True)
        proc.start()
        return f"http://127.0.0.1:{port.get(timeout=300)}", counter, proc

    @classmethod
    def _run(cls, layout, folders, per_folder, delay_s, counter, port) -> None:
        store = cls(bench_keys(layout, folders, per_folder), delay_s, counter)
        server = ThreadingHTTPServer(("127.0.0.1", 0), store._handler())
        server.daemon_threads = True
        port.put(server.server_address[1])
        server.serve_forever()

    def page(self, prefix: str, delimiter: str, after: str, limit: int) -> tuple[list[str], list[str], str | None]:
        """(keys, common prefixes, the marker to go on from or None) of one answer."""
        i = bisect.bisect_right(self.keys, after) if after else bisect.bisect_left(self.keys, prefix)
        keys, prefixes, last = [], [], None
        while i < len(self.keys) and self.keys[i].startswith(prefix) and len(keys) + len(prefixes) < limit:
            key = self.keys[i]
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                common = key[:cut + 1]
                prefixes.append(common)
                last = common + "\U0010ffff"  # past every key below the common prefix
                i = bisect.bisect_right(self.keys, last)
            else:
                keys.append(key)
                last = key
                i += 1
        more = i < len(self.keys) and self.keys[i].startswith(prefix)
        return keys, prefixes, last if more else None

    def _handler(self):
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart

            def log_message(self, *args):
                pass

            def do_GET(self):
                with store.counter.get_lock():
                    store.counter.value += 1
                time.sleep(store.delay_s)
                q = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}
                after = q.get("continuation-token") or q.get("start-after") or ""
                keys, prefixes, nxt = store.page(q.get("prefix", ""), q.get("delimiter", ""), after,
                                                 int(q.get("max-keys", 1000)))
                body = "".join(
                    [f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                     f'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>{BUCKET}</Name>'
                     f'<Prefix>{escape(q.get("prefix", ""))}</Prefix><KeyCount>{len(keys) + len(prefixes)}</KeyCount>'
                     f'<MaxKeys>{q.get("max-keys", 1000)}</MaxKeys>'
                     f'<IsTruncated>{"true" if nxt else "false"}</IsTruncated>']
                    + ([f"<NextContinuationToken>{escape(nxt)}</NextContinuationToken>"] if nxt else [])
                    + [f"<Contents><Key>{escape(k)}</Key><LastModified>2026-12-07T00:00:00.000Z</LastModified>"
                       f'<ETag>"0"</ETag><Size>1</Size><StorageClass>STANDARD</StorageClass></Contents>' for k in keys]
                    + [f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes]
                    + ["</ListBucketResult>"]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", choices=["folders", "counted", "hashed"], default="folders")
    p.add_argument("--folders", type=int, default=1000)
    p.add_argument("--per-folder", type=int, default=100)
    p.add_argument("--delay-s", type=float, default=0.05, help="each request's round trip")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pattern", default="", help="a glob pattern below the bucket: time globs, not listings")
    args = p.parse_args()

    use_test_credentials()
    n = args.folders * args.per_folder
    url, counter, proc = ListingStore.serve(args.layout, args.folders, args.per_folder, args.delay_s)
    from rayssl.data.sources import glob_files, list_files
    from rayssl.storage import S3Options, s3_filesystem

    try:
        fs = s3_filesystem(S3Options(endpoint=url))
        ways = {"flat_find": lambda: fs.find(f"{BUCKET}/train"), "ranged": lambda: list_files(fs, f"{BUCKET}/train")}
        if args.pattern:
            pattern = f"{BUCKET}/{args.pattern}"
            ways = {"fsspec_glob": lambda: [p for p, i in fs.glob(pattern, detail=True).items()
                                            if i["type"] != "directory"],
                    "glob_files": lambda: glob_files(fs, pattern)}
        runs: dict[str, list[float]] = {k: [] for k in ways}
        requests: dict[str, int] = {}
        matched: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, way in ways.items():
                fs.invalidate_cache()  # fsspec's glob keeps the folders it listed
                before = counter.value
                t = time.perf_counter()
                got = len(way())
                runs[name].append(round(time.perf_counter() - t, 2))
                requests[name] = counter.value - before
                matched[name] = got
                if got != (matched[next(iter(ways))] if args.pattern else n):
                    raise SystemExit(f"{name} listed {got} objects, not {n} (or as many as the other way)")
    finally:
        proc.terminate()
    med = {k: statistics.median(v) for k, v in runs.items()}
    slow, quick = med.values()  # fsspec's way, rayssl's
    print(json.dumps({"objects": n, "layout": args.layout, "pattern": args.pattern or None, "matched": matched,
                      "folders": args.folders, "delay_s": args.delay_s, "median_s": med, "runs_s": runs,
                      "listing_requests": requests, "flat_over_ranged": round(slow / quick, 2)}))


if __name__ == "__main__":
    main()
