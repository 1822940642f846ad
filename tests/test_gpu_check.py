"""The GPU check (``experiments/gpu_check.sh`` = ``rayssl gpu-check``): its dry run on the CPU runs
every part and writes one JSON file; the full check measures what the issue names; bad input is
refused before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from experiments_loader import load_experiment
from rayssl.bench.gpu_check import GOALS, CheckOptions, check_goals, in_fresh_process, step_config
from rayssl.cli import gpu_check

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "gpu_check.sh"
PARTS = ["step", "quality", "device_fed", "pipeline_device", "pipeline_cpu", "step_cudnn_heuristics", "step_mls",
         "step_cdul", "step_vit", "step_compile", "step_cudagraphs"]
STEPS = ("step", "step_cudnn_heuristics", "step_mls", "step_cdul", "step_vit", "step_compile", "step_cudagraphs")


def test_the_dry_run_runs_every_part_and_writes_one_json(ray_session, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    last = json.loads(captured.out.strip().splitlines()[-1])
    r = json.loads(out.read_text())
    assert last["out"] == str(out) and last["errors"] == [] and last["wall_s"] == r["wall_s"]
    assert r["dry_run"] is True and r["device"] == "cpu" and list(r["parts"]) == PARTS
    for name, part in r["parts"].items():
        assert "error" not in part and "skipped" not in part, (name, part)
        assert part["part_s"] > 0
    p = r["parts"]
    for name in STEPS:
        # the engine's step, timed with its plain-loop baseline; its waits for the device counted on CUDA only
        assert p[name]["images_per_s"] > 0 and p[name]["plain_images_per_s"] > 0 and p[name]["batch_size"] == 8
        assert p[name]["syncs_per_step"] is None and p[name]["syncs_per_step_first_epoch"] is None
    assert p["step_compile"]["compile"] is True and p["step"]["compile"] is False
    assert p["step"]["cudnn_benchmark"] is True and p["step_cudnn_heuristics"]["cudnn_benchmark"] is False
    assert p["step_vit"]["backbone"] == "timm:test_vit"
    q = p["quality"]  # trained, then scored against its own random init on held-out scenes
    assert q["steps"] == q["epochs"] * (48 // 16) and q["images_seen"] == q["steps"] * 16
    assert 0 <= q["knn_top1"] <= 1 and 0 <= q["knn_top1_random_init"] <= 1
    assert q["gain_over_random_init"] == pytest.approx(q["knn_top1"] - q["knn_top1_random_init"])
    # The probes score both backbones on seven attributes; on the run's own held-out scenes
    # (the dry run's 40 / 20) their shape is the run's kNN top-1, trained and at random init.
    probes = q["probes"]["probes"]
    assert set(probes) == {"trained", "random init"} and len(probes["trained"]) == 7
    assert (q["probes"]["num_train"], q["probes"]["num_test"]) == (40, 20)
    assert probes["trained"]["shape"] == pytest.approx(q["knn_top1"], abs=1e-4)
    assert probes["random init"]["shape"] == pytest.approx(q["knn_top1_random_init"], abs=1e-4)
    f = p["device_fed"]  # the same step, each fed by decoding + cropping its batch on the device
    assert f["augment_on"] == "device" and f["decode"] == "CPU (PIL)" and f["batch_size"] == 8
    assert f["ratio"] == pytest.approx(f["images_per_s"] / f["step_images_per_s"], rel=0.01)
    assert f["decode_crop_ms_per_batch"] > 0 and f["crops"] == p["step"]["crops"]
    for name, augment in (("pipeline_cpu", "cpu"), ("pipeline_device", "device")):
        pipe = p[name]["pipeline"]
        assert pipe["augment_on"] == augment and pipe["images_per_s"] > 0
        assert pipe["ratio"] == pytest.approx(pipe["images_per_s"] / p["step"]["images_per_s"], rel=0.01)
    assert p["pipeline_cpu"]["dataloader"]["images_per_s"] > 0 and "pipeline_over_dataloader" in p["pipeline_cpu"]
    # A dry run's sizes are not the goals': figures compared, nothing claimed.
    g = r["goals"]
    assert g["step_images_per_s"]["measured"] == max(p[k]["images_per_s"] for k in (
        "step", "step_cudnn_heuristics", "step_compile", "step_cudagraphs"))  # SwAV's step only
    assert p["step_mls"]["method"] == "mls" and p["step_mls"]["crops"] == ["2x32"] and p["step"]["method"] == "swav"
    cdul = p["step_cdul"]  # on a table of random labels, its update term timed
    assert cdul["method"] == "cdul" and cdul["crops"] == ["2x32"] and cdul["labels"] == "random (timing only)"
    assert "gradient-alignment label updates" in cdul["loss_includes"] and cdul["classes"] == 80
    assert g["pipeline_over_step_device"]["measured"] == p["pipeline_device"]["pipeline"]["ratio"]
    assert g["pipeline_over_step_device"]["from"] == "pipeline_device"
    assert g["step_images_per_s"]["goal"] == GOALS["step_images_per_s"] and g["step_images_per_s"]["met"] is None
    assert "goal step_images_per_s" in captured.err and str(out) in captured.err


def test_the_full_check_measures_the_papers_recipe_on_one_gpu():
    opts = CheckOptions(out="unused.json")
    cfg = step_config(opts)
    assert cfg.model.backbone == "resnet50" and cfg.run.batch_size == 64 and cfg.run.precision == "bf16"
    assert list(cfg.data.crop_sizes) == [224, 96] and list(cfg.data.crop_counts) == [2, 6]
    assert cfg.run.channels_last and cfg.method.num_prototypes == 3000 and cfg.optim.optimizer == "lars"
    mls = step_config(opts, method="mls")  # MLS's two views, not SwAV's multi-crop
    assert mls.run.method == "mls" and mls.model.backbone == "resnet50" and mls.run.precision == "bf16"
    assert list(mls.data.crop_sizes) == [224] and list(mls.data.crop_counts) == [2] and mls.run.batch_size == 64
    cdul = step_config(opts, "cdul.pseudo_labels=/labels", method="cdul")  # CDUL's, likewise
    assert cdul.model.backbone == "resnet50" and list(cdul.data.crop_sizes) == [224] and cdul.run.precision == "bf16"
    assert step_config(opts, "model.compile=true").model.compile is True
    assert step_config(opts, "model.backbone=timm:vit_small_patch16_224").model.backbone.endswith("vit_small_patch16_224")


def test_a_fresh_process_is_another_process():
    # step_cudnn_heuristics runs there: cuDNN's choices of the earlier parts must not reach it.
    assert in_fresh_process(os.getpid) != os.getpid()


@pytest.mark.parametrize("ratio,met", [(0.5, False), (0.95, None)])
def test_without_ray_the_device_fed_ratio_can_miss_the_pipeline_goal_but_not_meet_it(ratio, met):
    # Without Ray, the worker's decode + crop alone is a ceiling of the pipeline's ratio: below
    # the goal the goal is missed; above it, Ray's share is unmeasured.
    parts = {"step": {"images_per_s": 1200.0}, "device_fed": {"ratio": ratio},
             "pipeline_device": {"skipped": "ray is not installed"}}
    g = check_goals(parts, dry_run=False)
    assert g["step_images_per_s"]["met"] is True
    assert g["pipeline_over_step_device"]["measured"] == ratio and g["pipeline_over_step_device"]["met"] is met
    assert g["pipeline_over_step_device"]["from"].startswith("device_fed")
    with_ray = check_goals({**parts, "pipeline_device": {"pipeline": {"ratio": 0.95}}}, dry_run=False)
    assert with_ray["pipeline_over_step_device"] == {"measured": 0.95, "from": "pipeline_device", "goal": 0.9,
                                                     "met": True}


@pytest.mark.parametrize("argv,message", [
    (["--budget-s", "0", "--dry-run"], "--budget-s must be > 0"),
    (["--quality-s", "-1", "--dry-run"], "--quality-s must be > 0"),
    (["--device", "cpu"], "--device cpu: the check measures a GPU"),
])
def test_bad_options_are_refused_naming_them(argv, message, capsys):
    assert gpu_check.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the refusal is for machines without")
def test_without_a_gpu_the_script_says_to_use_the_dry_run(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "no CUDA device is available" in done.stderr and "--dry-run" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_an_existing_file_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "mine.json"
    out.write_text("a user's file")
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "a user's file"


def test_a_part_whose_package_is_missing_is_skipped_and_the_others_still_run(tmp_path, monkeypatch):
    """A GPU machine with torch alone: the check imports without pyarrow (CDUL's label table needs
    it, its part says so and is skipped) and measures what it can."""
    import sys

    from rayssl.bench import gpu_check as gc

    code = "import sys; sys.modules['pyarrow'] = None; import rayssl.bench.gpu_check"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    parts = {p.name: p for p in gc._parts(CheckOptions(out="unused.json", dry_run=True), torch.device("cpu"), {})}
    assert parts["step_cdul"].needs == "pyarrow" and parts["pipeline_cpu"].needs == "ray"

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    ran = []
    monkeypatch.setattr(gc, "_parts", lambda opts, device, result: [
        gc.Part("labels", 1, lambda: ran.append("labels") or {}, needs="pyarrow"),
        gc.Part("plain", 1, lambda: ran.append("plain") or {"figure": 1})])
    r = gc.run_gpu_check(CheckOptions(out=str(tmp_path / "check.json"), device="cpu", dry_run=True))
    assert r["parts"]["labels"] == {"skipped": "pyarrow is not installed"} and ran == ["plain"]
    assert r["parts"]["plain"]["figure"] == 1 and json.loads((tmp_path / "check.json").read_text()) == r


def test_a_part_left_out_is_said_so_and_not_run_and_the_step_cannot_be(tmp_path, monkeypatch, capsys):
    """``--skip PART``: a GPU session leaves out what an earlier check measured, so that the
    unmeasured parts fit its budget."""
    from rayssl.bench import gpu_check as gc

    assert gc.PARTS == tuple(PARTS) == tuple(
        p.name for p in gc._parts(CheckOptions(out="unused.json", dry_run=True), torch.device("cpu"), {}))
    args = gpu_check.build_parser().parse_args(["--dry-run", "--skip", "quality", "--skip", "step_vit"])
    assert gpu_check.options_from(args).skip == ("quality", "step_vit")
    ran = []
    monkeypatch.setattr(gc, "_parts", lambda opts, device, result: [
        gc.Part(name, 1, lambda name=name: ran.append(name) or {"figure": 1}) for name in ("step", "quality", "mls")])
    r = gc.run_gpu_check(CheckOptions(out=str(tmp_path / "check.json"), device="cpu", dry_run=True,
                                      skip=("quality",)))
    assert ran == ["step", "mls"] and r["parts"]["quality"] == {"skipped": "left out (--skip)"}
    assert list(r["parts"]) == ["step", "quality", "mls"]
    # The step is what the pipeline parts' ratios and the goals are read against.
    with pytest.raises(SystemExit) as exc:
        gpu_check.build_parser().parse_args(["--skip", "step"])
    assert exc.value.code == 2 and "--skip: invalid choice: 'step'" in capsys.readouterr().err


def _wheel(path: Path, files: dict[str, bytes]) -> None:
    """A wheel of package ``pkg`` holding ``files``, its RECORD with their hashes."""
    import base64
    import hashlib
    import zipfile

    dist = "pkg-1.0.dist-info"
    files = {**files, f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n",
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-any\n"}
    record = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
              for n, d in files.items()]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{dist}/RECORD", "\n".join([*record, f"{dist}/RECORD,,"]) + "\n")


def test_the_offline_ray_wheel_drops_what_rayssl_never_imports_and_installs_and_imports(tmp_path):
    """``experiments/offline_ray_wheels.py``, which brings Ray to a GPU machine without it: the
    slimmed wheel leaves out the dropped folders, its stripped extension module still imports
    and works, and pip installs it (its RECORD names every file it holds, with their new hashes)."""
    import base64
    import hashlib
    import shutil
    import sys
    import zipfile

    import yaml._yaml  # an unstripped C extension (PyYAML's), importable under any package as ``_yaml``

    wheels = load_experiment("offline_ray_wheels")
    ext = Path(yaml._yaml.__file__)
    src, slim = tmp_path / "pkg-1.0-py3-none-any.whl", tmp_path / "slim" / "pkg-1.0-py3-none-any.whl"
    slim.parent.mkdir()
    _wheel(src, {"pkg/__init__.py": b"", "pkg/jars/big.jar": b"x" * 1000, "pkg/rl/__init__.py": b"",
                 f"pkg/{ext.name}": ext.read_bytes()})
    strip = shutil.which("strip")
    assert strip, "binutils' strip is needed to slim Ray's binaries"
    dropped, kept = wheels.slim_wheel(src, slim, dropped=("pkg/jars/", "pkg/rl/"), strip=strip)
    assert (dropped, kept) == (2, 4)  # __init__, the extension, METADATA, WHEEL (+ the new RECORD)
    with zipfile.ZipFile(slim) as z:
        names = set(z.namelist())
        assert not any(n.startswith(("pkg/jars/", "pkg/rl/")) for n in names)
        small = z.read(f"pkg/{ext.name}")
        record = z.read("pkg-1.0.dist-info/RECORD").decode().splitlines()
    assert small.startswith(b"\x7fELF") and len(small) < ext.stat().st_size  # its symbol tables gone
    digest = base64.urlsafe_b64encode(hashlib.sha256(small).digest()).rstrip(b"=").decode()
    assert f"pkg/{ext.name},sha256={digest},{len(small)}" in record  # the stripped file's own hash
    assert {r.split(",")[0] for r in record} == names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(target), str(slim)], check=True, capture_output=True, timeout=120)
    assert not (target / "pkg" / "jars").exists()
    code = "import pkg._yaml as y, sys; print(y.get_version_string())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == yaml._yaml.get_version_string()
    # A folder that holds wheels already is refused before anything is fetched: pip would install
    # every wheel there, two of one package failing it; and nothing of the user's is removed.
    with pytest.raises(SystemExit, match="already holds wheels"):
        wheels.main(["--out", str(slim.parent)])
    assert sorted(p.name for p in slim.parent.iterdir()) == [slim.name]
    # What the GPU machine is given: Ray's requirements at this environment's versions.
    assert wheels.pinned(["pyyaml", "no-such-package-rayssl"]) == [f"pyyaml=={yaml.__version__}",
                                                                   "no-such-package-rayssl"]
