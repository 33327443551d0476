"""An ablation as a user runs it: one multirun over methods and two seeds with a failing job,
then ``scripts/ablation_table.py`` on its sweep folder. The table's numbers are checked against
the runs' own ``metrics.json`` files, recomputed here."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO, TINY, load_script, run_cli
from tests.fakes import copy_with_band_names, write_geobench


def ablation_script():
    return load_script("ablation_table")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for what runs in this process (explain.py): the tiny model gains
    nothing from more, and a busy 2-core machine slows down a lot when threads compete."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sweep(demo_root, tmp_path_factory) -> Path:
    """frozen and lora, seeds 0 and 1, and a precision typo (fp42) that fails in every job it
    is in: 8 jobs, 4 finished, 4 failed."""
    cwd = tmp_path_factory.mktemp("sweep")
    proc = run_cli(["-m", "finetune=frozen,lora", "seed=0,1", "precision=fp32,fp42",
                    "save_predictions=false", "num_vis=1", *TINY,
                    f"dataset.root={demo_root}", "epochs=1"], cwd, check=False)  # fmt: skip
    assert proc.returncode != 0  # Hydra reports the failed jobs at the end
    (folder,) = (cwd / "work_dirs" / "multirun").iterdir()
    return folder


def test_every_job_has_its_folder_and_failures_say_why(sweep):
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(folders) == 8
    failed = [f for f in folders if (sweep / f / "failed.txt").is_file()]
    assert len(failed) == 4
    for name in failed:
        job = json.loads((sweep / name / "job.json").read_text())
        assert "precision=fp42" in job["overrides"]
        first = (sweep / name / "failed.txt").read_text().splitlines()[0]
        assert first.startswith("ValueError: precision='fp42'")
    # Each job's train.log ends with the job: Hydra's launch of the next job is not in it.
    for name in folders:
        log = (sweep / name / "train.log").read_text()
        assert "basic_launcher" not in log and f"#{int(name[:3]) + 1} :" not in log, name


def test_table_pools_seeds_and_lists_the_failed_jobs(sweep):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "ablation_table.py"),
                           str(sweep)], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = (sweep / "results.md").read_text()
    assert text.strip() == proc.stdout.split("wrote ")[0].strip()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}  # fmt: skip
    # Rows are told apart by method and precision; the two seeds are pooled.
    assert set(rows) - {"method"} == {"frozen precision=fp32", "lora precision=fp32"}
    for method in ("frozen", "lora"):
        runs = [json.loads((p / "metrics.json").read_text())
                for p in sorted(sweep.glob(f"*_{method}_demo")) if (p / "metrics.json").is_file()]  # fmt: skip
        assert len(runs) == 2
        row = rows[f"{method} precision=fp32"]
        miou = [100 * r["test"]["mIoU"] for r in runs]
        assert row[1] == "2 (0, 1)"
        assert row[6].startswith(f"{statistics.mean(miou):.2f} ± {statistics.stdev(miou):.2f} [")
        assert row[2] == f"{runs[0]['params']['encoder_trainable']:,}"
        assert row[3] == f"{runs[0]['params']['encoder_trainable_percent']:.4f} %"
        bare = [100 * r["test"]["per_class"]["bare"]["IoU"] for r in runs]
        assert row[8] == f"{statistics.mean(bare):.2f}"
    # LoRA rank 16 on the tiny ViT: 16 x 16 x 32 x 4 blocks.
    assert rows["lora precision=fp32"][2] == f"{16 * 16 * 32 * 4:,}"
    assert "Common settings:" in text and "`epochs=1`" in text
    assert text.count("- failed: ") == 4 and "precision='fp42'" in text
    image = Image.open(sweep / "results.png")
    assert image.format == "PNG" and image.size[0] > 400


def test_cross_sensor_results_sit_beside_the_same_sensor_ones(sweep, demo_root, tmp_path):
    """One seed of ``frozen`` evaluated on the demo's test tiles written as Landsat 8 files
    (``eval_dir=<run> dataset=folder dataset.sensor=landsat8``): the table gains the column
    ``mIoU on folder_landsat8`` with that run's number, marked 1 of 2 seeds."""
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    # Landsat 8's NIR is B5
    landsat = copy_with_band_names(demo_root, tmp_path / "landsat", ("B2", "B3", "B4", "B5"))
    run = next(p for p in sorted(copy.glob("*_frozen_demo")) if (p / "metrics.json").is_file())
    run_cli([f"eval_dir={run}", "dataset=folder", f"dataset.root={landsat}",
             "dataset.sensor=landsat8", "dataset.classes=[bare,sparse,moderate,dense]",
             "dataset.ignore_index=255", "dataset.reflectance_scale=10000", "num_vis=0",
             "save_predictions=false"], tmp_path)  # fmt: skip
    crossed = json.loads((run / "cross_sensor" / "folder_landsat8" /
                          "test_metrics.json").read_text())  # fmt: skip
    ablation_script().main([str(copy)])
    lines = [line.split(" | ") for line in (copy / "results.md").read_text().splitlines()
             if line.startswith("| ")]  # fmt: skip
    header = [c.strip("| ") for c in lines[0]]
    column = header.index("mIoU on folder_landsat8")
    assert column == header.index("mF1") + 1
    rows = {line[0].strip("| "): line for line in lines[1:]}
    assert rows["frozen precision=fp32"][column] == f"{100 * crossed['mIoU']:.2f} (1 of 2 seeds)"
    assert rows["lora precision=fp32"][column] == "-"


def test_never_started_and_incomplete_jobs_are_listed(sweep, tmp_path):
    """A copy of the sweep with one job's folder gone and another's metrics gone."""

    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    finished = sorted(p for p in copy.iterdir() if (p / "metrics.json").is_file())
    assert [p.name[4:] for p in finished] == ["tiny_vit_frozen_demo"] * 2 + [
        "tiny_vit_lora_demo"
    ] * 2
    shutil.rmtree(finished[0])  # frozen, seed 0
    (finished[2] / "metrics.json").unlink()  # lora, seed 0
    text = ablation_script().render_markdown(copy, ablation_script().collect_runs(copy),
                                         ablation_script().expected_jobs(copy))  # fmt: skip
    job0 = json.loads((sweep / finished[0].name / "job.json").read_text())["overrides"]
    assert f"- never started: {' '.join(job0)}" in text
    assert f"- incomplete (running, killed, or stopped early; resume=true continues it): " \
           f"`{finished[2].name}`" in text  # fmt: skip
    assert "| frozen precision=fp32 | 1 (1) |" in text and "| lora precision=fp32 | 1 (1) |" in text


def test_missing_or_empty_sweep_folder_is_an_error(tmp_path):
    script = ablation_script()
    assert script.main([str(tmp_path / "nowhere")]) == 1
    assert script.main([str(tmp_path)]) == 1


def test_sample_std_and_sizes():
    script = ablation_script()
    assert script.mean_std([0.40, 0.44]) == "42.00 ± 2.83"  # sample std: 0.04 / sqrt(2)
    assert script.mean_std([0.5]) == "50.00"
    assert script.human_bytes(286_720) == "280 KiB"
    assert script.human_bytes(86_400_000) == "82.4 MiB"
    assert script.varying_keys([["a=1", "b=2", "seed=0"], ["a=1", "b=3", "seed=1"]]) == [
        "b", "seed",
    ]  # fmt: skip


def test_one_sweep_across_a_segmentation_and_a_classification_dataset(demo_root, tmp_path):
    """``run.py -m dataset=demo,m_so2sat``: a table per dataset with its own task's metrics,
    and Figure 1's points: per method, each dataset's headline metric (mIoU, mF1) from its
    runs' metrics.json, averaged over the datasets."""

    from omegaconf import OmegaConf

    data = tmp_path / "data"
    shutil.copytree(demo_root, data / "demo")
    task = OmegaConf.load(REPO / "configs" / "dataset" / "m_so2sat.yaml")
    write_geobench(data / "m-so2sat", ["a", "b", "c"], {"train": 8, "valid": 3, "test": 3},
                   channels=list(task.channels), scale=1, size=16)  # fmt: skip
    run_cli(["-m", "dataset=demo,m_so2sat", "finetune=frozen,deflect", *TINY, "epochs=1",
             "max_steps_per_epoch=1",
             "img_size=16", "save_predictions=false", "num_vis=0",
             f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path,
            env={"DEFLECT_DATA_ROOT": str(data)})  # fmt: skip
    table = ablation_script()
    assert table.main([str(tmp_path / "sweep")]) == 0
    text = (tmp_path / "sweep" / "results.md").read_text()
    assert "## demo (segmentation)" in text and "## m_so2sat (classification)" in text
    seg, cls = text.split("## m_so2sat")
    assert "| mIoU | mF1 | IoU bare" in seg and "| mF1 | OA | F1 a" in cls
    runs = table.collect_runs(tmp_path / "sweep")
    groups = {d: table.build_rows(g, ["finetune"]) for d, g in table.by_dataset(runs).items()}
    points = table.figure_points(groups)
    for method in ("frozen", "deflect"):
        expected = {}
        for run in runs:
            if run.settings["finetune"] == method:
                key = "mIoU" if run.dataset == "demo" else "mF1"
                expected[run.dataset] = 100 * run.metrics["test"][key]
        got = {dataset: y for dataset, _, y in points[method]}
        assert got == pytest.approx(expected)
    assert (tmp_path / "sweep" / "results.png").stat().st_size > 10_000


def test_a_resumed_sweep_lists_its_finished_jobs_as_finished(sweep, tmp_path):
    """The sweep as ``run.py -m ... resume=true hydra.sweep.dir=<sweep>`` leaves it: Hydra's
    ``multirun.yaml`` gains ``resume=true``; the failed jobs ran again and rewrote their
    ``job.json`` with ``resume=True``; the finished ones were left untouched (without it).
    Every finished job is still a finished row, nothing is "never started", and ``resume`` is
    no common setting (the slow test below resumes a real sweep)."""
    from omegaconf import OmegaConf

    copy = tmp_path / "resumed"
    shutil.copytree(sweep, copy)
    record = OmegaConf.load(copy / "multirun.yaml")
    record.hydra.overrides.task.append("resume=true")
    OmegaConf.save(record, copy / "multirun.yaml")
    for failed in copy.glob("*/failed.txt"):
        job = json.loads((failed.parent / "job.json").read_text())
        job["overrides"].append("resume=True")
        (failed.parent / "job.json").write_text(json.dumps(job, indent=2))
    script = ablation_script()
    text = script.render_markdown(copy, script.collect_runs(copy), script.expected_jobs(copy))
    assert "never started" not in text, text
    common = next(line for line in text.splitlines() if line.startswith("Common settings:"))
    assert "resume" not in common.lower() and "`epochs=1`" in common
    assert "| frozen precision=fp32 | 2 (0, 1) |" in text
    assert "| lora precision=fp32 | 2 (0, 1) |" in text
    assert text.count("- failed: ") == 4 and "resume" not in text.split("## Jobs that")[1]


def test_diagnostics_are_only_of_finished_runs_not_in_use_and_stale_once_best_pt_changes(
    sweep, tmp_path, caplog
):
    """scripts/explain.py on copies of the sweep's runs: a run a training process holds is
    refused as eval_dir refuses it, an unfinished run unless --allow-unfinished (then said
    loudly); explain.json records the checkpoint (SHA-256, epoch). When best.pt changes (the
    run went on and a later epoch was better), the ablation table leaves the diagnostics out
    and says why; explaining the run again replaces them."""
    import hashlib
    import logging
    import os

    import torch

    from deflect.engine.workdir import RunLock

    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    explain, table = load_script("explain"), ablation_script()
    finished = sorted(p for p in copy.iterdir() if (p / "metrics.json").is_file())
    run, unfinished = finished[0], finished[3]  # frozen seed 0; lora seed 1
    log_before = (run / "train.log").read_text()

    lock = RunLock(run).acquire()  # a training run still writing the folder
    try:
        with pytest.raises(SystemExit, match=rf"in use by another run: pid {os.getpid()} on "):
            explain.main([str(run)])
    finally:
        lock.release()
    assert not (run / "diagnostics").exists() and (run / "train.log").read_text() == log_before

    (unfinished / "metrics.json").unlink()  # stopped after its first epoch, not resumed yet
    with pytest.raises(SystemExit, match=r"has not finished \(no metrics.json\): its "
                       r"checkpoints/best.pt of epoch 1 of 1 \(sha256 "):  # fmt: skip
        explain.main([str(unfinished)])
    assert not (unfinished / "diagnostics").exists()
    with caplog.at_level(logging.INFO):
        explain.main([str(unfinished), "--allow-unfinished"])
    assert "explaining an UNFINISHED run (no metrics.json)" in caplog.text
    record = json.loads((unfinished / "diagnostics" / "explain.json").read_text())["checkpoint"]
    assert record["run_finished"] is False and record["epoch"] == 1

    (report,) = explain.main([str(run)])
    best = run / "checkpoints" / "best.pt"
    record = json.loads((run / "diagnostics" / "explain.json").read_text())["checkpoint"]
    assert record["sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    assert record["epoch"] == torch.load(best, weights_only=True)["epoch"] + 1
    assert record["run_finished"] is True and record["size"] == best.stat().st_size
    log_after = (run / "train.log").read_text()
    assert log_after.startswith(log_before)  # appended at the end
    assert ("diagnostics (test): drop of mIoU when an input is replaced by its training mean "
            "(checkpoints/best.pt of epoch 1 of 1 (sha256 ") in log_after  # fmt: skip

    def top_cell():
        text = table.render_markdown(copy, table.collect_runs(copy), table.expected_jobs(copy))
        lines = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]
        header = [c.strip("| ") for c in lines[0]]
        if "top inputs (mIoU drop)" not in header:  # no run with current diagnostics
            return None, text
        rows = {line[0].strip("| "): line for line in lines[1:]}
        cell = rows["frozen precision=fp32"][header.index("top inputs (mIoU drop)")].strip("| ")
        return cell, text

    ranked = report["importance"][:3]  # one explained seed: its own three largest drops
    cell, _ = top_cell()
    assert cell == ", ".join(f"{r['input']}: {100 * r['drop']:.1f}" for r in ranked)

    state = torch.load(best, weights_only=True)  # the run went on: a better epoch's weights
    key = next(iter(state["model"]))
    state["model"][key] = state["model"][key] + 0.01
    torch.save(state, best)
    cell, text = top_cell()
    assert cell is None  # the only explained run's diagnostics are stale: no column
    assert (f"- `{run.name}`: checkpoints/best.pt changed after it was explained (the "
            "diagnostics are of checkpoints/best.pt of epoch 1 of 1 (sha256 "
            f"{record['sha256'][:12]}))") in text  # fmt: skip
    assert table.main([str(copy)]) == 0
    explain.main([str(run)])  # explained again: replaced, and current
    record = json.loads((run / "diagnostics" / "explain.json").read_text())["checkpoint"]
    assert record["sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    cell, text = top_cell()
    assert cell and cell != "-" and "Diagnostics left out" not in text


def test_figure_1_x_axis_spans_whole_decades_and_never_passes_100_percent():
    """Full fine-tuning (100 %) beside DEFLECT (0.3 %): 0.01 % to 100 %, not to 10^3 %; a
    point in the right third has its label on its left."""
    script = ablation_script()
    assert script.x_limits([0.03, 0.3, 2.1, 100.0]) == (0.01, 100.0)
    assert script.x_limits([0.1, 0.5]) == (0.01, 1.0)
    assert script.x_limits([57.0]) == (10.0, 100.0)
    assert script.label_offset(100.0, (0.01, 100.0), 0) == ((-8, 6), "right")
    assert script.label_offset(0.3, (0.01, 100.0), 1) == ((6, -14), "left")


@pytest.mark.slow
def test_a_really_resumed_sweep_keeps_its_finished_job_in_the_table(demo_root, tmp_path):
    """A sweep with one failed job (precision=fp42), resumed with resume=true: the finished
    job, left untouched, is a finished row; nothing is "never started"; resume is no common
    setting; the failed job is listed as failed."""
    args = ["-m", "finetune=frozen", "precision=fp32,fp42", *TINY, f"dataset.root={demo_root}",
            "epochs=1", "save_predictions=false", "num_vis=0",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    assert run_cli(args, tmp_path, check=False).returncode != 0
    resumed = run_cli([*args, "resume=true"], tmp_path, check=False)
    assert "has already finished (it has metrics.json): left untouched" in resumed.stdout
    job = json.loads((tmp_path / "sweep" / "001_tiny_vit_frozen_demo" / "job.json").read_text())
    assert "resume=True" in job["overrides"]  # the failed job ran again
    script = ablation_script()
    sweep = tmp_path / "sweep"
    text = script.render_markdown(sweep, script.collect_runs(sweep), script.expected_jobs(sweep))
    assert "never started" not in text and "| frozen precision=fp32 | 1 (0) |" in text
    common = next(line for line in text.splitlines() if line.startswith("Common settings:"))
    assert "resume" not in common.lower()
    assert text.count("- failed: ") == 1 and "precision='fp42'" in text


def fake_sweep(folder: Path, scores: dict[tuple[str, str], dict[int, float]],
               task: str | None = None) -> Path:  # fmt: skip
    """A sweep folder as run.py leaves it, written by hand: ``{(dataset, method): {seed:
    test mIoU}}``, one run folder per seed in a shuffled job order; with ``task`` (e.g.
    ``regression``), each run's ``config.yaml`` names that task and the score is its
    headline."""
    jobs = [(d, m, s, v) for (d, m), seeds in scores.items() for s, v in seeds.items()]
    jobs = jobs[1::2] + jobs[::2]  # the folders' order is not the seeds' order
    for i, (dataset, method, seed, value) in enumerate(jobs):
        run = folder / f"{i:03d}_tiny_vit_{method}_{dataset}"
        run.mkdir(parents=True)
        overrides = [f"dataset={dataset}", f"finetune={method}", f"seed={seed}"]
        (run / "job.json").write_text(json.dumps({"overrides": overrides}))
        params = {"encoder_trainable": 10, "encoder_trainable_percent": 1.0 + len(method)}
        test = {"mIoU": value, "mF1": value}
        if task is not None:
            (run / "config.yaml").write_text(f"task:\n  name: {task}\n")
            test = {"rmse": value, "mae": value / 2, "r2": 1 - value}
        (run / "metrics.json").write_text(json.dumps({"test": test, "params": params}))
    return folder


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """``{row label: {column: cell}}`` of the first markdown table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:]]
    return {r[0]: dict(zip(header, r)) for r in rows if len(r) == len(header)}


def test_interval_and_paired_difference_columns_by_hand(tmp_path):
    """Four seeds of frozen at 40, 41, 42, 43 % mIoU: the bootstrap interval of their mean is
    the exact resampling distribution's 2.5-97.5 % quantiles, 40.50 and 42.50 (the sum of 4
    draws from {0..3}: P(<= 1) = 5/256 < 2.5 % < P(<= 2) = 15/256; tests/test_compare.py).
    lora = frozen + 1, 2, 3, 4 points on seeds 0-3: paired +2.50 [+1.50, +3.50]; paired on the
    seed, not the folder order. With lower-is-better the improvement changes sign."""
    frozen = {0: 0.42, 1: 0.40, 2: 0.43, 3: 0.41}
    lora = {s: v + 0.01 * (s + 1) for s, v in frozen.items()}
    sweep = fake_sweep(tmp_path / "sweep", {("demo", "frozen"): frozen, ("demo", "lora"): lora})
    script = ablation_script()
    runs = script.collect_runs(sweep)
    rows = table_rows(script.render_markdown(sweep, runs, [], reference="frozen"))
    assert rows["frozen"]["mIoU"] == f"41.50 ± {100 * statistics.stdev(frozen.values()):.2f} " \
                                     "[40.50, 42.50]"  # fmt: skip
    column = "Δ mIoU vs frozen [95 % CI]"
    assert rows["frozen"][column] == "reference"
    assert rows["lora"][column] == "+2.50 [+1.50, +3.50] (seeds 0, 1, 2, 3)"
    lower = table_rows(script.render_markdown(sweep, runs, [], "frozen", higher_is_better=False))
    assert lower["lora"][column] == "-2.50 [-3.50, -1.50] (seeds 0, 1, 2, 3)"
    assert script.main([str(sweep), "--reference", "nothing"]) == 1  # names no row
    assert script.main([str(sweep), "--reference", "lora"]) == 0
    assert "| +0.00" not in (sweep / "results.md").read_text()
    assert "-2.50 [-3.50, -1.50]" in (sweep / "results.md").read_text()


def test_across_datasets_table_is_the_iqm_of_normalised_scores(tmp_path):
    """Two datasets; on each, lora beats frozen on every seed. Dataset a: frozen 0.2, 0.3,
    lora 0.6, 0.7 -> normalised frozen 0, 0.2, lora 0.8, 1. Dataset b: frozen 0.5, 0.5, lora
    0.9, 0.9 -> frozen 0, 0, lora 1, 1. lora's pooled runs 0.8, 1, 1, 1: IQM (drop one at each
    end) = 1.0; frozen's 0, 0, 0, 0.2: IQM 0.0."""
    scores = {("a", "frozen"): {0: 0.2, 1: 0.3}, ("a", "lora"): {0: 0.6, 1: 0.7},
              ("b", "frozen"): {0: 0.5, 1: 0.5}, ("b", "lora"): {0: 0.9, 1: 0.9}}  # fmt: skip
    sweep = fake_sweep(tmp_path / "sweep", scores)
    script = ablation_script()
    text = script.render_markdown(sweep, script.collect_runs(sweep), [])
    across = text.split("## Across datasets")[1]
    rows = table_rows(across)
    assert rows["lora"]["datasets"] == "2 of 2"
    assert rows["lora"]["IQM of normalised score [95 % CI]"].startswith("1.000 [")
    assert rows["frozen"]["IQM of normalised score [95 % CI]"].startswith("0.000 [0.000, ")
    assert across.index("| lora") < across.index("| frozen")  # best first
    assert script.main([str(sweep)]) == 0 and (sweep / "results.png").stat().st_size > 10_000


def test_figure_1_puts_a_lower_is_better_headline_on_the_same_scale_as_the_others(tmp_path):
    """A dataset whose headline is an error (lower is better) beside one scored by IoU: each
    becomes relative, 100 for the dataset's best method and 0 for its worst, so the method with
    the lowest error scores 100 there (worked by hand below)."""
    table = ablation_script()
    iou = table.TaskView("a", {"mIoU": True}, "mIoU", ("mIoU",), None)
    error = table.TaskView("b", {"rmse": False}, "rmse", ("rmse",), None)

    def row(label: str, task, values: list[float]):
        runs = [table.Run(folder=tmp_path, overrides=[], status="finished", task=task,
                          params={"encoder_trainable_percent": 1.0},
                          metrics={"test": {task.headline: v}}) for v in values]  # fmt: skip
        return table.Row(label, runs)

    groups = {
        "seg": [row("frozen", iou, [0.40, 0.50]), row("lora", iou, [0.60, 0.70])],
        "reg": [row("frozen", error, [2.0, 2.0]), row("lora", error, [3.0, 5.0])],
    }
    points = table.figure_points(groups)
    # seg: means 0.45 and 0.65 -> frozen worst (0), lora best (100); reg: means 2 and 4 -> the
    # lower error (frozen) is best (100), lora worst (0).
    assert points["frozen"] == [("seg", 1.0, pytest.approx(0.0)), ("reg", 1.0, 100.0)]
    assert points["lora"] == [("seg", 1.0, pytest.approx(100.0)), ("reg", 1.0, 0.0)]
    # Only higher-is-better headlines: the percentages themselves, as before.
    assert table.figure_points({"seg": groups["seg"]})["lora"] == [
        ("seg", 1.0, pytest.approx(65.0))
    ]
    assert table.relative_scores([1.0, 1.0], False) == [100.0, 100.0]


def test_a_lower_is_better_headline_is_shown_in_its_units_and_paired_the_right_way(tmp_path):
    """A regression sweep: rmse in the target's units (not x100), and the method with the LOWER
    error is the better one in the paired column: lora's rmse is 0.10 below frozen's on every
    seed -> +0.1000 [+0.1000, +0.1000]; R² (1 - rmse here) is shown as a number too."""
    frozen = {0: 0.50, 1: 0.60}
    lora = {s: v - 0.10 for s, v in frozen.items()}
    scores = {("reg", "frozen"): frozen, ("reg", "lora"): lora}
    sweep = fake_sweep(tmp_path / "sweep", scores, task="regression")
    script = ablation_script()
    text = script.render_markdown(sweep, script.collect_runs(sweep), [], reference="frozen")
    rows = table_rows(text)
    assert rows["frozen"]["rmse"].startswith("0.5500 ± 0.0707 [0.5000, 0.6000]")
    assert rows["lora"]["r2"] == "0.5500 ± 0.0707"
    assert rows["lora"]["Δ rmse vs frozen [95 % CI]"] == "+0.1000 [+0.1000, +0.1000] (seeds 0, 1)"
    assert "in their units" in text
