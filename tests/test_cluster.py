"""Running at scale (issues 6 and 25): cluster/aws.yaml passes Ray's own cluster-config
validation and pulls the image cluster/Dockerfile builds, which agrees with pyproject.toml,
aws.yaml's fallback and the client's Ray (static checks: no docker here);
`ray job submit` runs rayssl on a loopback head started with `ray start --head` (and leaks
no credential planted in the head's environment). Runs on several nodes (a simulated
cluster: one worker per node, a node-local --output refused, elastic workers, a spot
preemption) are in tests/test_spot_and_elastic.py, which starts them with
``run_cluster_session``.

The heads these tests start are separate Ray clusters: they run in subprocesses with their
own temp dir (RAY_TMPDIR, so no address file of theirs is ever found by another
``ray.init``), loopback addresses and free ports, and are always stopped (processes found
by their temp dir, ended by pid; never ``ray stop``, which ends every Ray on the machine).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import find_needles, scan_tree, tiny_args
from rayssl.checkpoint import MODEL_FILE, verify_checkpoint_dir
from rayssl.dist import free_port

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).parent / "ray")


def _other_processes():
    """(``/proc/PID`` path, command line) of every live process but this one; a process that
    ends meanwhile, or is not ours to read, is left out."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            yield entry, (entry / "cmdline").read_bytes()
        except OSError:
            pass


def end_processes_under(temp_dir: str) -> None:
    """End the processes whose command line names ``temp_dir`` (one test's own Ray), by pid."""
    def matching() -> list[int]:
        return [int(entry.name) for entry, cmdline in _other_processes() if temp_dir.encode() in cmdline]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in matching():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while matching() and time.monotonic() < deadline:
            time.sleep(0.2)


def _wait_for_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until the head's dashboard (which hosts the job server) answers HTTP at ``url``."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"`ray start --head` exited with {proc.returncode}"
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=5)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without the token is an answer)
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"no Ray dashboard at {url} after {timeout_s} s")


def _holders_of(needle: bytes) -> set[str]:
    """Which kinds of live process carry ``needle`` in their environment: "train worker"
    (Ray Train's worker actors, titled ``ray::RayTrainWorker...``) and "job driver" (the
    ``python -m rayssl.train`` a job runs, not the ``ray job submit`` client that names it)."""
    kinds = set()
    for entry, cmdline in _other_processes():
        if b"\0submit\0" in cmdline:  # the `ray job submit` client: given the secret by the test
            continue
        if b"RayTrainWorker" in cmdline:
            kind = "train worker"
        elif b"rayssl.train" in cmdline:
            kind = "job driver"
        else:
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                kinds.add(kind)
        except OSError:  # gone meanwhile
            pass
    return kinds


def _isolated_env(temp_dir: str, **extra: str) -> dict:
    env = {**os.environ, "RAY_TMPDIR": temp_dir, **extra}
    env.pop("RAY_ADDRESS", None)
    return env


# --------------------------------------------------------------------------- cluster/aws.yaml, cluster/Dockerfile

AWS_YAML = REPO / "cluster" / "aws.yaml"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
DATA_ROLE = {"rayssl/role": "data"}  # the label of aws.yaml's CPU node type for Ray Data


def _dockerfile_steps(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) of each Dockerfile instruction, in order; continuation
    lines joined, comments dropped."""
    steps = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            steps.append((word.upper(), rest.strip()))
    return steps


def _commented_fallback(aws_yaml: str) -> tuple[str | None, list[str]]:
    """aws.yaml's commented-out fallback: the plain Ray image (``#   image: ...``) and the
    setup commands commented under ``setup_commands: []``."""
    image = re.search(r"^#\s+image:\s*(\S+)", aws_yaml, re.M)
    setup = re.search(r"^setup_commands: \[\]\n((?:#\s+- .*\n)+)", aws_yaml, re.M)
    commands = re.findall(r"^#\s+- (.*)$", setup.group(1), re.M) if setup else []
    return (image.group(1) if image else None), commands


def _fallback_config(raw: dict, aws_yaml: str) -> dict:
    """aws.yaml as its comments say to turn it into the fallback (no registry of one's own)."""
    image, commands = _commented_fallback(aws_yaml)
    fallback = copy.deepcopy(raw)
    fallback["docker"]["image"] = image
    fallback["initialization_commands"] = []
    fallback["setup_commands"] = commands
    return fallback


def _image_mismatches(dockerfile: str, pyproject: str, aws_yaml: str, ray_version: str, repo: Path) -> list[str]:
    """Where cluster/Dockerfile disagrees with pyproject.toml, with cluster/aws.yaml (the image it
    pulls, its commented fallback) or with the Ray the client runs: one sentence each, none
    when they agree. Static: no docker here, so what a build would use is read from the text."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    bad: list[str] = []
    project = tomllib.loads(pyproject)
    meta = project["project"]
    wants = {Requirement(d).name: Requirement(d).specifier for d in meta["dependencies"]}
    steps = _dockerfile_steps(dockerfile)
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)

    def expand(s: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), s)

    # The base: Ray's own image at the client's Ray version, a Python pyproject admits.
    bases = [expand(a) for kind, a in steps if kind == "FROM"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-cu\d+", bases[0]) if len(bases) == 1 else None
    if not m:
        return [f"FROM {bases}: want one rayproject/ray:<ray>-py3xx-cuXXX image (not ray-ml)"]
    if m.group(1) != ray_version:
        bad.append(f"FROM {bases[0]}: Ray {m.group(1)}, but the client runs Ray {ray_version}")
    if f"3.{m.group(2)}" not in SpecifierSet(meta.get("requires-python", "")):
        bad.append(f"FROM {bases[0]}: Python 3.{m.group(2)} is outside requires-python {meta['requires-python']}")

    # torch and torchvision: pinned, inside pyproject's ranges, a matching pair, installed.
    torch, vision = args.get("TORCH_VERSION", ""), args.get("TORCHVISION_VERSION", "")
    index = args.get("TORCH_INDEX_URL", "")
    pinned = True
    for name, pin in (("torch", torch), ("torchvision", vision)):
        if not re.fullmatch(r"\d+\.\d+\.\d+", pin):
            bad.append(f"{name}: no exact version pinned by the Dockerfile's ARGs ({pin!r})")
            pinned = False
        elif pin not in wants[name]:
            bad.append(f"{name}=={pin} (Dockerfile) is outside pyproject's {name}{wants[name]}")
    # torch 2.N ships with torchvision 0.(N+15).
    if pinned and Version(torch).major == 2 and Version(vision).release[:2] != (0, Version(torch).minor + 15):
        bad.append(f"torchvision {vision} is not the release that goes with torch {torch}")
    cuda = re.search(r"/(cu\d+)/?$", index)
    if not cuda:
        bad.append(f"TORCH_INDEX_URL {index!r}: want a PyTorch CUDA wheel index (.../whl/cuXXX)")
    torch_runs = [i for i, (kind, a) in enumerate(steps) if kind == "RUN" and f"torch=={torch}" in expand(a)
                  and f"torchvision=={vision}" in expand(a) and index in expand(a)]
    if not torch_runs:
        bad.append("no RUN installs the pinned torch and torchvision from TORCH_INDEX_URL")

    # What it copies: files that exist, and everything `pip install .` reads (pyproject, its
    # readme, the packages packages.find includes); torch's layer before them (cache).
    copies = {}
    for i, (kind, a) in enumerate(steps):
        if kind == "COPY":
            for src in [t for t in shlex.split(a) if not t.startswith("--")][:-1]:
                copies.setdefault(src.rstrip("/"), i)
                if not (repo / src).exists():
                    bad.append(f"COPY {src}: not in the repository")
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(p.name for p in repo.iterdir() if (p / "__init__.py").is_file()
                      and any(fnmatch.fnmatch(p.name, pat) for pat in include))
    for needed in ["pyproject.toml", meta["readme"], *packages]:
        if needed not in copies:
            bad.append(f"{needed}: `pip install .` needs it, and the Dockerfile does not COPY it")
    if torch_runs and copies and torch_runs[0] > min(copies.values()):
        bad.append("torch is installed after a COPY: every code change would download it again")
    # rayssl's dependencies from pyproject.toml alone, before the code is copied; then the code.
    code = [copies[p] for p in packages if p in copies]
    pips = [i for i, (kind, a) in enumerate(steps) if kind == "RUN" and "pip install" in a and i not in torch_runs]
    if code and not any(copies.get("pyproject.toml", len(steps)) < i < min(code) and "--no-deps" not in steps[i][1]
                        for i in pips):
        bad.append("no RUN installs rayssl's dependencies between COPY pyproject.toml and the code: every code "
                   "change would reinstall them")
    if code and not any(i > max(code) for i in pips):
        bad.append("the packages are copied but never installed")

    # The tag the header documents names rayssl's version, Ray's and the wheels' CUDA.
    tag = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", dockerfile)
    want_tag = f"rayssl:{meta['version']}-ray{ray_version}-{cuda.group(1) if cuda else '?'}"
    if not tag or tag.group(1) != want_tag:
        bad.append(f"documented tag {tag and tag.group(1)}: want {want_tag}")

    # aws.yaml pulls that tag from the ECR registry it logs in to, in its own region.
    raw = yaml.safe_load(aws_yaml)
    image, region = raw["docker"]["image"], raw["provider"]["region"]
    ecr = re.fullmatch(r"(\d{12}\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com)/(.+)", image)
    if not ecr or ecr.group(3) != want_tag:
        bad.append(f"aws.yaml docker.image {image}: want <account>.dkr.ecr.<region>.amazonaws.com/{want_tag}")
    else:
        if ecr.group(2) != region:
            bad.append(f"aws.yaml docker.image is in {ecr.group(2)}, the cluster in {region}")
        login = f"aws ecr get-login-password --region {region} | docker login --username AWS --password-stdin "
        if raw.get("initialization_commands") != [login + ecr.group(1)]:
            bad.append(f"aws.yaml initialization_commands: want [{login + ecr.group(1)!r}]")

    # Its commented fallback: the Dockerfile's base image, torch as pinned, rayssl from file_mounts.
    fallback_image, commands = _commented_fallback(aws_yaml)
    if fallback_image != bases[0]:
        bad.append(f"aws.yaml fallback image {fallback_image}: want the Dockerfile's base {bases[0]}")
    torch_line = f"pip install --no-cache-dir --index-url {index} torch=={torch} torchvision=={vision}"
    mount = next(iter(raw.get("file_mounts") or {"": ""}))
    if commands != [torch_line, f"pip install --no-cache-dir -e {mount}"]:
        bad.append(f"aws.yaml fallback setup_commands {commands}: want [{torch_line!r}, 'pip install "
                   f"--no-cache-dir -e {mount}']")
    return bad


def test_aws_yaml_passes_rays_cluster_config_validation():
    from jsonschema import ValidationError
    from ray._private.label_utils import validate_node_label_syntax, validate_node_labels
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = AWS_YAML.read_text()
    raw = yaml.safe_load(text)
    # What `ray up` does before it talks to AWS: merge the provider defaults, then validate
    # against ray/autoscaler/ray-schema.json and the node-type rules.
    validate_config(prepare_config(copy.deepcopy(raw)))
    # The same validation refuses a typo, so the check above can fail.
    typo = copy.deepcopy(raw)
    typo["idle_timeout_minute"] = typo.pop("idle_timeout_minutes")
    with pytest.raises(ValidationError):
        validate_config(prepare_config(typo))
    # The fallback its comments describe (plain Ray image, installs in setup_commands) is valid too.
    fallback = _fallback_config(raw, text)
    validate_config(prepare_config(copy.deepcopy(fallback)))
    assert fallback["docker"]["image"].startswith("rayproject/ray:")
    assert any("pip install" in c and "~/rayssl" in c for c in fallback["setup_commands"])

    assert raw["provider"]["type"] == "aws"
    assert raw["setup_commands"] == []  # the image has everything installed
    assert raw["file_mounts"] == {"~/rayssl": "."}
    assert 0 < raw["idle_timeout_minutes"] <= 30
    types = raw["available_node_types"]
    head, workers = types[raw["head_node_type"]], {k: v for k, v in types.items() if k != raw["head_node_type"]}
    # An on-demand head that takes no training workers or Ray Data tasks.
    assert head["resources"] == {"CPU": 0} and "InstanceMarketOptions" not in head["node_config"]
    assert all(w["min_workers"] == 0 < w["max_workers"] <= raw["max_workers"] for w in workers.values())

    def market(w):
        return (w["node_config"].get("InstanceMarketOptions") or {}).get("MarketType", "on-demand")

    gpu = {k: w for k, w in workers.items() if re.match(r"(g|p)\d", w["node_config"]["InstanceType"])}
    cpu = {k: w for k, w in workers.items() if re.match(r"(c|m|r)\d", w["node_config"]["InstanceType"])}
    assert gpu.keys() | cpu.keys() == workers.keys()
    spot = [w for w in gpu.values() if market(w) == "spot"]
    on_demand = [w for w in gpu.values() if market(w) == "on-demand"]
    assert len(spot) == 1 and len(on_demand) == 1, {k: market(w) for k, w in gpu.items()}
    # The on-demand GPU type is the spot one at full price: same machine, image, role, disk;
    # Ray's autoscaler (v2, `ray up`'s default) launches it when spot launches fail and
    # otherwise prefers the higher priority: spot.
    assert {k: v for k, v in spot[0]["node_config"].items() if k != "InstanceMarketOptions"} == \
        on_demand[0]["node_config"]
    assert spot[0].get("priority", 0) > on_demand[0].get("priority", 0)
    # CPU nodes for Ray Data, labelled with their role (labels Ray accepts at `ray start`).
    assert len(cpu) == 1 and next(iter(cpu.values())).get("labels") == DATA_ROLE
    for w in workers.values():
        validate_node_labels(w.get("labels"))
        validate_node_label_syntax(w.get("labels"))
    # Every node can read S3 and pull the image with the same instance role.
    assert len({repr(w["node_config"]["IamInstanceProfile"]) for w in workers.values()}) == 1


def test_aws_yaml_node_types_are_picked_as_its_comments_say():
    """Ray's autoscaler (v2, what `ray up` runs since Ray 2.50) given aws.yaml's worker types:
    GPU requests start spot nodes, on-demand ones while spot launches have recently failed, and
    CPU-only requests (Ray Data's) start the CPU type. Node shapes are stand-ins (EC2 detection
    needs AWS); only GPU or not matters to these choices."""
    from ray.autoscaler.v2.instance_manager.config import NodeTypeConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.core.generated.autoscaler_pb2 import ResourceRequest, ResourceRequestByCount

    raw = yaml.safe_load(AWS_YAML.read_text())
    types = {k: v for k, v in raw["available_node_types"].items() if k != raw["head_node_type"]}
    configs = {k: NodeTypeConfig(name=k, min_worker_nodes=v["min_workers"], max_worker_nodes=v["max_workers"],
                                 priority=v.get("priority", 0), labels=v.get("labels", {}),
                                 resources={"CPU": 8, "memory": 32e9, **({"GPU": 1} if
                                            re.match(r"(g|p)\d", v["node_config"]["InstanceType"]) else {})})
               for k, v in types.items()}

    def launched(bundle: dict, **recovered: float) -> dict:
        request = SchedulingRequest(
            disable_launch_config_check=True, node_type_configs=configs, max_num_nodes=raw["max_workers"],
            resource_requests=[ResourceRequestByCount(request=ResourceRequest(resources_bundle=bundle), count=1)],
            recoverable_resource_availabilities=recovered)
        return {r.instance_type: r.count for r in ResourceDemandScheduler(None).schedule(request).to_launch}

    def market(name: str) -> str:
        return (types[name]["node_config"].get("InstanceMarketOptions") or {}).get("MarketType", "on-demand")

    [spot] = launched({"GPU": 1, "CPU": 1})
    assert market(spot) == "spot"
    [fallback] = launched({"GPU": 1, "CPU": 1}, **{spot: 0.0})  # a spot launch just failed
    assert market(fallback) == "on-demand" and "GPU" in configs[fallback].resources
    [fallback] = launched({"GPU": 1, "CPU": 1}, **{spot: 0.9})  # not yet recovered
    assert market(fallback) == "on-demand"
    [data] = launched({"CPU": 1})
    assert "GPU" not in configs[data].resources and types[data].get("labels") == DATA_ROLE


def test_dockerfile_agrees_with_pyproject_aws_yaml_and_the_clients_ray():
    import ray
    import torch
    import torchvision

    dockerfile = DOCKERFILE.read_text()
    assert _image_mismatches(dockerfile, (REPO / "pyproject.toml").read_text(), AWS_YAML.read_text(),
                             ray.__version__, REPO) == []
    # The image carries the torch and torchvision this suite runs with.
    args = dict(a.split("=", 1) for kind, a in _dockerfile_steps(dockerfile) if kind == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0]
    assert args["TORCHVISION_VERSION"] == torchvision.__version__.split("+")[0]


@pytest.mark.parametrize("where, old, new, complaint", [
    ("Dockerfile", "ARG TORCH_VERSION=2.14.1", "ARG TORCH_VERSION=2.15.0", "torchvision 0.29.1 is not the release"),
    ("Dockerfile", "ARG TORCHVISION_VERSION=0.29.1", "ARG TORCHVISION_VERSION=0.30.0", "fallback setup_commands"),
    ("Dockerfile", "ARG RAY_IMAGE=rayproject/ray:2.60.0-py311", "ARG RAY_IMAGE=rayproject/ray:2.59.0-py311",
     "but the client runs Ray"),
    ("Dockerfile", "py311-cu128", "py39-cu128", "outside requires-python"),
    ("Dockerfile", "/whl/cu128", "/whl/cu130", "documented tag"),
    ("Dockerfile", "COPY --chown=1000:100 tuning /tmp/rayssl/tuning\n", "", "tuning: `pip install .` needs it"),
    ("Dockerfile", "COPY --chown=1000:100 README.md", "COPY --chown=1000:100 README.rst", "COPY README.rst"),
    ("Dockerfile", "ARG TORCH_VERSION=", "COPY README.md /tmp/\nARG TORCH_VERSION=", "torch is installed after a COPY"),
    ("Dockerfile", "pip install --no-cache-dir . &&", "true &&", "rayssl's dependencies"),
    ("pyproject.toml", '"torch>=2.3,<3"', '"torch>=2.3,<2.14"', "outside pyproject's torch"),
    ("pyproject.toml", 'version = "0.1.0"', 'version = "0.2.0"', "documented tag"),
    ("aws.yaml", "amazonaws.com/rayssl:0.1.0-ray2.60.0-cu128", "amazonaws.com/rayssl:latest", "docker.image"),
    ("aws.yaml", "get-login-password --region us-west-2", "get-login-password --region us-east-1",
     "initialization_commands"),
    ("aws.yaml", "#   image: rayproject/ray:2.60.0", "#   image: rayproject/ray:2.59.0", "fallback image"),
    ("aws.yaml", "torchvision==0.29.1", "torchvision==0.29.0", "fallback setup_commands"),
    ("ray", "2.60.0", "2.61.0", "but the client runs Ray 2.61.0"),
], ids=["torch-pin", "torchvision-pin", "base-ray", "base-python", "torch-cuda", "copy-missing-package",
        "copy-missing-file", "copy-before-torch", "no-deps-layer", "pyproject-torch-range", "pyproject-version",
        "yaml-image-tag", "yaml-login-region", "yaml-fallback-image", "yaml-fallback-pins", "client-ray"])
def test_dockerfile_check_fails_when_one_side_changes(where, old, new, complaint):
    """The consistency check above can fail: one edit on one side only is caught, and named."""
    import ray

    texts = {"Dockerfile": DOCKERFILE.read_text(), "pyproject.toml": (REPO / "pyproject.toml").read_text(),
             "aws.yaml": AWS_YAML.read_text(), "ray": ray.__version__}
    assert old in texts[where], f"{where} no longer holds {old!r}: update this case"
    texts[where] = texts[where].replace(old, new)
    bad = _image_mismatches(texts["Dockerfile"], texts["pyproject.toml"], texts["aws.yaml"], texts["ray"], REPO)
    assert any(complaint in b for b in bad), bad


# --------------------------------------------------------------------------- ray job submit


def test_ray_job_submit_runs_rayssl_on_a_loopback_head(tmp_path):
    """A run submitted as a job; also the leak check of a whole run: an AWS secret and session
    token planted in the head's environment never reach the job's output, the run directory
    (raw bytes and unpickled checkpoints) or the head's session logs. The positive control:
    while the job runs, its driver and Ray Train workers are seen holding the secret in their
    own environments, so the run had it within reach."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths
    secret, token = f"planted-secret-{uuid.uuid4().hex}", f"planted-token-{uuid.uuid4().hex}"
    needles = [secret.encode(), token.encode()]
    # Token authentication (the default for local clusters in Ray 2.60): the head and the
    # submitting client share a token through the environment, nothing under ~/.ray.
    env = _isolated_env(temp_dir, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex,
                        AWS_SECRET_ACCESS_KEY=secret, AWS_SESSION_TOKEN=token)
    dash = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dash, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
    head = subprocess.Popen(
        [RAY_CLI, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
         "--num-cpus", "2", "--temp-dir", temp_dir, "--include-dashboard", "true", "--disable-usage-stats",
         *[str(x) for kv in ports.items() for x in kv]],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp_path / "run"
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_http(address, head, timeout_s=180)
        log_path = tmp_path / "submit.log"
        holders: set[str] = set()
        agent_deadline = time.monotonic() + 90
        while True:
            with open(log_path, "wb") as log_file:
                submit = subprocess.Popen(
                    [RAY_CLI, "job", "submit", "--address", address, "--submission-id", "rayssl-test",
                     "--working-dir", ".", "--", sys.executable, "-m", "rayssl.train",
                     *tiny_args(out, "--epochs", "1")],
                    cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
                deadline = time.monotonic() + 420
                while submit.poll() is None and time.monotonic() < deadline:
                    if holders != {"train worker", "job driver"}:  # no more /proc walks once both are seen
                        holders |= _holders_of(secret.encode())
                    time.sleep(0.5)
                if submit.poll() is None:
                    submit.kill()
                submit.wait()
            logs = log_path.read_text(errors="replace")
            # The dashboard answers before its node's job agent has registered: Ray refuses the
            # submission then ("try again later"), and creates no job; a user's second try succeeds.
            if submit.returncode == 0 or "No available agent to submit job" not in logs:
                break
            assert time.monotonic() < agent_deadline, logs[-4000:]
            time.sleep(2)
        status = subprocess.run([RAY_CLI, "job", "status", "--address", address, "rayssl-test"],
                                env=env, capture_output=True, text=True, timeout=60)
    finally:
        head.send_signal(signal.SIGINT)  # --block: Ctrl-C stops the head's processes
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        end_processes_under(temp_dir)
    assert submit.returncode == 0, logs[-4000:]
    assert "Job 'rayssl-test' succeeded" in re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr), logs[-4000:]
    # The job's output is the run's: its last JSON line is the summary, also in summary.json.
    summary = json.loads([ln for ln in logs.splitlines() if ln.startswith('{"method"')][-1])
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["steps"] == 128 // 32 and summary["output"] == str(out)
    # The job joined the cluster (RAY_ADDRESS): the time that took, then where the rest went.
    t = summary["time"]
    assert t["ray_start_s"] >= 0 and 0 < t["steps_s"] < summary["wall_s"] <= t["after_ray_start_s"] + 0.1
    ckpt = Path(summary["checkpoint"])
    assert ckpt.parent == out and verify_checkpoint_dir(ckpt)["world_size"] == 2
    assert (out / "config.yaml").is_file()

    # The secret was within the run's reach: its driver and workers inherited it.
    assert holders == {"train worker", "job driver"}, holders
    # Nothing the run printed, wrote or logged holds the planted credentials.
    assert find_needles(needles, logs.encode()) == []
    written = {p.name for p in out.rglob("*") if p.is_file()}
    assert {"config.yaml", "summary.json", MODEL_FILE, "rank_0.pt", "rank_1.pt"} <= written
    assert scan_tree(out, needles) == {}
    sessions = [p for p in Path(temp_dir).rglob("session_*") if p.is_dir() and not p.is_symlink()]
    assert len(sessions) == 1, sessions
    # The right place: the workers' own log lines are in there.
    assert any(b"[rayssl]" in p.read_bytes() for p in (sessions[0] / "logs").rglob("*") if p.is_file())
    assert scan_tree(sessions[0], needles) == {}
    shutil.rmtree(temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------- several nodes


def run_cluster_session(module: str, function: str, *args, **env: str) -> subprocess.CompletedProcess:
    """``module.function(*args)`` (a test module's cluster session) in a subprocess with its own Ray
    temp dir, whose processes are ended afterwards whatever happened."""
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    code = (f"import sys; sys.path.insert(0, sys.argv[1]); import {module} as t; "
            f"t.{function}(*sys.argv[2:])")
    try:
        return subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), *map(str, args)],
                              cwd=REPO, capture_output=True, text=True,
                              # Every node is on loopback: without this, Ray resolves a 127.0.0.1
                              # cluster address to the machine's network address, which the
                              # loopback-only GCS does not listen on.
                              env=_isolated_env(temp_dir, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **env),
                              timeout=540)
    finally:
        end_processes_under(temp_dir)
