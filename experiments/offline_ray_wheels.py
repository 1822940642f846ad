"""Wheels that bring Ray to a GPU machine that has PyTorch but no Ray and no package index.

The GPU check's pipeline parts (``pipeline_cpu``, ``pipeline_device``: the step fed by Ray Data)
need Ray. A machine whose image holds torch, torchvision, timm, numpy, pandas, pyarrow, fsspec
and the like, but cannot reach a package index, gets it from wheels carried to it; when what can
be carried is limited (64 MiB, the repository included, on the machines this project's GPU
figures come from), Ray's 79 MB wheel does not fit. This script writes, into ``--out``:

* Ray's wheel for the target Python without the parts rayssl never imports: its Java jars
  (32 MB of the 79), RLlib, Serve and Ray LLM; its binaries (the raylet, the GCS server,
  ``_raylet.so``) without their symbol tables (``strip --strip-unneeded``: crash reports lose
  function names); the rest (Ray Data, Train, Tune) as it is, its RECORD listing what stays;
* the packages Ray core, Data, Train and Tune require that such an image lacks (``--extra``;
  by default jsonschema and its own requirements, tensorboardX, pydantic and its own), and
  rayssl's s3fs with its own (botocore the largest, 17 MB), at this environment's versions.

then prints their size and the command that installs them there:

    python experiments/offline_ray_wheels.py --out .whl          # for Python 3.12 (the GPU image's)
    # there:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD

``--python-version 3.11`` writes the same for this machine's Python: installed into a fresh
environment with torch and such an image's other packages but no Ray, they ran the GPU check's
dry run, its pipeline parts included (docs/performance.md). ``tests/test_gpu_check.py`` tests
the slimming on a wheel it makes.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# Never imported by rayssl: Java workers' jars, RLlib, Serve, Ray LLM.
DROPPED = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/")
# What Ray core, Data, Train and Tune require beyond a PyTorch GPU image (whose packages include
# numpy, pandas, pyarrow, fsspec, msgpack, protobuf, grpcio, aiohttp, click, filelock, requests,
# pyyaml, packaging, attrs, typing-extensions): each with its own requirements, no further.
# And rayssl's s3fs (its data pipeline's storage layer imports it), with its own requirements.
EXTRA = ("jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "tensorboardX", "pydantic",
         "pydantic-core", "annotated-types", "typing-inspection", "s3fs", "aiobotocore", "botocore", "jmespath",
         "aioitertools")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def download(names: list[str], python_version: str, dest: Path) -> None:
    """Binary wheels of ``names`` for CPython ``python_version`` on x86-64 Linux, no dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + names, check=True)


def pinned(names: list[str]) -> list[str]:
    """``name==version`` of this environment where it has the package (a set that works together,
    as the tests ran it), else the name (the newest)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in names:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def stripped(data: bytes, strip: str) -> bytes:
    """An ELF binary or library without its symbol tables and debug sections (``strip
    --strip-unneeded``: what a shared library's users link against stays); anything else as it is."""
    if not data.startswith(b"\x7fELF"):
        return data
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "elf"
        path.write_bytes(data)
        subprocess.run([strip, "--strip-unneeded", str(path)], check=True)
        return path.read_bytes()


def slim_wheel(src: Path, dest: Path, dropped: tuple[str, ...] = DROPPED, strip: str | None = None) -> tuple[int, int]:
    """``src`` rewritten to ``dest`` without the entries under ``dropped``, its ELF files
    stripped with ``strip`` (a path; None: as they are), its RECORD listing what stays and their
    new hashes. Returns (entries dropped, entries kept)."""
    dropped_n = kept = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in zin.infolist():
            if info.filename.startswith(dropped):
                dropped_n += 1
                continue
            if info.filename == record_name:
                continue
            data = zin.read(info) if strip is None else stripped(zin.read(info), strip)
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            if not info.is_dir():
                lines.append(_record_line(info.filename, data))
            kept += 1
        zout.writestr(record_name, "\n".join([*lines, f"{record_name},,"]) + "\n")
    return dropped_n, kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".whl", help="the folder the wheels go to: new or without wheels")
    p.add_argument("--python-version", default="3.12", help="the target machine's Python, e.g. 3.12")
    p.add_argument("--ray", default="", help="Ray's version (default: this environment's, else 2.60.0)")
    p.add_argument("--extra", nargs="*", default=list(EXTRA), help="other packages to carry, no dependencies "
                                                                   "(at this environment's versions where it has them)")
    p.add_argument("--no-strip", action="store_true", help="keep the symbol tables of Ray's binaries (about 10 MiB)")
    args = p.parse_args(argv)
    version = args.ray
    if not version:
        try:
            import ray

            version = ray.__version__
        except ImportError:
            version = "2.60.0"
    out = Path(args.out)
    if any(out.glob("*.whl")):  # pip there installs every wheel of the folder: two of one package fail it
        raise SystemExit(f"{out} already holds wheels: give an empty or new folder (nothing there is removed)")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        download([f"ray=={version}"], args.python_version, Path(tmp))
        (src,) = Path(tmp).glob("ray-*.whl")
        strip = None if args.no_strip else shutil.which("strip")
        if strip is None and not args.no_strip:
            print("no `strip` here (binutils): Ray's binaries keep their symbol tables", file=sys.stderr)
        dropped, kept = slim_wheel(src, out / src.name, strip=strip)
        before = src.stat().st_size
    if args.extra:
        download(pinned(args.extra), args.python_version, out)
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    print(f"{src.name}: {before / 2**20:.1f} MiB -> {(out / src.name).stat().st_size / 2**20:.1f} MiB "
          f"({dropped} entries dropped, {kept} kept)")
    print(f"{len(wheels)} wheels in {out}: {total / 2**20:.1f} MiB")
    print(f"install there: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site {out}/*.whl "
          "&& export PYTHONPATH=/tmp/site:$PWD")
    return 0


if __name__ == "__main__":
    sys.exit(main())
