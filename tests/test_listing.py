"""An S3 prefix is listed in key ranges side by side (``rayssl.storage.listing``): the same
objects as s3fs's own flat ``find``, the requests at once rather than one after another."""

from __future__ import annotations

import pytest

from rayssl.data.sources import list_files, resolve_source
from rayssl.storage import S3Options, filesystem
from rayssl.storage import listing
from rayssl.storage.listing import cut_points, folder_cuts, list_objects

# Folders, files beside them, nested folders, folder markers (keys ending in "/"), a file and a
# folder of one name, and names that sort between a folder and its files ("a-b" < "a/" < "a0").
LAYOUT = {"top.png": b"1", "a/1.png": b"12", "a/2.png": b"123", "a/deep/3.png": b"1", "a-b.png": b"1",
          "a0/7.png": b"1", "c/": b"", "c/4.png": b"1", "d/": b"", "e": b"file-and-folder", "e/5.png": b"1",
          "e-/8.png": b"1", "f/g/h/6.png": b"1", "z.png": b"1", **{f"m{i:02d}/{i}.jpg": b"x" * i for i in range(24)}}
# One flat folder: names counting up, hashes, and a few of other shapes ("Z" sorts before "a").
FLAT = {**{f"{i:05d}.jpg": b"c" for i in range(40)},
        **{f"{(i * 2654435761) % 16**6:06x}.jpg": b"hh" for i in range(40)},
        "Zebra.jpg": b"z", "x-1.jpg": b"x", "x.jpg": b"x", "~tilde.jpg": b"t"}


def test_cut_points_cut_the_part_after_a_key_at_its_shortest_head():
    hexdigits = "0123456789abcdef"
    # hashed names: the first character after the prefix, every one above the key's
    assert cut_points("p/0af.jpg", None, "p/", hexdigits) == [f"p/{c}" for c in "123456789abcdef"]
    # names counting up, the part bounded by p/1: nothing fits one character after the prefix, so two
    assert cut_points("p/00999.jpg", "p/1", "p/", hexdigits) == [f"p/0{c}" for c in "123456789abcdef"]
    assert cut_points("p/0af", "p/0c", "p/", hexdigits) == ["p/0b"]  # strictly below the bound
    assert cut_points("p/0", None, "p/", hexdigits, most=4) == ["p/1", "p/4", "p/8", "p/c"]  # evenly spread
    assert cut_points("p/za", "p/zaa", "p/", "abc") == []  # nothing between
    assert cut_points("p/z", None, "p/", "cab") == ["p/za", "p/zb", "p/zc"]  # after the whole key
    # names of characters above all the first page's: only slivers just after the key, unless cut short
    assert cut_points("p/zzz9", None, "p/", "0123456789.") == ["p/zzz9" + c for c in ".0123456789"]
    assert cut_points("p/zzz9", None, "p/", "0123456789.", deepest=len("p/zzz")) == []


def test_every_cut_is_strictly_inside_the_part_and_in_order():
    import random

    rng = random.Random(0)
    chars = "/.-_0123456789abcdefXYZ"
    for _ in range(2000):
        a, b = sorted("k/" + "".join(rng.choice(chars) for _ in range(rng.randint(1, 6))) for _ in range(2))
        high = None if rng.random() < 0.3 else b
        if high == a:
            continue
        cuts = cut_points(a, high, "k/", rng.sample(chars, rng.randint(1, len(chars))), most=rng.randint(1, 9))
        assert cuts == sorted(set(cuts)) and all(a < c and (high is None or c < high) for c in cuts)
        assert all(c.startswith("k/") for c in cuts)


def test_folder_cuts_are_folders_spread_evenly_without_their_slash():
    folders = [f"p/{c}/" for c in "hgfedcba"]
    assert folder_cuts(folders, 3) == ["p/c", "p/f"]  # 2 cuts: 3 parts of the 8 sorted folders
    assert folder_cuts(folders, 64) == [f"p/{c}" for c in "bcdefgh"]  # at most one a folder
    assert folder_cuts(["p/a/"], 64) == [] and folder_cuts(folders, 1) == []


@pytest.fixture(scope="module")
def store(s3_endpoint):
    fs, _ = filesystem("s3://listing", S3Options(endpoint=s3_endpoint))
    fs.mkdir("listing")
    fs.pipe({f"listing/r/{k}": v for k, v in LAYOUT.items()})
    fs.pipe({"listing/r/": b"", "listing/r2/x.png": b"1", "listing/rr/9.png": b"1"})  # beside the prefix
    fs.pipe({f"listing/flat/{i:03d}.tar": b"t" for i in range(5)})
    fs.pipe({f"listing/many/{k}": v for k, v in FLAT.items()})
    return fs


@pytest.fixture
def pages_of_4(monkeypatch):
    """Listing pages of 4 keys (S3's 1,000 in use), so that a small layout takes several; parts cut at
    folders of a page or more (of 8 in use), split after their first page (their second in use)."""
    monkeypatch.setattr(listing, "PAGE", 4)
    monkeypatch.setattr(listing, "RANGE_PAGES", 1)
    monkeypatch.setattr(listing, "SPLIT_AFTER", 1)


def _find(fs, path: str) -> dict[str, int]:
    return {p: int(i["size"]) for p, i in fs.find(path, detail=True).items()}


@pytest.mark.parametrize("concurrency", [1, 2, 3, 16])
@pytest.mark.parametrize("most_cuts", [2, 3, 64])
def test_parts_list_what_a_flat_find_lists(store, pages_of_4, monkeypatch, concurrency, most_cuts):
    monkeypatch.setattr(listing, "MOST_CUTS", most_cuts)
    expected = _find(store, "listing/r")
    assert len(expected) == len(LAYOUT) + 1  # and the prefix's own marker; nothing of r2/ or rr/
    assert list_objects(store, "listing/r", concurrency=concurrency) == expected
    assert list_objects(store, "listing/r/", concurrency=concurrency) == expected
    assert list_objects(store, "listing/many", concurrency=concurrency) == _find(store, "listing/many")
    assert len(_find(store, "listing/many")) == len(FLAT)
    assert list_objects(store, "listing/nothing") == {}


def test_parts_are_listed_at_once_and_a_prefix_of_one_page_in_one_request(store, fault_proxy, pages_of_4,
                                                                          monkeypatch):
    proxy = fault_proxy(None, delay_s=0.2)  # a round trip of 200 ms for every request
    fs, _ = filesystem("s3://listing", S3Options(endpoint=proxy.url))
    monkeypatch.setattr(listing, "MOST_CUTS", 8)
    monkeypatch.setattr(listing, "SPLIT_AFTER", 10**9)  # the folders' parts alone, none split
    assert list_objects(fs, "listing/r", concurrency=4) == _find(store, "listing/r")
    # The first page; the listing with a delimiter (31 folders and 5 keys beside them, 9 pages of 4);
    # then 8 parts of 4-8 keys, 4 at a time, each ending with the page that goes past it (2-3 pages).
    assert proxy.most_listings_at_once == 4 and 1 + 9 + 8 * 2 <= proxy.listings <= 1 + 9 + 8 * 3
    before = proxy.listings
    assert sorted(list_objects(fs, "listing/flat")) == [f"listing/flat/{i:03d}.tar" for i in range(5)]
    assert proxy.listings - before == 1 + 1  # no folders: on from the first page
    before = proxy.listings
    assert list_objects(fs, "listing/r/a/deep") == {"listing/r/a/deep/3.png": 1}
    assert proxy.listings - before == 1  # a page's worth: the first request was all of it


def test_a_flat_folder_is_split_as_it_is_listed(store, fault_proxy, pages_of_4):
    """No folders to cut at: the part after the first page is split at the characters of its names."""
    proxy = fault_proxy(None, delay_s=0.2)
    fs, _ = filesystem("s3://listing", S3Options(endpoint=proxy.url))
    assert list_objects(fs, "listing/many", concurrency=4) == _find(store, "listing/many")
    pages = -(-len(FLAT) // 4)
    # side by side; each part's pages, one past its end where it ends inside a page, one for an empty part
    assert proxy.most_listings_at_once == 4 and pages < proxy.listings <= 3 * pages


def test_a_listing_of_few_pages_goes_on_from_its_first_page(store, fault_proxy, pages_of_4, monkeypatch):
    """Each part cut at folders reads up to a page past its end, so they are of ``RANGE_PAGES`` pages
    or more, reckoned from the first page: here its 8 keys fall in 3 folders (a/, a0/, c/), about 4
    keys a folder, so the 31 folders are about 15 pages, too few for 2 parts of 16."""
    monkeypatch.setattr(listing, "RANGE_PAGES", 16)
    monkeypatch.setattr(listing, "PAGE", 8)
    proxy = fault_proxy(None)
    fs, _ = filesystem("s3://listing", S3Options(endpoint=proxy.url))
    assert list_objects(fs, "listing/r", concurrency=1) == _find(store, "listing/r")
    assert proxy.most_listings_at_once == 1  # one lister: one after another, never split
    # The first page; the listing with a delimiter (31 folders and 5 keys: 5 pages of 8); then the
    # other 39 - 8 keys, 4 pages of 8.
    assert proxy.listings == 1 + 5 + 4


def test_a_source_is_resolved_from_the_ranged_listing(store, fault_proxy, pages_of_4):
    proxy = fault_proxy(None, delay_s=0.1)
    src = resolve_source("s3://listing/r", S3Options(endpoint=proxy.url))
    images = sorted(p for p in store.find("listing/r") if p.endswith((".png", ".jpg")))
    assert src.kind == "images" and src.paths == images
    assert proxy.most_listings_at_once >= 2  # --data's listing went in parts side by side
    assert list_files(store, "listing/r/top.png") == {"listing/r/top.png": 1}  # a file: itself


def test_timestamps_are_read_as_botocore_reads_them_and_listings_use_the_quick_way(store):
    from datetime import timezone

    from botocore.utils import parse_timestamp

    from rayssl.storage.retrying import iso_timestamp

    for value in ["2026-12-07T10:00:00.000Z", "2026-12-07T10:00:00Z", "2026-12-07T10:00:00.123456Z",
                  "2026-12-07T12:00:00+02:00", "Mon, 07 Dec 2026 10:00:00 GMT", "1796637600", 1796637600]:
        assert iso_timestamp(value) == parse_timestamp(value), value  # the same instant
    assert iso_timestamp("2026-12-07T10:00:00.000Z").tzinfo == timezone.utc  # fromisoformat's, not dateutil's
    listed = store.ls("listing/flat", detail=True)  # S3's XML: ISO 8601, read the quick way
    assert listed and all(i["LastModified"].tzinfo == timezone.utc for i in listed)


@pytest.mark.parametrize("failing", [2, 5])
def test_a_failed_listing_request_fails_the_listing_and_leaves_no_lister_waiting(s3_endpoint, store, pages_of_4,
                                                                                  monkeypatch, failing):
    """The first page (1), then the parts; a request that fails after its retries ends the listing with
    its error, where the other listers were waiting or listing."""
    fs, _ = filesystem("s3://listing", S3Options(endpoint=s3_endpoint))
    calls, call = [], fs._call_s3

    async def refused(method, *args, **kwargs):
        calls.append(method)
        if len(calls) == failing:
            raise PermissionError("Access Denied")
        return await call(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", refused)
    with pytest.raises(PermissionError, match="Access Denied"):
        list_objects(fs, "listing/many", concurrency=4)
    assert list_objects(store, "listing/many", concurrency=4) == _find(store, "listing/many")  # the loop goes on


@pytest.mark.parametrize("pattern", ["listing/r/*/*.png", "listing/r/**/*.png", "listing/r/m0?/*.jpg",
                                     "listing/r/[ae]*/*", "listing/r/a*/**", "listing/r/**", "listing/r/*.png",
                                     "listing/r/*/deep/*", "listing/*/x.png", "listing/many/0000[0-3].jpg"])
def test_a_pattern_matches_what_fsspecs_glob_matches(store, pattern):
    """The same files; folder markers (``c/``) are left out, and ``e``, a file and a folder of one
    name, is kept: fsspec's glob gives the markers as files and ``e`` as a folder only."""
    from rayssl.data.sources import glob_files

    files = {p: int(i["size"]) for p, i in store.glob(pattern, detail=True).items()
             if i["type"] != "directory" and not p.endswith("/")}
    also = {"listing/r/e": len(LAYOUT["e"])} if pattern == "listing/r/**" else {}
    assert glob_files(store, pattern) == {**files, **also} and files


def test_a_pattern_through_folders_is_matched_against_the_listing_in_parts(store, fault_proxy, pages_of_4):
    """fsspec's glob lists each folder a folder wildcard reaches in turn; here one listing in parts."""
    proxy = fault_proxy(None, delay_s=0.1)
    src = resolve_source("s3://listing/r/m*/*.jpg", S3Options(endpoint=proxy.url))
    assert src.kind == "images" and src.paths == sorted(store.glob("listing/r/m*/*.jpg"))
    assert len(src.paths) == 24 and proxy.most_listings_at_once >= 2
