"""A training run's metrics -> ``metrics.jsonl``, ``curves.png``, TensorBoard, MLflow, W&B.

``RunRecorder.record`` takes one report of rank 0: a log step's row (every
``run.log_every_steps``: loss, lr, images/s, data wait) or an epoch's report, and updates the
outputs; the picture is redrawn after every epoch (a crashed run still leaves its curves). In a
run it is called by ``rayssl.runtime.callbacks.RunTracker`` in the Ray Train controller, which
receives every ``ray.train.report`` of the workers. Ray Train V2 has no built-in
TensorBoard/MLflow/W&B logger callback (Tune's are Tune-only, ``setup_mlflow`` and
``setup_wandb`` run inside a worker), so they are written here: TensorBoard event files through
tensorboardX (a Ray Tune dependency, its synchronous writer), MLflow and W&B only when asked
for. The tracker runs' ids go to ``<output>/trackers.json``, beside the checkpoints: a
``--resume`` continues the same MLflow and W&B runs. No Ray import.

Written under the run's ``--output``:
  ``metrics.jsonl``  one JSON object per epoch (rank 0's report: epoch, step, loss, lr,
                     images_per_s, images_seen, and the metric when evaluated), and one per log
                     step with ``"kind": "step"`` (step, fractional epoch, the log window's mean
                     loss, lr, images_per_s, data_wait_pct); a resumed run replaces the rows of
                     the steps it trains again; an evaluation that ran beside training and came
                     with a later report (``late_evaluations``) joins the row of its own epoch,
                     with ``reported_epoch`` saying which epoch's report brought it;
  ``curves.png``     loss / lr / images/s / metric against the epoch;
  ``tensorboard/``   event files, with ``--tensorboard`` (or the directory it names): epoch rows as
                     ``train/<key>`` at the epoch, step rows as ``step/<key>`` at the step;
  ``wandb/``         with ``--wandb PROJECT`` and a local output (W&B's own files, e.g. an offline run).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time

from rayssl.storage import S3Options, exists, is_remote, read_text, write_text
from rayssl.viz.figures import plot_training_curves

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TRACKERS_FILE = "trackers.json"  # the MLflow and W&B run ids, for --resume
STEP_ROWS_EVERY_S = 30.0  # metrics.jsonl is rewritten for new step rows at most this often (and at each epoch)


def tracking_requirements(tensorboard: str | None, mlflow: str | None, output: str, wandb: str | None = None) -> None:
    """Raise ValueError (one line naming the flag) when a requested tracker cannot work."""
    if tensorboard is not None:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise ValueError("--tensorboard: needs the tensorboardX package (pip install tensorboardX)") from None
        if tensorboard == "" and is_remote(output):
            raise ValueError(f"--tensorboard: --output {output} is remote; give a local directory for the "
                             "event files (--tensorboard DIR)")
    if mlflow is not None:
        try:
            import mlflow as _  # noqa: F401
        except ImportError:
            raise ValueError("--mlflow: mlflow is not installed (pip install mlflow), or drop --mlflow") from None
    if wandb is not None:
        if not wandb.strip() or "/" in wandb:
            raise ValueError(f"--wandb: give a W&B project name (got {wandb!r}; the entity comes from WANDB_ENTITY)")
        try:
            import wandb as _wandb  # noqa: F401
        except ImportError:
            raise ValueError("--wandb: wandb is not installed (pip install wandb), or drop --wandb") from None


def wandb_environment() -> dict[str, str]:
    """The ``WANDB_*`` settings of this process (mode, entity, directory, error reporting...) for
    the process that records, which may not have inherited them (a Ray that was already running);
    never a credential: keys, tokens and passwords stay where they are."""
    secret = ("KEY", "TOKEN", "PASSWORD", "SECRET")
    return {k: v for k, v in os.environ.items() if k.startswith("WANDB_") and not any(w in k for w in secret)}


def _read_rows(output: str, options: S3Options | None) -> list[dict]:
    uri = f"{output.rstrip('/')}/{METRICS_FILE}"
    if not exists(uri, options):
        return []
    return [json.loads(line) for line in read_text(uri, options).splitlines() if line.strip()]


def _epoch_and_step_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    return [r for r in rows if r.get("kind") != "step"], [r for r in rows if r.get("kind") == "step"]


def read_history(output: str, options: S3Options | None = None) -> list[dict]:
    """The per-epoch metrics a run wrote (``[]`` when it has none yet)."""
    return _epoch_and_step_rows(_read_rows(output, options))[0]


def read_steps(output: str, options: S3Options | None = None) -> list[dict]:
    """The per-log-step rows a run wrote (``[]`` when it has none yet)."""
    return _epoch_and_step_rows(_read_rows(output, options))[1]


def _scalars(metrics: dict) -> dict:
    return {k: v if isinstance(v, int) else float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class RunRecorder:
    """Records rank 0's reports; see the module docstring for what it writes.

    ``wandb``: the W&B project (``--wandb``); ``wandb_env``: the command's ``WANDB_*`` settings
    (``wandb_environment``: e.g. ``WANDB_MODE=offline``), set where the recorder runs unless set
    there already. No credential is held here: W&B and MLflow read theirs from the environment
    of the process that records (``wandb login``, or the job's runtime environment).
    """

    def __init__(self, output: str, metric: str | None, title: str = "", tensorboard: str | None = None,
                 mlflow: str | None = None, run_name: str = "", params: dict | None = None,
                 epochs: int | None = None, options: S3Options | None = None, wandb: str | None = None,
                 wandb_env: dict[str, str] | None = None):
        self.output = output.rstrip("/")
        self.options = options  # the run's storage options, carried into the Ray Train controller
        self.metric, self.title = metric, title
        self.tb_dir = (f"{self.output}/tensorboard" if tensorboard == "" else tensorboard)
        self.mlflow_uri, self.run_name, self.params = mlflow, run_name, params or {}
        self.wandb_project, self.wandb_env = wandb, dict(wandb_env or {})
        self.epochs = epochs
        self._history: list[dict] | None = None  # epoch rows
        self._steps: list[dict] = []  # step rows
        self._written = 0.0  # when metrics.jsonl was last written
        self._tb = self._mlflow_run = self._wandb_run = None

    def __getstate__(self):  # the writers live in the controller only
        state = dict(self.__dict__)
        state["_tb"] = state["_mlflow_run"] = state["_wandb_run"] = None
        return state

    def record(self, metrics: dict) -> None:
        """Add one report of rank 0: a log step's ``step_log`` row, or an epoch's report."""
        if self._history is None:  # on --resume, keep the rows before this attempt
            self._history, self._steps = _epoch_and_step_rows(_read_rows(self.output, self.options))
        if isinstance(metrics.get("step_log"), dict):
            self._record_step(_scalars(metrics["step_log"]))
            return
        row = _scalars(metrics)
        if "epoch" not in row:
            return
        self._history = [r for r in self._history if r.get("epoch", 0) < row["epoch"]] + [row]
        late = [_scalars(r) for r in metrics.get("late_evaluations") or ()]  # earlier epochs' scores
        for r in late:  # into the row of their own epoch
            for h in self._history:
                if int(h.get("epoch", -1)) == int(r["epoch"]):
                    h.update({k: v for k, v in r.items() if k != "epoch"})
        self._write_rows()
        plot_training_curves(self._history, f"{self.output}/{CURVES_FILE}", self.metric, self.title,
                             options=self.options)
        step = int(row.get("step", 0))
        self._log_epoch(row, step)
        for i, r in enumerate(late, 1):  # W&B keeps one row per step, and its step only goes forward:
            self._log_epoch(r, step + i)  # an earlier epoch's score is a row of the next step(s)
        if self.epochs is not None and row["epoch"] >= self.epochs:
            self.close()

    def _log_epoch(self, row: dict, wandb_step: int) -> None:
        """An epoch's values to the trackers: at the epoch in TensorBoard and MLflow; in W&B, whose
        x axis is the step, at ``wandb_step`` with the epoch as a value (its charts draw against it)."""
        epoch = int(row["epoch"])
        values = {k: v for k, v in row.items() if k != "epoch"}
        self._tensorboard(values, epoch, "train")
        if self.mlflow_uri is not None:
            self._mlflow().log_metrics(values, step=epoch)
        if self.wandb_project is not None:
            self._wandb().log({"epoch": epoch, **{f"epoch/{k}": v for k, v in values.items() if k != "step"}},
                              step=wandb_step)

    def _record_step(self, row: dict) -> None:
        if "step" not in row:
            return
        step = int(row["step"])
        # a restarted or resumed attempt trains these steps again: its rows replace the earlier ones
        self._steps = [r for r in self._steps if r["step"] < step] + [{"kind": "step", **row}]
        self._history = [r for r in self._history if r.get("step", 0) < step]
        if time.monotonic() - self._written >= STEP_ROWS_EVERY_S:
            self._write_rows()
        values = {f"step/{k}": v for k, v in row.items() if k != "step"}
        self._tensorboard(values, step, None)
        if self.mlflow_uri is not None:
            self._mlflow().log_metrics(values, step=step)
        if self.wandb_project is not None:
            self._wandb().log(values, step=step)

    def _write_rows(self) -> None:
        rows, steps = [], iter(self._steps)  # each epoch's row after its steps' rows
        pending = next(steps, None)
        for epoch_row in self._history:
            while pending is not None and pending["step"] <= epoch_row.get("step", pending["step"]):
                rows.append(pending)
                pending = next(steps, None)
            rows.append(epoch_row)
        rows += [pending, *steps] if pending is not None else []
        write_text(f"{self.output}/{METRICS_FILE}", "".join(json.dumps(r) + "\n" for r in rows), self.options)
        self._written = time.monotonic()

    def _tensorboard(self, values: dict, step: int, prefix: str | None) -> None:
        if self.tb_dir is None:
            return
        # tensorboardX's synchronous events writer: SummaryWriter queues events for a
        # background thread that its flush() does not wait for, so the last epoch of a
        # run could be missing from the file.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        if self._tb is None:
            os.makedirs(self.tb_dir, exist_ok=True)
            self._tb = EventsWriter(os.path.join(self.tb_dir, "events"))
        for k, v in values.items():
            tag = f"{prefix}/{k}" if prefix else k
            self._tb.write_event(Event(wall_time=time.time(), step=step, summary=scalar(tag, v)))
        self._tb.flush()

    def _run_ids(self) -> dict:
        uri = f"{self.output}/{TRACKERS_FILE}"
        return json.loads(read_text(uri, self.options)) if exists(uri, self.options) else {}

    def _save_run_id(self, tracker: str, ids: dict) -> None:
        stored = self._run_ids()
        stored[tracker] = ids
        write_text(f"{self.output}/{TRACKERS_FILE}", json.dumps(stored, indent=2), self.options)

    def _mlflow(self):
        """The run's MLflow run, started on first use; the one ``trackers.json`` names on a resume."""
        import mlflow

        if self._mlflow_run is None:
            if self.mlflow_uri:
                mlflow.set_tracking_uri(self.mlflow_uri)
            previous = self._run_ids().get("mlflow", {}).get("run_id")
            if previous:
                self._mlflow_run = mlflow.start_run(run_id=previous)
            else:
                mlflow.set_experiment("rayssl")
                self._mlflow_run = mlflow.start_run(run_name=self.run_name or None)
                mlflow.log_params({k: str(v)[:250] for k, v in self.params.items()})
                self._save_run_id("mlflow", {"run_id": self._mlflow_run.info.run_id})
        return mlflow

    def _wandb(self):
        """The run's W&B run, started on first use (resumed by the id ``trackers.json`` keeps)."""
        if self._wandb_run is None:
            for k, v in self.wandb_env.items():
                os.environ.setdefault(k, v)
            import wandb

            stored = self._run_ids().get("wandb", {})
            run_id = stored.get("id") if stored.get("project") == self.wandb_project else None
            run_id = run_id or secrets.token_hex(4)
            self._wandb_run = wandb.init(
                project=self.wandb_project, id=run_id, resume="allow", name=self.run_name or None,
                config=self.params,
                dir=None if is_remote(self.output) else self.output,
                settings=wandb.Settings(console="off"))  # the controller's own output stays its own
            self._wandb_run.define_metric("epoch/*", step_metric="epoch")  # epoch rows drawn against the epoch
            if not stored.get("id") == run_id:
                self._save_run_id("wandb", {"project": self.wandb_project, "id": run_id})
        return self._wandb_run

    def close(self) -> None:
        """End the tracker runs (the run's last epoch, or the run stopped)."""
        if self._mlflow_run is not None:
            import mlflow

            mlflow.end_run()
            self._mlflow_run = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
