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


def family_sweep(datasets: tuple[str, ...] = ("",)) -> list[tuple[dict[str, str], float, float]]:
    """Stage 1 ``finetune=frozen,deflect_hard,deflect_embedding,deflect_none
    encoder_lr_scale=3,30 seed=0,1`` (per dataset when given). Validation means: frozen 0.41
    (3) / 0.44 (30); deflect_hard 0.51 / 0.55 with the single best run (0.80 at 30);
    deflect_embedding 0.61 / 0.57; deflect_none 0.55 / 0.25. Test always disagrees: it
    prefers deflect_hard at 30 (0.99) and ranks deflect_embedding at 3 last."""
    val = {
        ("frozen", "3"): (0.40, 0.42), ("frozen", "30"): (0.45, 0.43),
        ("deflect_hard", "3"): (0.50, 0.52), ("deflect_hard", "30"): (0.80, 0.30),
        ("deflect_embedding", "3"): (0.60, 0.62), ("deflect_embedding", "30"): (0.58, 0.56),
        ("deflect_none", "3"): (0.55, 0.55), ("deflect_none", "30"): (0.20, 0.30),
    }  # fmt: skip
    test = {("deflect_hard", "30"): 0.99, ("deflect_embedding", "3"): 0.01}
    runs = []
    for i, dataset in enumerate(datasets):
        for (method, scale), seeds in val.items():
            for seed, v in enumerate(seeds):
                settings = {"dataset": dataset} if dataset else {}
                settings.update({"finetune": method, "encoder_lr_scale": scale,
                                 "seed": str(seed)})  # fmt: skip
                # the second dataset: deflect_none and deflect_embedding swap their scores
                if i == 1 and method in ("deflect_none", "deflect_embedding"):
                    other = "deflect_none" if method == "deflect_embedding" else "deflect_embedding"
                    v = val[other, scale][seed]
                runs.append((settings, v, test.get((method, scale), 0.5)))
    return runs


FAMILY = {"deflect": ["deflect_hard", "deflect_embedding", "deflect_none"]}


def test_a_family_is_one_contestant_whose_choice_is_tuned(tmp_path):
    """--family deflect=...: two contestants, frozen and deflect; deflect's best mean is
    deflect_embedding at encoder_lr_scale=3 (0.61), not deflect_hard, whose single run at 30
    (0.80) is the sweep's best, nor the test metric's favourite; six candidates (3 x 2)."""
    sweep = write_stage1(tmp_path / "stage1", family_sweep())
    script = select_script()
    argv = [str(sweep), "--metric", "mIoU", "--seeds", "2",
            "--family", "deflect=deflect_hard,deflect_embedding,deflect_none"]  # fmt: skip
    assert script.main(argv) == 0
    summary = yaml.safe_load((sweep / "selected.yaml").read_text())
    methods = summary["methods"]
    assert list(methods) == ["frozen", "deflect"]
    deflect = methods["deflect"]
    assert deflect["chosen"] == {"finetune": "deflect_embedding", "encoder_lr_scale": "3"}
    assert deflect["groups"] == {"finetune": "deflect_embedding"}
    assert deflect["validation"] == pytest.approx(0.61)
    assert len(deflect["candidates"]) == 6
    means = {(c["overrides"]["finetune"], c["overrides"]["encoder_lr_scale"]): c["validation"]
             for c in deflect["candidates"]}  # fmt: skip
    assert means["deflect_hard", "30"] == pytest.approx(0.55)
    assert means["deflect_none", "3"] == pytest.approx(0.55)
    assert methods["frozen"]["chosen"] == {"encoder_lr_scale": "30"}
    assert methods["frozen"]["validation"] == pytest.approx(0.44)
    assert "+selected=frozen,deflect" in summary["stage_2"]
    option = (sweep / "selected" / "selected" / "deflect.yaml").read_text()
    assert "  - override /finetune: deflect_embedding\n" in option
    assert yaml.safe_load(option) == {
        "defaults": [{"override /finetune": "deflect_embedding"}],
        "encoder_lr_scale": 3,
    }
    # without the family every choice is its own contestant, as before
    chosen, _, _ = script.select(script.collect_trials(sweep), "mIoU")
    assert sorted(chosen) == ["deflect_embedding", "deflect_hard", "deflect_none", "frozen"]
    assert chosen["deflect_hard"]["chosen"] == {"encoder_lr_scale": "30"}
    # lower-is-better through the library call: the family's worst mean, deflect_none at 30
    low, _, _ = script.select(script.collect_trials(sweep), "mIoU", False, families=FAMILY)
    assert low["deflect"]["chosen"] == {"finetune": "deflect_none", "encoder_lr_scale": "30"}
    assert low["deflect"]["validation"] == pytest.approx(0.25)


def test_a_family_per_dataset_is_named_as_the_groups_are(tmp_path):
    """With dataset=a,b the family's contestants are a-deflect and b-deflect, each choosing its
    own member: deflect_embedding on a, deflect_none on b (the scores swapped)."""
    sweep = write_stage1(tmp_path / "stage1", family_sweep(("a", "b")))
    script = select_script()
    chosen, contestant, _ = script.select(script.collect_trials(sweep), "mIoU", families=FAMILY)
    assert contestant == ["dataset", "finetune"]
    assert sorted(chosen) == ["a-deflect", "a-frozen", "b-deflect", "b-frozen"]
    assert chosen["a-deflect"]["groups"] == {"dataset": "a", "finetune": "deflect_embedding"}
    assert chosen["b-deflect"]["groups"] == {"dataset": "b", "finetune": "deflect_none"}
    assert chosen["b-deflect"]["chosen"] == {"finetune": "deflect_none", "encoder_lr_scale": "3"}
    assert chosen["b-deflect"]["validation"] == pytest.approx(0.61)
    script.write_selection(sweep, chosen, {}, 2, "mIoU", True)
    option = yaml.safe_load((sweep / "selected" / "selected" / "b-deflect.yaml").read_text())
    assert option["defaults"] == [{"override /dataset": "b"},
                                  {"override /finetune": "deflect_none"}]  # fmt: skip


def test_a_family_choice_the_sweep_did_not_run_is_an_error(tmp_path, capsys):
    sweep = write_stage1(tmp_path / "stage1", family_sweep())
    script = select_script()
    trials = script.collect_trials(sweep)
    with pytest.raises(ValueError, match="family 'deflect': 'deflect_soft' is not a choice the "
                                         "sweep ran of a config group it varies \\(finetune: "
                                         "frozen, deflect_hard"):  # fmt: skip
        script.select(trials, "mIoU", families={"deflect": ["deflect_hard", "deflect_soft"]})
    with pytest.raises(ValueError, match="'3' is not a choice"):  # a tuned value, not a group's
        script.select(trials, "mIoU", families={"x": ["3"]})
    with pytest.raises(ValueError, match="'deflect_hard' is in two families"):
        script.select(trials, "mIoU", families={"x": ["deflect_hard"], "y": ["deflect_hard"]})
    with pytest.raises(ValueError, match="family 'frozen' is also a finetune choice"):
        script.select(trials, "mIoU", families={"frozen": ["deflect_hard"]})
    assert script.main([str(sweep), "--metric", "mIoU", "--family", "deflect=deflect_x"]) == 1
    assert "error: family 'deflect': 'deflect_x' is not a choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([str(sweep), "--metric", "mIoU", "--family", "deflect"])
    assert "expected NAME=choice1,choice2" in capsys.readouterr().err


def test_a_family_option_composes_through_hydra(tmp_path):
    """A real family, lowrank=lora,scaled_lora against frozen: stage 2's option selects the
    winning method's config and its chosen encoder_lr_scale."""
    from hydra import compose, initialize_config_dir

    runs = [({"finetune": m, "encoder_lr_scale": s, "seed": "0"}, v, 1 - v) for m, s, v in (
        ("frozen", "1", 0.3), ("lora", "1", 0.5), ("lora", "10", 0.4),
        ("scaled_lora", "1", 0.2), ("scaled_lora", "10", 0.7))]  # fmt: skip
    sweep = write_stage1(tmp_path / "stage1", runs)
    assert select_script().main([str(sweep), "--metric", "mIoU",
                                 "--family", "lowrank=lora,scaled_lora"]) == 0  # fmt: skip
    searchpath = f"hydra.searchpath=[file://{(sweep / 'selected').resolve()}]"
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        lowrank = compose("config", overrides=[searchpath, "+selected=lowrank"])
    assert lowrank.finetune._target_ == "deflect.tuners.ScaledLoraConfig"
    assert lowrank.encoder_lr_scale == 10


#: deflect_hard has the single best validation run (0.70) but deflect_embedding the best mean at
#: lr scale 10 ((0.66 + 0.64) / 2 = 0.65 against hard's (0.70 + 0.50) / 2 = 0.60); test says hard.
DEFLECT_FAMILY = [
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


def test_deflects_family_member_and_scale_are_chosen_together_on_validation(tmp_path):
    sweep = write_stage1(tmp_path / "stage1", DEFLECT_FAMILY)
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


def test_groups_on_the_sweeps_search_path_are_contestants_and_options_append_them(tmp_path):
    """``+study=a,b`` from one's own search path (the sweep's ``multirun.yaml`` names it) is a
    contestant like ``dataset``, and its option appends the group (``- /study: a``: no
    ``override``, the group is not in the defaults)."""
    own = tmp_path / "own"
    (own / "study").mkdir(parents=True)
    for name in ("a", "b"):
        (own / "study" / f"{name}.yaml").write_text("# @package _global_\nepochs: 2\n")
    runs = [({"+study": s, "encoder_lr_scale": lr, "seed": "0"}, val, 0.5)
            for s, lr, val in (("a", "1", 0.4), ("a", "10", 0.6), ("b", "1", 0.7),
                               ("b", "10", 0.2))]  # fmt: skip
    sweep = write_stage1(tmp_path / "stage1", runs)
    (sweep / "multirun.yaml").write_text(f"hydra:\n  searchpath:\n  - file://{own}\n")
    assert select_script().main([str(sweep), "--metric", "mIoU"]) == 0
    summary = yaml.safe_load((sweep / "selected.yaml").read_text())
    chosen = {k: v["chosen"] for k, v in summary["methods"].items()}
    assert chosen == {"a": {"encoder_lr_scale": "10"}, "b": {"encoder_lr_scale": "1"}}
    option = yaml.safe_load((sweep / "selected" / "selected" / "a.yaml").read_text())
    assert option == {"defaults": [{"/study": "a"}], "encoder_lr_scale": 10}
    assert f"file://{own}" in summary["stage_2"]  # stage 2 finds the options it appends
