"""What ``rayssl.runtime.internals`` reads of Ray's internals is still there, in the installed Ray.

Each use of a private Ray API lives in that one file; these tests fail loudly, naming what
moved, when a Ray release changes it (check the file against ``RAY_VERSION_WRITTEN_AGAINST``).
"""

from __future__ import annotations

import inspect
import os

import pytest
import ray

from rayssl.checkpoint import CheckpointError
from rayssl.runtime import internals


def test_the_checkpoint_snapshot_has_the_fields_resume_reads_and_rewrites():
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    def fields_of(model) -> set:
        return set(getattr(model, "model_fields", None) or model.__fields__)

    fields = fields_of(_CheckpointManagerState)
    missing = [k for k in (*internals.SNAPSHOT_KEYS_READ, *internals.SNAPSHOT_KEYS_FILTERED) if k not in fields]
    assert missing == [], f"Ray {ray.__version__}'s checkpoint snapshot lost {missing}"
    assert set(internals.RESULT_KEYS_READ) <= fields_of(_TrainingResultState)
    assert internals.SNAPSHOT_FILE == "checkpoint_manager_snapshot.json"
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    assert CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == internals.SNAPSHOT_FILE


def test_a_snapshot_in_another_format_is_refused_naming_both_ray_versions(tmp_path):
    (tmp_path / internals.SNAPSHOT_FILE).write_text('{"results": []}')
    with pytest.raises(CheckpointError, match=rf"written against Ray {internals.RAY_VERSION_WRITTEN_AGAINST}, "
                                              rf"running Ray {ray.__version__}.*checkpoint_results"):
        internals.resume_point(str(tmp_path))


def test_the_autoscaler_state_and_the_loopback_option_are_still_there():
    from ray._private.state import state

    assert callable(state.get_cluster_config) and callable(state.get_max_resources_from_cluster_config)
    assert internals.autoscaler_capacity() is None  # no Ray connected: nothing to scale to
    source = inspect.getsource(ray.init)
    assert all(f'"{k}"' in source for k in internals.local_init_options()), "ray.init no longer reads them"


def test_the_per_report_log_line_comes_from_the_logger_that_is_quietened():
    import logging

    from ray.train.v2._internal.execution import context

    assert context.__file__.endswith(internals.REPORT_LOGGER_FILE)
    source = inspect.getsource(context)
    assert "logging.getLogger(__file__)" in source and "Reporting training result" in source
    logger = logging.getLogger(context.__file__)
    level = logger.level
    try:
        logger.setLevel(logging.INFO)
        internals.quiet_report_lines()
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(level)


def test_a_local_ray_is_started_with_a_faster_train_poll_and_the_users_setting_wins(monkeypatch):
    """``local_environment``: Ray Train reads the variable it sets; a process started inside it
    (as ray.init starts the local Ray's processes) has it; the environment is as it was after;
    a value the user set is neither replaced nor removed."""
    import subprocess
    import sys

    from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR

    assert internals.TRAIN_POLL_ENV == HEALTH_CHECK_INTERVAL_S_ENV_VAR
    read = [sys.executable, "-c", f"import os; print(os.environ.get({internals.TRAIN_POLL_ENV!r}))"]
    monkeypatch.delenv(internals.TRAIN_POLL_ENV, raising=False)
    with internals.local_environment():
        assert subprocess.run(read, capture_output=True, text=True).stdout.strip() == internals.LOCAL_TRAIN_POLL_S
    assert internals.TRAIN_POLL_ENV not in os.environ
    monkeypatch.setenv(internals.TRAIN_POLL_ENV, "3")
    with internals.local_environment():
        assert os.environ[internals.TRAIN_POLL_ENV] == "3"
    assert os.environ[internals.TRAIN_POLL_ENV] == "3"
