"""scripts/select_hparams.py: hyperparameters chosen on validation (never on test), written as
Hydra options that compose to the chosen values, and the whole protocol through run.py."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY, load_script, run_cli


def select_script():
    return load_script("select_hparams")


def write_stage1(folder: Path, runs: list[tuple[dict[str, str], float, float]]) -> Path:
    """A stage-1 sweep as run.py leaves it: per job ``(overrides, validation mIoU, test mIoU)``;
    ``metrics.json`` holds both (``best_val`` and ``test``), as a finished run's does."""
    for i, (settings, val, test) in enumerate(runs):
        run = folder / f"{i:03d}_tiny_vit_{settings.get('finetune', 'x')}_demo"
        run.mkdir(parents=True)
        overrides = [f"{k}={v}" for k, v in settings.items()]
        (run / "job.json").write_text(json.dumps({"overrides": overrides}))
        metrics = {"best_val": {"epoch": 2, "mIoU": val}, "test": {"mIoU": test}}
        (run / "metrics.json").write_text(json.dumps(metrics))
    return folder


#: validation and test disagree on every method's best learning rate: validation prefers
#: 1e-4 for deflect and 1e-3 for lora (mean over two seeds), test the other one.
DISAGREE = [
    ({"finetune": "deflect", "optimizer.lr": "1e-4", "seed": "0", "epochs": "3"}, 0.60, 0.40),
    ({"finetune": "deflect", "optimizer.lr": "1e-4", "seed": "1", "epochs": "3"}, 0.58, 0.41),
    ({"finetune": "deflect", "optimizer.lr": "1e-3", "seed": "0", "epochs": "3"}, 0.50, 0.70),
    ({"finetune": "deflect", "optimizer.lr": "1e-3", "seed": "1", "epochs": "3"}, 0.62, 0.72),
    ({"finetune": "lora", "optimizer.lr": "1e-4", "seed": "0", "epochs": "3"}, 0.30, 0.90),
    ({"finetune": "lora", "optimizer.lr": "1e-4", "seed": "1", "epochs": "3"}, 0.30, 0.90),
    ({"finetune": "lora", "optimizer.lr": "1e-3", "seed": "0", "epochs": "3"}, 0.40, 0.20),
    ({"finetune": "lora", "optimizer.lr": "1e-3", "seed": "1", "epochs": "3"}, 0.40, 0.20),
]


def test_selection_is_on_validation_never_on_test(tmp_path):
    """deflect: validation means 0.59 (1e-4) against 0.56 (1e-3) -> 1e-4, although test says
    1e-3 (0.405 against 0.71) and 1e-3 has the single best validation run (0.62); lora: 0.40
    (1e-3) against 0.30 -> 1e-3, although test prefers 1e-4."""
    sweep = write_stage1(tmp_path / "stage1", DISAGREE)
    script = select_script()
    assert script.main([str(sweep), "--metric", "mIoU", "--seeds", "3"]) == 0
    summary = yaml.safe_load((sweep / "selected.yaml").read_text())
    methods = summary["methods"]
    assert methods["deflect"]["chosen"] == {"optimizer.lr": "1e-4"}
    assert methods["deflect"]["validation"] == pytest.approx(0.59)
    assert methods["lora"]["chosen"] == {"optimizer.lr": "1e-3"}
    assert summary["split"] == "validation"
    assert "seed=0,1,2" in summary["stage_2"] and "epochs=3" in summary["stage_2"]
    assert "+selected=deflect,lora" in summary["stage_2"]
    # lower-is-better (as an rmse would be) picks the other ends
    chosen, _, _ = script.select(script.collect_trials(sweep), "mIoU", higher_is_better=False)
    assert chosen["deflect"]["chosen"] == {"optimizer.lr": "1e-3"}
    assert chosen["lora"]["chosen"] == {"optimizer.lr": "1e-4"}


def test_the_direction_comes_from_the_runs_task(tmp_path):
    """Runs whose config.yaml is a regression task's (monitor null: rmse, lower is better):
    without any flag the selection takes the lowest validation rmse (deflect 1e-3: 0.56 mean,
    lora 1e-4: 0.30), and selected.yaml records the direction."""
    from omegaconf import OmegaConf

    sweep = tmp_path / "stage1"
    write_stage1(sweep, [(s, val, test) for s, val, test in DISAGREE])
    for run in sweep.iterdir():
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["best_val"] = {"epoch": 2, "rmse": metrics["best_val"].pop("mIoU")}
        (run / "metrics.json").write_text(json.dumps(metrics))
        task = OmegaConf.load(REPO / "configs" / "task" / "regression.yaml")
        (run / "config.yaml").write_text(OmegaConf.to_yaml({"task": task, "monitor": None}))
    assert select_script().main([str(sweep)]) == 0
    summary = yaml.safe_load((sweep / "selected.yaml").read_text())
    assert summary["metric"] == "rmse" and summary["higher_is_better"] is False
    assert summary["methods"]["deflect"]["chosen"] == {"optimizer.lr": "1e-3"}
    assert summary["methods"]["lora"]["chosen"] == {"optimizer.lr": "1e-4"}


def test_options_compose_to_the_chosen_values_through_hydra(tmp_path):
    """The written ``selected/selected/<method>.yaml`` composed by Hydra as stage 2 does: the
    method's config group and its chosen learning rate; the other's its own."""
    from hydra import compose, initialize_config_dir

    sweep = write_stage1(tmp_path / "stage1", DISAGREE)
    assert select_script().main([str(sweep), "--metric", "mIoU"]) == 0
    searchpath = f"hydra.searchpath=[file://{(sweep / 'selected').resolve()}]"
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        deflect = compose("config", overrides=[searchpath, "+selected=deflect"])
        lora = compose("config", overrides=[searchpath, "+selected=lora"])
    assert deflect.finetune._target_ == "deflect.tuners.DeflectConfig"
    assert deflect.optimizer.lr == pytest.approx(1e-4)
    assert lora.finetune._target_ == "deflect.tuners.LoraConfig"
    assert lora.optimizer.lr == pytest.approx(1e-3)


def test_no_run_with_validation_metrics_or_an_unknown_metric_is_an_error(tmp_path, capsys):
    script = select_script()
    assert script.main([str(tmp_path)]) == 1
    assert "no run with validation metrics" in capsys.readouterr().err
    sweep = write_stage1(tmp_path / "stage1", DISAGREE)
    assert script.main([str(sweep), "--metric", "mF1"]) == 1
    assert "validation metric 'mF1' not recorded; it has ['mIoU']" in capsys.readouterr().err


@pytest.mark.slow
def test_the_protocol_end_to_end_through_run_py(demo_root, tmp_path):
    """Stage 1 (frozen and lora at two learning rates) through run.py's multirun, the
    selection from the runs' own records (the monitor from config.yaml), and stage 2 as the
    one printed multirun: every job at its method's chosen learning rate, two seeds; its table
    names the rows by method."""
    common = [*TINY, "epochs=1", "max_steps_per_epoch=1", "save_predictions=false",
              "num_vis=0", f"dataset.root={demo_root}"]  # fmt: skip
    stage1 = tmp_path / "stage1"
    run_cli(["-m", "finetune=frozen,lora", "optimizer.lr=1e-4,1e-2", *common,
             f"hydra.sweep.dir={stage1}"], tmp_path)  # fmt: skip
    script = select_script()
    assert script.main([str(stage1), "--seeds", "2"]) == 0
    summary = yaml.safe_load((stage1 / "selected.yaml").read_text())
    assert summary["metric"] == "mIoU"
    expected = {}
    for method, entry in summary["methods"].items():
        vals = {}
        for run in stage1.glob(f"*_{method}_demo"):
            job = json.loads((run / "job.json").read_text())["overrides"]
            lr = next(o.split("=")[1] for o in job if o.startswith("optimizer.lr="))
            vals[lr] = json.loads((run / "metrics.json").read_text())["best_val"]["mIoU"]
        best = max(vals, key=vals.get)
        assert entry["chosen"] == {"optimizer.lr": best}, (method, vals)
        expected[method] = float(best)
    stage2 = tmp_path / "stage2"
    args = shlex.split(summary["stage_2"])[3:]  # after `python run.py -m`
    run_cli(["-m", *args, f"hydra.sweep.dir={stage2}"], tmp_path)
    runs = sorted(p for p in stage2.iterdir() if (p / "metrics.json").is_file())
    assert len(runs) == 4
    for run in runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        method = "lora" if "Lora" in cfg["finetune"]["_target_"] else "frozen"
        assert cfg["optimizer"]["lr"] == pytest.approx(expected[method])
    # The stage-2 table: rows named by method, paired against frozen on both seeds.
    table = load_script("ablation_table")
    assert table.main([str(stage2), "--reference", "frozen"]) == 0
    text = (stage2 / "results.md").read_text()
    assert "| frozen | 2 (0, 1) |" in text and "| lora | 2 (0, 1) |" in text
    assert "(seeds 0, 1) |" in text and "All 4 jobs finished." in text


#: deflect_hard has the single best validation run (0.70) but deflect_embedding the best mean at
#: lr scale 10 ((0.66 + 0.64) / 2 = 0.65 against hard's (0.70 + 0.50) / 2 = 0.60); test says hard.
FAMILY = [
    ({"finetune": "deflect_hard", "encoder_lr_scale": "10", "seed": "0"}, 0.70, 0.90),
    ({"finetune": "deflect_hard", "encoder_lr_scale": "10", "seed": "1"}, 0.50, 0.90),
    ({"finetune": "deflect_hard", "encoder_lr_scale": "1", "seed": "0"}, 0.40, 0.90),
    ({"finetune": "deflect_hard", "encoder_lr_scale": "1", "seed": "1"}, 0.40, 0.90),
    ({"finetune": "deflect_embedding", "encoder_lr_scale": "10", "seed": "0"}, 0.66, 0.10),
    ({"finetune": "deflect_embedding", "encoder_lr_scale": "10", "seed": "1"}, 0.64, 0.10),
    ({"finetune": "deflect_embedding", "encoder_lr_scale": "1", "seed": "0"}, 0.30, 0.10),
    ({"finetune": "deflect_embedding", "encoder_lr_scale": "1", "seed": "1"}, 0.30, 0.10),
    ({"finetune": "frozen", "encoder_lr_scale": "10", "seed": "0"}, 0.20, 0.50),
    ({"finetune": "frozen", "encoder_lr_scale": "10", "seed": "1"}, 0.20, 0.50),
    ({"finetune": "frozen", "encoder_lr_scale": "1", "seed": "0"}, 0.25, 0.50),
    ({"finetune": "frozen", "encoder_lr_scale": "1", "seed": "1"}, 0.25, 0.50),
]


def test_a_family_is_one_contestant_whose_member_is_chosen_on_validation(tmp_path):
    sweep = write_stage1(tmp_path / "stage1", FAMILY)
    script = select_script()
    assert script.main([str(sweep), "--metric", "mIoU",
                        "--family", "deflect=deflect_hard,deflect_embedding"]) == 0  # fmt: skip
    methods = yaml.safe_load((sweep / "selected.yaml").read_text())["methods"]
    assert set(methods) == {"deflect", "frozen"}
    assert methods["deflect"]["chosen"] == {"finetune": "deflect_embedding",
                                            "encoder_lr_scale": "10"}  # fmt: skip
    assert methods["deflect"]["validation"] == pytest.approx(0.65)
    assert methods["deflect"]["groups"] == {"finetune": "deflect_embedding"}
    assert len(methods["deflect"]["candidates"]) == 4
    assert methods["frozen"]["chosen"] == {"encoder_lr_scale": "1"}
    option = (sweep / "selected" / "selected" / "deflect.yaml").read_text()
    assert "- override /finetune: deflect_embedding" in option
    assert yaml.safe_load(option) == {"defaults": [{"override /finetune": "deflect_embedding"}],
                                      "encoder_lr_scale": 10}  # fmt: skip


def test_a_family_naming_a_choice_no_job_made_is_refused(tmp_path, capsys):
    sweep = write_stage1(tmp_path / "stage1", FAMILY)
    assert select_script().main([str(sweep), "--metric", "mIoU",
                                 "--family", "deflect=deflect_hard,deflect_soft"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "family 'deflect' lists ['deflect_soft'], which no stage-1 job chose" in err
