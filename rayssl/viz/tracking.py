"""Per-epoch metrics of a training run -> ``metrics.jsonl``, ``curves.png``, TensorBoard, MLflow.

``RunRecorder.record`` takes one epoch's report (rank 0's) and rewrites the outputs, so the
picture is redrawn after every epoch (a crashed run still leaves its curves). In a run it is
called by ``rayssl.runtime.callbacks.RunTracker`` in the Ray Train controller, which receives
every ``ray.train.report`` of the workers, so nothing changes in the training loop. Ray Train
V2 has no built-in TensorBoard/MLflow logger callback (Tune's ``TBXLoggerCallback`` and
``MLflowLoggerCallback`` are Tune-only, and ``setup_mlflow`` runs inside a worker), so both are
written here: TensorBoard event files through tensorboardX (a Ray Tune dependency, so it is
installed with rayssl; its synchronous writer), MLflow only when asked for. No Ray import.

Written under the run's ``--output``:
  ``metrics.jsonl``  one JSON object per epoch (rank 0's report: epoch, step, loss, lr,
                     images_per_s, images_seen, and the method's metric when evaluated);
  ``curves.png``     loss / lr / images/s / metric against the epoch;
  ``tensorboard/``   event files, with ``--tensorboard`` (or the directory it names).
"""

from __future__ import annotations

import json
import math
import os
import time

from rayssl.storage import S3Options, exists, is_remote, read_text, write_text
from rayssl.viz.figures import plot_training_curves

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def tracking_requirements(tensorboard: str | None, mlflow: str | None, output: str) -> None:
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


def read_history(output: str, options: S3Options | None = None) -> list[dict]:
    """The per-epoch metrics a run wrote (``[]`` when it has none yet)."""
    uri = f"{output.rstrip('/')}/{METRICS_FILE}"
    if not exists(uri, options):
        return []
    return [json.loads(line) for line in read_text(uri, options).splitlines() if line.strip()]


def _scalars(metrics: dict) -> dict:
    return {k: v if isinstance(v, int) else float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class RunRecorder:
    """Records rank 0's per-epoch report; see the module docstring for what it writes."""

    def __init__(self, output: str, metric: str | None, title: str = "", tensorboard: str | None = None,
                 mlflow: str | None = None, run_name: str = "", params: dict | None = None,
                 epochs: int | None = None, options: S3Options | None = None):
        self.output = output.rstrip("/")
        self.options = options  # the run's storage options, carried into the Ray Train controller
        self.metric, self.title = metric, title
        self.tb_dir = (f"{self.output}/tensorboard" if tensorboard == "" else tensorboard)
        self.mlflow_uri, self.run_name, self.params = mlflow, run_name, params or {}
        self.epochs = epochs
        self._history: list[dict] | None = None
        self._tb = None
        self._mlflow_run = None

    def __getstate__(self):  # the writers live in the controller only
        state = dict(self.__dict__)
        state["_tb"] = state["_mlflow_run"] = None
        return state

    def record(self, metrics: dict) -> None:
        """Add one epoch (rank 0's report) and rewrite the outputs."""
        row = _scalars(metrics)
        if "epoch" not in row:
            return
        if self._history is None:  # on --resume, keep the epochs before this attempt
            self._history = read_history(self.output, self.options)
        self._history = [r for r in self._history if r.get("epoch", 0) < row["epoch"]] + [row]
        write_text(f"{self.output}/{METRICS_FILE}", "".join(json.dumps(r) + "\n" for r in self._history),
                   self.options)
        plot_training_curves(self._history, f"{self.output}/{CURVES_FILE}", self.metric, self.title,
                             options=self.options)
        step = int(row["epoch"])
        if self.tb_dir is not None:
            # tensorboardX's synchronous events writer: SummaryWriter queues events for a
            # background thread that its flush() does not wait for, so the last epoch of a
            # run could be missing from the file.
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.summary import scalar

            if self._tb is None:
                os.makedirs(self.tb_dir, exist_ok=True)
                self._tb = EventsWriter(os.path.join(self.tb_dir, "events"))
            for k, v in row.items():
                if k != "epoch":
                    self._tb.write_event(Event(wall_time=time.time(), step=step, summary=scalar(f"train/{k}", v)))
            self._tb.flush()
        if self.mlflow_uri is not None:
            import mlflow

            if self._mlflow_run is None:
                if self.mlflow_uri:
                    mlflow.set_tracking_uri(self.mlflow_uri)
                mlflow.set_experiment("rayssl")
                self._mlflow_run = mlflow.start_run(run_name=self.run_name or None)
                mlflow.log_params({k: str(v)[:250] for k, v in self.params.items()})
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=step)
            if self.epochs is not None and step >= self.epochs:
                mlflow.end_run()
                self._mlflow_run = None
