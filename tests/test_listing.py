"""An S3 prefix is listed in key ranges side by side (``rayssl.storage.listing``): the same
objects as s3fs's own flat ``find``, the requests at once rather than one after another."""

from __future__ import annotations

import pytest

from rayssl.data.sources import list_files, resolve_source
from rayssl.storage import S3Options, filesystem
from rayssl.storage import listing
from rayssl.storage.listing import cut_points, list_objects

# Folders, files beside them, nested folders, folder markers (keys ending in "/"), a file and a
# folder of one name, and names that sort between a folder and its files ("a-b" < "a/" < "a0").
LAYOUT = {"top.png": b"1", "a/1.png": b"12", "a/2.png": b"123", "a/deep/3.png": b"1", "a-b.png": b"1",
          "a0/7.png": b"1", "c/": b"", "c/4.png": b"1", "d/": b"", "e": b"file-and-folder", "e/5.png": b"1",
          "e-/8.png": b"1", "f/g/h/6.png": b"1", "z.png": b"1", **{f"m{i:02d}/{i}.jpg": b"x" * i for i in range(24)}}


def test_cut_points_are_folders_spread_evenly_without_their_slash():
    folders = [f"p/{c}/" for c in "hgfedcba"]
    assert cut_points(folders, 3) == ["p/c", "p/f"]  # 2 cuts: 3 ranges of the 8 sorted folders
    assert cut_points(folders, 64) == [f"p/{c}" for c in "bcdefgh"]  # at most one a folder
    assert cut_points(["p/a/"], 64) == [] and cut_points(folders, 1) == []


@pytest.fixture(scope="module")
def store(s3_endpoint):
    fs, _ = filesystem("s3://listing", S3Options(endpoint=s3_endpoint))
    fs.mkdir("listing")
    fs.pipe({f"listing/r/{k}": v for k, v in LAYOUT.items()})
    fs.pipe({"listing/r/": b"", "listing/r2/x.png": b"1", "listing/rr/9.png": b"1"})  # beside the prefix
    fs.pipe({f"listing/flat/{i:03d}.tar": b"t" for i in range(5)})
    return fs


@pytest.fixture
def pages_of_4(monkeypatch):
    """Listing pages of 4 keys (S3's 1,000 in use), so that a small layout takes several, and
    ranges of a page or more (of 8 in use)."""
    monkeypatch.setattr(listing, "PAGE", 4)
    monkeypatch.setattr(listing, "RANGE_PAGES", 1)


def _find(fs, path: str) -> dict[str, int]:
    return {p: int(i["size"]) for p, i in fs.find(path, detail=True).items()}


@pytest.mark.parametrize("ranges", [2, 3, 7, 64])
def test_ranges_list_what_a_flat_find_lists(store, pages_of_4, ranges):
    expected = _find(store, "listing/r")
    assert len(expected) == len(LAYOUT) + 1  # and the prefix's own marker; nothing of r2/ or rr/
    assert list_objects(store, "listing/r", ranges=ranges, concurrency=4) == expected
    assert list_objects(store, "listing/r/", ranges=ranges) == expected
    assert list_objects(store, "listing/nothing") == {}


def test_ranges_are_listed_at_once_and_a_prefix_of_one_page_in_one_request(store, fault_proxy, pages_of_4):
    proxy = fault_proxy(None, delay_s=0.2)  # a round trip of 200 ms for every request
    fs, _ = filesystem("s3://listing", S3Options(endpoint=proxy.url))
    assert list_objects(fs, "listing/r", ranges=8, concurrency=4) == _find(store, "listing/r")
    # The first page; the listing with a delimiter (31 folders and 5 keys beside them, 9 pages of 4);
    # then 8 ranges of 4-8 keys, 4 at a time, each ending with the page that goes past it (2-3 pages).
    assert proxy.most_listings_at_once == 4 and 1 + 9 + 8 * 2 <= proxy.listings <= 1 + 9 + 8 * 3
    before = proxy.listings
    assert sorted(list_objects(fs, "listing/flat")) == [f"listing/flat/{i:03d}.tar" for i in range(5)]
    assert proxy.listings - before == 1 + 2  # no folders: done with the listing with a delimiter
    before = proxy.listings
    assert list_objects(fs, "listing/r/a/deep") == {"listing/r/a/deep/3.png": 1}
    assert proxy.listings - before == 1  # a page's worth: the first request was all of it


def test_a_listing_of_few_pages_goes_on_from_its_first_page(store, fault_proxy, pages_of_4, monkeypatch):
    """Each range reads up to a page past its end, so ranges are of ``RANGE_PAGES`` pages or more,
    reckoned from the first page: here its 8 keys fall in 3 folders (a/, a0/, c/), about 4 keys a
    folder, so the 31 folders are about 15 pages, too few for 2 ranges of 16."""
    monkeypatch.setattr(listing, "RANGE_PAGES", 16)
    monkeypatch.setattr(listing, "PAGE", 8)
    proxy = fault_proxy(None)
    fs, _ = filesystem("s3://listing", S3Options(endpoint=proxy.url))
    assert list_objects(fs, "listing/r") == _find(store, "listing/r")
    assert proxy.most_listings_at_once == 1  # one after another
    # The first page; the listing with a delimiter (31 folders and 5 keys: 5 pages of 8); then the
    # other 39 - 8 keys, 4 pages of 8.
    assert proxy.listings == 1 + 5 + 4


def test_a_source_is_resolved_from_the_ranged_listing(store, fault_proxy, pages_of_4):
    proxy = fault_proxy(None, delay_s=0.1)
    src = resolve_source("s3://listing/r", S3Options(endpoint=proxy.url))
    images = sorted(p for p in store.find("listing/r") if p.endswith((".png", ".jpg")))
    assert src.kind == "images" and src.paths == images
    assert proxy.most_listings_at_once >= 2  # --data's listing went in ranges side by side
    assert list_files(store, "listing/r/top.png") == {"listing/r/top.png": 1}  # a file: itself
