"""The task registry: a run's task is built once, by name, from the ``task`` config group; the
names and options come from the YAMLs, not from the engine."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from deflect.tasks import TASKS, ClassificationTask, SegmentationTask, Task, build_task
from deflect.tasks.registry import register_task
from tests.conftest import REPO


def composed_task(*overrides: str) -> dict:
    """The ``task`` node of the composed config, resolved as a run resolves it."""
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg.task, resolve=True)


def test_every_task_yaml_names_a_registered_task():
    names = {p.stem: OmegaConf.load(p).get("name") for p in (REPO / "configs/task").glob("*.yaml")}
    assert names and all(name == stem for stem, name in names.items())
    assert set(names) <= set(TASKS)


def test_the_default_run_builds_segmentation_and_a_dataset_yaml_selects_classification():
    assert isinstance(build_task(composed_task()), SegmentationTask)
    task = build_task(composed_task("dataset=m_bigearthnet"))
    # The YAML's options reach the task: m-bigearthnet has label sets (multi_label from the
    # dataset), so mAP is a monitor and the labels are decided at the YAML's threshold 0.5.
    assert isinstance(task, ClassificationTask) and task.multi_label and task.threshold == 0.5
    assert "mAP" in task.monitors


def test_a_config_saved_before_tasks_had_names_still_builds_its_task():
    """Run folders saved with ``task._target_`` (and older ones with no task at all)."""
    saved = {"_target_": "deflect.tasks.ClassificationTask", "multi_label": True}
    task = build_task(saved)
    assert isinstance(task, ClassificationTask) and task.multi_label
    assert isinstance(build_task(None), SegmentationTask)


def test_an_unknown_task_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"task.name='parrot' is no task; the tasks are \["):
        build_task({"name": "parrot"})
    with pytest.raises(ValueError, match="has no name"):
        build_task({"multi_label": True})


def test_two_tasks_of_one_name_are_refused():
    class Impostor(Task):
        name = "segmentation"

    with pytest.raises(ValueError, match="two tasks are named 'segmentation'"):
        register_task(Impostor)
    assert TASKS["segmentation"] is SegmentationTask


def test_a_monitor_outside_the_tasks_is_refused_naming_them():
    task = SegmentationTask()
    assert task.headline == "mIoU" and task.higher_is_better("mIoU")
    with pytest.raises(
        ValueError, match=r"monitor='rmse': a segmentation run can monitor \['mIoU'"
    ):
        task.higher_is_better("rmse")
