"""Label tables: which classes each image has, for evaluation and for scoring pseudo-labels.

A table is a ``.csv`` or ``.parquet`` file with an id column (file stem, path or key) and a
class column (several classes joined by ``|``, ``;`` or ``,``, or a list), or an ImageFolder
tree (``root/<class>/<image>``) whose folder names are the classes. Images are matched by
their id: the file stem; two different images with one stem are an error, never a label
silently overwritten. An ImageFolder scored on its own folders (``folder_labels``) matches by
the path below its root instead, so class folders may repeat file names. No Ray import.
"""

from __future__ import annotations

import csv
import io
import posixpath

from rayssl.data.formats import PARQUET_EXTENSIONS, extension, kind_of
from rayssl.data.sources import DataError, list_files, translate_errors
from rayssl.storage import S3Options, filesystem, options_for

__all__ = ["CLASS_COLUMNS", "ID_COLUMNS", "folder_labels", "image_id", "load_labels", "own_folder_labels",
           "split_classes"]



ID_COLUMNS = ("id", "key", "__key__", "image", "image_id", "path", "filename", "file")
CLASS_COLUMNS = ("classes", "labels", "label", "class", "category", "dominant")


def image_id(value: str) -> str:
    """A label table's image reference -> the id used everywhere: the file stem."""
    return posixpath.basename(str(value).replace("\\", "/")).split(".", 1)[0]


def folder_labels(uri: str, root: str, paths) -> dict[str, tuple[str, str]]:
    """{path: (id, class)} of the images in class folders below ``root`` (``root/.../<class>/<image>``;
    ``uri`` names it in errors): the class is the image's folder, the id its path below ``root``
    without the extension (``cat/0001``), unique where class folders repeat file names. Images
    directly in ``root`` have no class and are left out; DataError when no image has one."""
    root = root.rstrip("/")
    found: dict[str, tuple[str, str]] = {}
    for p in sorted(paths):
        rel = p[len(root):].lstrip("/") if p.startswith(root + "/") else ""
        if kind_of(p) == "images" and "/" in rel:
            found[p] = (f"{posixpath.dirname(rel)}/{image_id(rel)}", posixpath.basename(posixpath.dirname(p)))
    if not found:
        raise DataError(f"labels {uri}: no images in class folders (expected root/<class>/<image>)")
    return found


def own_folder_labels(labels_uri: str, data_uri: str, paths, options: S3Options | None = None
                      ) -> dict[str, tuple[str, str]] | None:
    """``folder_labels`` of the images ``paths`` listed under ``data_uri`` when ``labels_uri`` is
    that place itself (a folder labelled by its own class folders, matched by path), else None
    (a table or another tree, matched by file stem: ``load_labels``)."""
    def place(uri: str) -> str:
        return filesystem(uri, options_for(uri, options))[1].rstrip("/")

    root = place(data_uri)
    if labels_uri != data_uri and place(labels_uri) != root:
        return None
    return folder_labels(labels_uri, root, paths)


def _by_stem(rows, uri: str, what: str) -> dict[str, tuple[str, ...]]:
    """(reference, classes) rows -> {file stem: classes}. Rows of one reference add up (a table
    with a row per class); two references with one stem are a DataError, not one label lost."""
    labels: dict[str, tuple[str, ...]] = {}
    named: dict[str, str] = {}
    for ref, classes in rows:
        i, ref = image_id(ref), str(ref)
        if i in named and named[i] != ref:
            raise DataError(f"labels {uri}: {what} {named[i]!r} and {ref!r} have the same file stem {i!r}, and "
                            "labels are matched to images by file stem; rename one, or give a table whose ids "
                            "are unique stems")
        named[i] = ref
        labels[i] = labels.get(i, ()) + tuple(c for c in classes if c not in labels.get(i, ()))
    return labels


def split_classes(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = value.tolist() if hasattr(value, "tolist") else value
        return tuple(str(v).strip() for v in items if str(v).strip())
    text = str(value)
    for sep in ("|", ";", ","):
        if sep in text:
            return tuple(s.strip() for s in text.split(sep) if s.strip())
    return (text.strip(),) if text.strip() else ()


def pick_column(columns: list[str], wanted: tuple[str, ...], what: str, uri: str) -> str:
    lower = {c.lower(): c for c in columns}
    for w in wanted:
        if w in lower:
            return lower[w]
    raise DataError(f"labels {uri}: no {what} column (looked for {', '.join(wanted)}; has {', '.join(columns)})")


def load_labels(uri: str, options: S3Options | None = None) -> dict[str, tuple[str, ...]]:
    """Evaluation labels: image id (file stem) -> class names (one or more).

    ``uri`` is either a labels table -- ``.csv`` or ``.parquet`` with an id column (``id``,
    ``key``, ``image``, ``path``...) and a class column (``classes``, ``labels``, ``label``,
    ``class``...; several classes joined by ``|``, ``;`` or ``,`` or given as a list) --
    or an ImageFolder-style tree (``root/<class>/<image>``) whose folder names are the
    classes. This is the layout ``python -m rayssl.data.scenes`` writes. Keyed by file stem,
    to match other images (shards' keys, a folder's files): a stem shared by two images is a
    DataError, while rows of one id add their classes together.
    """
    options = options_for(uri, options)
    fs, path = filesystem(uri, options)
    ext = extension(path)
    with translate_errors(uri, options, "read", what="labels"):
        if ext == "csv":
            text = fs.cat_file(path).decode("utf-8-sig")
            rows = list(csv.DictReader(io.StringIO(text)))
            if not rows:
                raise DataError(f"labels {uri}: the table is empty")
            cols = list(rows[0].keys())
            id_col, cls_col = pick_column(cols, ID_COLUMNS, "id", uri), pick_column(cols, CLASS_COLUMNS, "class", uri)
            return _by_stem(((r[id_col], split_classes(r[cls_col])) for r in rows), uri, "ids")
        if ext in PARQUET_EXTENSIONS:
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            cols = table.column_names
            id_col, cls_col = pick_column(cols, ID_COLUMNS, "id", uri), pick_column(cols, CLASS_COLUMNS, "class", uri)
            ids, classes = table.column(id_col).to_pylist(), table.column(cls_col).to_pylist()
            return _by_stem(((i, split_classes(c)) for i, c in zip(ids, classes)), uri, "ids")
        found = folder_labels(uri, path, list_files(fs, path.rstrip("/")))
        return _by_stem(((rel, (cls,)) for rel, cls in found.values()), uri, "images")
