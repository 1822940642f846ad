"""Label tables: which classes each image has, for evaluation and for scoring pseudo-labels.

A table is a ``.csv`` or ``.parquet`` file with an id column (file stem, path or key) and a
class column (several classes joined by ``|``, ``;`` or ``,``, or a list), or an ImageFolder
tree (``root/<class>/<image>``) whose folder names are the classes. Images are matched by
their id: the file stem. No Ray import.
"""

from __future__ import annotations

import csv
import io
import posixpath

from rayssl.data.formats import PARQUET_EXTENSIONS, extension, kind_of
from rayssl.data.sources import DataError, list_files, translate_errors
from rayssl.storage import S3Options, filesystem, options_for

__all__ = ["CLASS_COLUMNS", "ID_COLUMNS", "image_id", "load_labels", "split_classes"]



ID_COLUMNS = ("id", "key", "__key__", "image", "image_id", "path", "filename", "file")
CLASS_COLUMNS = ("classes", "labels", "label", "class", "category", "dominant")


def image_id(value: str) -> str:
    """A label table's image reference -> the id used everywhere: the file stem."""
    return posixpath.basename(str(value).replace("\\", "/")).split(".", 1)[0]


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
    classes. This is the layout ``python -m rayssl.data.scenes`` writes.
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
            return {image_id(r[id_col]): split_classes(r[cls_col]) for r in rows}
        if ext in PARQUET_EXTENSIONS:
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            cols = table.column_names
            id_col, cls_col = pick_column(cols, ID_COLUMNS, "id", uri), pick_column(cols, CLASS_COLUMNS, "class", uri)
            ids, classes = table.column(id_col).to_pylist(), table.column(cls_col).to_pylist()
            return {image_id(i): split_classes(c) for i, c in zip(ids, classes)}
        root = path.rstrip("/")
        listing = list_files(fs, root)
        labels: dict[str, tuple[str, ...]] = {}
        for p in sorted(listing):
            rel = p[len(root):].lstrip("/")
            if kind_of(p) == "images" and "/" in rel:
                labels[image_id(p)] = (posixpath.basename(posixpath.dirname(p)),)
        if not labels:
            raise DataError(f"labels {uri}: no images in class folders (expected root/<class>/<image>)")
        return labels
