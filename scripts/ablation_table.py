"""Summarise an ablation sweep: a markdown table and the paper's Figure-1 plot.

    python run.py -m finetune=frozen,bitfit,norm_tuning,lora,scaled_lora,deflect,full seed=0,1,2
    python scripts/ablation_table.py work_dirs/multirun/<time>

Reads every run folder of the sweep (``<NNN>_<encoder>_<finetune>_<dataset>/``: ``job.json``,
``params.json``, ``metrics.json``, ``adapter/``, ``failed.txt``), pools the seeds of each
configuration into one row, prints the table and writes it to ``<sweep>/results.md``, and draws
``<sweep>/results.png``: mIoU against the % of GFM parameters tuned (log x), one point per row
with its 95 % bootstrap interval over seeds as an error bar. Failed, unfinished and never-started
jobs (those ``multirun.yaml`` expects but that have no folder) are listed under the table.

The statistics (:mod:`deflect.compare`): the headline metric as ``mean ± std [lo, hi]`` (sample
std, percentile-bootstrap 95 % interval of the mean over seeds); with ``--reference METHOD``, each
row's paired difference against that method on the seeds both ran; over several datasets, the
interquartile mean of min-max normalised scores with a stratified bootstrap interval
(GEO-Bench-2's aggregate).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deflect.compare import across_datasets, paired_difference, summarise  # noqa: E402

SEED = "seed"
SELECTED = "+selected"  # stage 2 of the protocol (scripts/select_hparams.py): the method's option


@dataclass(frozen=True)
class TaskView:
    """What the table needs of a run's task, asked of the task registry
    (:mod:`deflect.tasks`): its name, monitors with their direction, headline, table means and
    per-class metric."""

    name: str
    monitors: dict[str, bool]
    headline: str
    table_metrics: tuple[str, ...]
    per_class_metric: str | None
    percent: bool = True  # its metrics are fractions shown in % (an error is in its own units)

    @property
    def scale(self) -> float:
        """The factor from a stored metric to the table's number."""
        return 100.0 if self.percent else 1.0


def task_view(node: dict | None) -> TaskView:
    """The :class:`TaskView` of a saved config's ``task`` node (``None``: a run saved before
    tasks existed)."""
    from deflect.tasks import build_task

    task = build_task(node)
    return TaskView(task.name, dict(task.monitors), task.headline, tuple(task.table_metrics),
                    task.per_class_metric, task.metrics_in_percent)  # fmt: skip


@dataclass
class Run:
    """One job of the sweep, as its folder tells it."""

    folder: Path
    overrides: list[str]
    status: str  # finished | failed | incomplete
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    error: str = ""
    adapter_bytes: int = 0
    dataset: str = ""
    task: TaskView = field(default_factory=lambda: task_view(None))
    stale_diagnostics: str | None = None  # why diagnostics/explain.json is not about best.pt

    @property
    def headline(self) -> str:
        """The task's main metric (its first monitor)."""
        return self.task.headline

    @property
    def higher_is_better(self) -> bool:
        """Whether a higher headline is better (an error metric's lower one is)."""
        return self.task.monitors[self.task.headline]

    @property
    def settings(self) -> dict[str, str]:
        """The job's overrides as ``{key: value}``."""
        return dict(item.split("=", 1) for item in self.overrides if "=" in item)


@dataclass
class Row:
    """The finished runs of one configuration (seeds pooled)."""

    label: str
    runs: list[Run]

    def values(self, key: str) -> list[float]:
        """``metrics.json``'s test ``key`` of every seed (fractions)."""
        return [float(r.metrics["test"][key]) for r in self.runs]

    def by_seed(self, key: str) -> dict[int, float]:
        """``{seed: test key}`` (what :func:`~deflect.compare.paired_difference` pairs on)."""
        return {seed_of(r): float(r.metrics["test"][key]) for r in self.runs}

    @property
    def percent(self) -> float:
        """% of the GFM's parameters tuned (decoder excluded)."""
        return float(self.runs[0].params["encoder_trainable_percent"])


# ---- reading -------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    """A JSON file, or ``{}`` when it is missing or unreadable (an unfinished write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def adapter_bytes(folder: Path) -> int:
    """Size of the exported adapter's weights (all adapters of the run)."""
    files = list(folder.glob("adapter/*/deflect_model.safetensors"))
    files += list(folder.glob("adapter/*/deflect_model.bin"))
    return sum(f.stat().st_size for f in files)


def comparison_overrides(overrides: list[str]) -> list[str]:
    """A job's overrides without the bookkeeping ones (``resume=true``, ...: how the job was
    run, not what it trained; :data:`~deflect.engine.workdir.BOOKKEEPING_KEYS`)."""
    from deflect.engine.workdir import BOOKKEEPING_KEYS

    return [item for item in overrides
            if item.split("=", 1)[0].lstrip("+~") not in BOOKKEEPING_KEYS]  # fmt: skip


def collect_runs(sweep: Path) -> list[Run]:
    """Every run folder of ``sweep`` (folders holding ``job.json`` or ``config.yaml``), by job
    number; their overrides without the bookkeeping ones (a resumed job's ``resume=true``)."""
    from deflect.engine.diagnostics import staleness

    runs = []
    for folder in sorted(p for p in sweep.iterdir() if p.is_dir()):
        if not ((folder / "job.json").is_file() or (folder / "config.yaml").is_file()):
            continue
        job = read_json(folder / "job.json")
        metrics = read_json(folder / "metrics.json")
        failed = folder / "failed.txt"
        if metrics.get("test"):
            status = "finished"
        elif failed.is_file():
            status = "failed"
        else:
            status = "incomplete"
        error = failed.read_text().strip().splitlines()[0] if status == "failed" else ""
        overrides = comparison_overrides(list(job.get("overrides", [])))
        dataset, task = dataset_and_task(folder, overrides)
        runs.append(
            Run(
                folder=folder,
                overrides=overrides,
                status=status,
                params=metrics.get("params") or read_json(folder / "params.json"),
                metrics=metrics,
                error=error,
                adapter_bytes=adapter_bytes(folder),
                dataset=dataset,
                task=task,
                stale_diagnostics=staleness(folder) if status == "finished" else None,
            )
        )
    return runs


def dataset_and_task(folder: Path, overrides: list[str]) -> tuple[str, TaskView]:
    """The run's dataset (its ``dataset=`` override, else its dataset class) and task."""
    settings = dict(item.split("=", 1) for item in overrides if "=" in item)
    dataset, task = settings.get("dataset", ""), task_view(None)
    path = folder / "config.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(path)
        node = cfg.get("task")
        task = task_view(None if node is None else OmegaConf.to_container(node, resolve=True))
        if not dataset:
            dataset = str(cfg.dataset.get("_target_", "dataset")).rsplit(".", 1)[-1]
    return dataset or "dataset", task


def expected_jobs(sweep: Path) -> list[list[str]]:
    """The jobs ``multirun.yaml`` asks for, expanded as Hydra's basic sweeper does, without the
    bookkeeping overrides ([] when there is no ``multirun.yaml``)."""
    path = sweep / "multirun.yaml"
    if not path.is_file():
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    task = list(OmegaConf.load(path).hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(task)
    return [comparison_overrides(job)
            for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]  # fmt: skip


# ---- rows ----------------------------------------------------------------------------------------
def varying_keys(jobs: list[list[str]]) -> list[str]:
    """Override keys that tell ``jobs`` apart: those with more than one value, or missing from
    some jobs; in command-line order."""
    settings = [dict(item.split("=", 1) for item in job if "=" in item) for job in jobs]
    keys = list(dict.fromkeys(k for s in settings for k in s))
    return [k for k in keys if len({s.get(k) for s in settings}) > 1]


def method_of(run: Run) -> str:
    """The fine-tuning method: the ``finetune`` override (or the protocol's ``+selected``
    option, a method at its chosen hyperparameters), else the saved adapter's method."""
    for key in ("finetune", SELECTED):
        if key in run.settings:
            return run.settings[key]
    for path in run.folder.glob("adapter/*/deflect_config.json"):
        method = read_json(path).get("method")
        if method:
            return str(method)
    return run.folder.name


def row_label(run: Run, keys: list[str]) -> str:
    """The method and the other overrides that tell rows apart (seed excluded)."""
    extra = [f"{k}={run.settings[k]}" for k in keys if k not in ("finetune", SEED, SELECTED)
             and k in run.settings]  # fmt: skip
    return " ".join([method_of(run), *extra])


def build_rows(runs: list[Run], keys: list[str]) -> list[Row]:
    """Finished runs grouped by label, sorted by % of the GFM tuned (then label)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.status == "finished":
            groups.setdefault(row_label(run, keys), []).append(run)
    rows = [Row(label, sorted(group, key=seed_of)) for label, group in groups.items()]
    return sorted(rows, key=lambda r: (r.percent, r.label))


def seed_of(run: Run) -> int:
    """The run's seed (its override, else 0, the config default)."""
    try:
        return int(run.settings.get(SEED, 0))
    except ValueError:
        return 0


# ---- formatting ----------------------------------------------------------------------------------
def mean_std(values: list[float], scale: float = 100.0) -> str:
    """``mean ± std`` times ``scale`` (100: in percent; sample standard deviation); the mean
    alone for one seed."""
    mean = scale * statistics.mean(values)
    digits = 2 if scale == 100 else 4
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def mean_std_interval(values: list[float], scale: float = 100.0) -> str:
    """``mean ± std [lo, hi]`` times ``scale``: :func:`mean_std` and the 95 %
    percentile-bootstrap interval of the mean over the seeds (:func:`deflect.compare.summarise`,
    seed 0)."""
    if len(values) < 2:
        return mean_std(values, scale)
    s = summarise(values)
    digits = 2 if scale == 100 else 4
    return f"{mean_std(values, scale)} [{scale * s.lo:.{digits}f}, {scale * s.hi:.{digits}f}]"


def direction(higher_is_better: bool | Mapping[str, bool] | None, dataset: str) -> bool:
    """The metric's direction on ``dataset`` (one for all, or ``{dataset: direction}``; None or
    a dataset not in it: higher is better)."""
    if higher_is_better is None:
        return True
    if isinstance(higher_is_better, Mapping):
        return bool(higher_is_better.get(dataset, True))
    return bool(higher_is_better)


def reference_row(rows: list[Row], reference: str) -> Row | None:
    """The row ``--reference`` names: its exact label, else the one row of that method."""
    exact = [r for r in rows if r.label == reference]
    if exact:
        return exact[0]
    of_method = [r for r in rows if method_of(r.runs[0]) == reference]
    if len(of_method) > 1:
        raise ValueError(
            f"--reference {reference!r} matches rows {[r.label for r in of_method]}; pass one "
            "row's full label"
        )
    return of_method[0] if of_method else None


def check_reference(runs: list[Run], expected: list[list[str]], reference: str | None) -> None:
    """Raise ValueError when ``--reference`` names no row of any dataset (listing the rows)."""
    if not reference:
        return
    keys = [k for k in sweep_rows(runs, expected)[1] if k != "dataset"]
    rows = [row for group in by_dataset(runs).values() for row in build_rows(group, keys)]
    if not any(reference_row([row], reference) for row in rows):
        labels = sorted({row.label for row in rows})
        raise ValueError(f"--reference {reference!r} is no row of the table; rows: {labels}")


def paired_cell(row: Row, ref: Row | None, key: str, higher_is_better: bool) -> str:
    """``+d [lo, hi] (seeds ...)`` in points: the row's paired improvement over the reference
    row (> 0: better, whatever the metric's direction), ``reference`` on that row itself."""
    if ref is None:
        return "-"
    if row is ref:
        return "reference"
    mine, theirs = row.by_seed(key), ref.by_seed(key)
    shared = sorted(set(mine) & set(theirs))
    if not shared:
        return "no shared seed"
    d = paired_difference({s: mine[s] for s in shared}, {s: theirs[s] for s in shared},
                          higher_is_better)  # fmt: skip
    seeds = ", ".join(str(s) for s in d.seeds)
    k, digits = row.runs[0].task.scale, 2 if row.runs[0].task.percent else 4
    return (f"{k * d.mean:+.{digits}f} [{k * d.lo:+.{digits}f}, {k * d.hi:+.{digits}f}] "
            f"(seeds {seeds})")  # fmt: skip


def across_table(groups: dict[str, list[Row]],
                 higher_is_better: bool | Mapping[str, bool] | None = None) -> list[str]:  # fmt: skip
    """Markdown lines: per method (row label), the IQM of its normalised headline scores over
    the datasets with its stratified bootstrap interval (:func:`deflect.compare.across_datasets`),
    best first."""
    if higher_is_better is None:
        higher_is_better = {d: rows[0].runs[0].higher_is_better for d, rows in groups.items()}
    table = {d: {row.label: row.values(row.runs[0].headline) for row in rows}
             for d, rows in groups.items()}  # fmt: skip
    stats = across_datasets(table, {d: direction(higher_is_better, d) for d in groups})
    lines = ["## Across datasets", "",
             "| method | datasets | IQM of normalised score [95 % CI] |", "|---|---|---|"]  # fmt: skip
    for label in sorted(stats, key=lambda k: -stats[k].mean):
        s = stats[label]
        lines.append(
            f"| {label} | {s.n} of {len(groups)} | {s.mean:.3f} [{s.lo:.3f}, {s.hi:.3f}] |"
        )
    lines += ["", "Each dataset's runs (every method, every seed) are min-max normalised to [0, 1] "
              "(1: the dataset's best run, lower-is-better metrics flipped); the interquartile "
              "mean (floor(n/4) dropped at each end, as rliable's IQM) pools a method's runs over "
              "the datasets it ran on; the interval resamples seeds within each dataset "
              "(stratified bootstrap, 10,000 resamples, seed 0).", ""]  # fmt: skip
    return lines


def human_bytes(size: int) -> str:
    """``279 KiB``, ``82.1 MiB``; ``-`` for no file."""
    if size <= 0:
        return "-"
    units = ["B", "KiB", "MiB", "GiB"]
    power = min(int(math.log(size, 1024)), len(units) - 1)
    value = size / 1024**power
    digits = 0 if value >= 100 or power == 0 else 1
    return f"{value:.{digits}f} {units[power]}"


def class_names(rows: list[Row]) -> list[str]:
    """Class names in the order of the first finished run's per-class metrics."""
    names: list[str] = []
    for row in rows:
        for run in row.runs:
            for name in run.metrics["test"].get("per_class", {}):
                if name not in names:
                    names.append(name)
    return names


def class_iou(row: Row, name: str, key: str = "IoU") -> str:
    """Mean ``key`` (IoU, or F1 for classification; %) of class ``name`` over the seeds where
    it is defined, else ``n/a``."""
    values = [r.metrics["test"]["per_class"].get(name, {}).get(key) for r in row.runs]
    values = [v for v in values if v is not None]
    return mean_std(values, row.runs[0].task.scale).split(" ±")[0] if values else "n/a"


def top_inputs(row: Row, count: int = 3) -> str:
    """The inputs whose occlusion cost the most test mIoU, averaged over the seeds that ran
    ``scripts/explain.py`` (``diagnostics/explain.json``) on their current ``best.pt`` (stale
    diagnostics are left out); ``-`` when none did."""
    drops: dict[str, list[float]] = {}
    for run in row.runs:
        if run.stale_diagnostics:
            continue
        report = read_json(run.folder / "diagnostics" / "explain.json")
        for item in report.get("importance", []):  # band B8A and UPE feature B8A apart
            label = item["input"] + ("" if item["kind"] == "band" else f" ({item['kind']})")
            drops.setdefault(label, []).append(float(item["drop"]))
    if not drops:
        return "-"
    ranked = sorted(drops, key=lambda k: -statistics.mean(drops[k]))[:count]
    return ", ".join(f"{k}: {100 * statistics.mean(drops[k]):.1f}" for k in ranked)


def cross_sensor_names(rows: list[Row]) -> list[str]:
    """The other sensors' evaluations of these runs (``eval_dir=<run> dataset=<other sensor>``
    writes ``cross_sensor/<dataset>_<sensor>/test_metrics.json``)."""
    return sorted({p.parent.name for row in rows for r in row.runs
                   for p in r.folder.glob("cross_sensor/*/test_metrics.json")})  # fmt: skip


def cross_sensor_metric(row: Row, name: str, key: str) -> str:
    """Mean ± std of ``key`` on the other sensor's data over the seeds evaluated there, with
    how many of the row's seeds that is when not all; ``-`` when none."""
    values = [read_json(r.folder / "cross_sensor" / name / "test_metrics.json").get(key)
              for r in row.runs]  # fmt: skip
    known = [float(v) for v in values if v is not None]
    if not known:
        return "-"
    part = "" if len(known) == len(values) else f" ({len(known)} of {len(values)} seeds)"
    return mean_std(known, row.runs[0].task.scale) + part


def optional_mean(values: list[float | None], digits: int) -> str:
    """Mean of the known values, or ``-``."""
    known = [v for v in values if v is not None]
    return f"{statistics.mean(known):,.{digits}f}" if known else "-"


def sweep_rows(runs: list[Run], expected: list[list[str]]) -> tuple[list[list[str]], list[str],
                                                                   list[Row]]:  # fmt: skip
    """The jobs (expected, else those that started), the keys telling them apart, the rows."""
    jobs = expected or [r.overrides for r in runs]
    keys = varying_keys(jobs)
    return jobs, keys, build_rows(runs, keys)


def by_dataset(runs: list[Run]) -> dict[str, list[Run]]:
    """The runs of each dataset, in the order the datasets first appear."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.dataset, []).append(run)
    return groups


def task_columns(runs: list[Run]) -> tuple[tuple[str, ...], str | None]:
    """The mean metrics of a dataset's table and its per-class metric, as its task says."""
    finished = [r for r in runs if r.status == "finished"]
    task = (finished or runs)[0].task if runs else task_view(None)
    return task.table_metrics, task.per_class_metric


def render_markdown(sweep: Path, runs: list[Run], expected: list[list[str]],
                    reference: str | None = None,
                    higher_is_better: bool | Mapping[str, bool] | None = None) -> str:  # fmt: skip
    """The whole ``results.md``: common settings, a table per dataset (with its task's
    metrics; with ``reference``, each row's paired difference against that method), the
    across-datasets IQM when there are several datasets, and every job that did not finish.

    ``higher_is_better``: the headline metric's direction (one, or ``{dataset: direction}``);
    ``None``: each dataset's, as its runs' task declares it (rmse: lower is better)."""
    if higher_is_better is None:
        higher_is_better = {d: g[0].higher_is_better for d, g in by_dataset(runs).items() if g}
    jobs, keys, _ = sweep_rows(runs, expected)
    keys = [k for k in keys if k != "dataset"]  # a table per dataset
    common = sorted({item for job in jobs for item in job
                     if item.partition("=")[0] not in keys and
                     item.partition("=")[0] != "dataset"})  # fmt: skip
    lines = [f"# Ablation: {sweep}", ""]
    if common:
        lines += ["Common settings: " + " ".join(f"`{c}`" for c in common), ""]
    groups = by_dataset(runs)
    kinds = set()
    any_crossed = False
    for dataset, group in groups.items():
        rows = build_rows(group, keys)
        means, per_class = task_columns(group)
        classes = class_names(rows) if per_class else []
        if len(groups) > 1:
            lines += [f"## {dataset} ({group[0].task.name})", ""]
        explained = any((r.folder / "diagnostics" / "explain.json").is_file()
                        and not r.stale_diagnostics for row in rows for r in row.runs)  # fmt: skip
        crossed = cross_sensor_names(rows)
        any_crossed = any_crossed or bool(crossed)
        ref = reference_row(rows, reference) if reference else None
        paired = [f"Δ {means[0]} vs {ref.label} [95 % CI]"] if ref else []
        header = ["method", "seeds", "trainable", "% of GFM tuned", "decoder trainable",
                  "adapter file", *means, *paired,
                  *(f"{means[0]} on {name}" for name in crossed),
                  *(f"{per_class} {c}" for c in classes), "images/s",
                  "peak memory (MiB)",
                  *([f"top inputs ({means[0]} drop)"] if explained else [])]  # fmt: skip
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            first = row.runs[0]
            seeds = ", ".join(str(seed_of(r)) for r in row.runs)
            kinds.update(r.metrics.get("peak_memory_kind") for r in row.runs)
            cells = [
                row.label,
                f"{len(row.runs)} ({seeds})",
                f"{int(first.params['encoder_trainable']):,}",
                f"{row.percent:.4f} %",
                f"{int(first.params.get('decoder_trainable', 0)):,}",
                human_bytes(first.adapter_bytes),
                mean_std_interval(row.values(means[0]), first.task.scale),
                *(mean_std(row.values(m), first.task.scale) for m in means[1:]),
                *(
                    [paired_cell(row, ref, means[0], direction(higher_is_better, dataset))]
                    if ref
                    else []
                ),  # fmt: skip
                *(cross_sensor_metric(row, name, means[0]) for name in crossed),
                *(class_iou(row, c, per_class) for c in classes),
                optional_mean([r.metrics.get("train_images_per_s") for r in row.runs], 1),
                optional_mean([r.metrics.get("peak_memory_mb") for r in row.runs], 0),
                *([top_inputs(row)] if explained else []),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if len(groups) > 1:
        tables = {d: build_rows(g, keys) for d, g in groups.items()}
        lines += across_table({d: r for d, r in tables.items() if r}, higher_is_better)
    lines = lines[:-1]
    kinds.discard(None)
    lines += [
        "",
        (
            "Metrics in %"
            if all(g[0].task.percent for g in groups.values() if g)
            else "Metrics in % (a task whose metrics are no fractions, e.g. errors: in their units)"
        )
        + ", on the test split, of each run's best validation checkpoint; mean ± "
        "sample standard deviation over the seeds, then (headline metric) the 95 % "
        "percentile-bootstrap interval of the mean [lo, hi] (10,000 resamples, seed 0). "
        "% of GFM tuned excludes the decoder.",
    ]
    if reference:
        lines.append(f"Δ vs the reference: the row's paired improvement over `{reference}` "
                     "(points; > 0 is better) on the seeds both ran, mean and bootstrap "
                     "interval of the per-seed differences.")  # fmt: skip
    if any_crossed:
        lines.append("`<metric> on <dataset>_<sensor>`: the same checkpoint evaluated on another "
                     "sensor's data through the band mapping (`eval_dir=<run> dataset=<other>`), "
                     "beside the same-sensor test metric.")  # fmt: skip
    if kinds:
        lines.append(f"Peak memory: {', '.join(sorted(kinds))} (cuda_max_allocated: the CUDA "
                     "allocator's peak; host_rss: the largest resident set sampled during "
                     "training).")  # fmt: skip
    stale = [r for r in runs if r.stale_diagnostics]
    if stale:
        lines += ["", "Diagnostics left out of the table (stale: re-run `scripts/explain.py` on "
                  "the run to replace them):"]  # fmt: skip
        lines += [f"- `{r.folder.name}`: {r.stale_diagnostics}" for r in stale]
    lines += ["", "## Jobs that did not finish", ""]
    problems = []
    for run in runs:
        if run.status == "failed":
            problems.append(f"- failed: `{run.folder.name}` ({' '.join(run.overrides)}): "
                            f"{run.error[:200]}")  # fmt: skip
        elif run.status == "incomplete":
            problems.append(f"- incomplete (running, killed, or stopped early; resume=true "
                            f"continues it): `{run.folder.name}` ({' '.join(run.overrides)})")  # fmt: skip
    started = [sorted(r.overrides) for r in runs]
    for job in expected:
        if sorted(job) not in started:
            problems.append(f"- never started: {' '.join(job)}")
    total = len(expected) or len(runs)
    lines += problems or [f"All {total} jobs finished."]
    return "\n".join(lines) + "\n"


# ---- the plot ------------------------------------------------------------------------------------
def relative_figure(groups: dict[str, list[Row]]) -> bool:
    """Whether Figure 1 shows relative scores (:func:`relative_scores`): when a dataset's
    headline is lower-is-better (an error, in its target's units), it cannot be averaged with
    the others' percentages."""
    return any(not rows[0].runs[0].higher_is_better for rows in groups.values() if rows)


def relative_scores(values: list[float], higher_is_better: bool) -> list[float]:
    """Each value placed between the worst (0) and the best (100) of ``values``, in the metric's
    direction; all 100 when they are equal."""
    low, high = min(values), max(values)
    if high == low:
        return [100.0] * len(values)
    return [100 * ((v - low) if higher_is_better else (high - v)) / (high - low) for v in values]


def figure_points(groups: dict[str, list[Row]]) -> dict[str, list[tuple[str, float, float]]]:
    """Per method (row label): ``(dataset, % of GFM tuned, y)`` of each dataset, from the
    dataset's headline metric (its task's first monitor), mean over seeds: in % when every
    headline is higher-is-better (mIoU, mF1), else each dataset's relative score
    (:func:`relative_scores`: 100 for its best method, 0 for its worst)."""
    relative = relative_figure(groups)
    points: dict[str, list[tuple[str, float, float]]] = {}
    for dataset, rows in groups.items():
        means = [statistics.mean(row.values(row.runs[0].headline)) for row in rows]
        higher = rows[0].runs[0].higher_is_better if rows else True
        ys = relative_scores(means, higher) if relative else [100 * m for m in means]
        for row, y in zip(rows, ys):
            points.setdefault(row.label, []).append((dataset, row.percent, y))
    return points


def error_bar(row: Row) -> tuple[float, float, float]:
    """``(mean, below, above)`` of the row's headline metric (in % for fractions, an error in
    its own units): the error bar from the mean down and up to its 95 %
    bootstrap interval over seeds (0, 0 for one seed)."""
    scale = row.runs[0].task.scale
    s = summarise([scale * v for v in row.values(row.runs[0].headline)])
    return s.mean, s.mean - s.lo, s.hi - s.mean


def x_limits(xs: list[float]) -> tuple[float, float]:
    """Log-axis limits for percentages ``xs`` (all > 0): whole decades around them, never past
    100 % (no method tunes more than all of the GFM)."""
    lo = 10 ** math.floor(math.log10(min(xs) / 2))
    hi = min(100.0, 10 ** math.ceil(math.log10(max(xs) * 2)))
    return lo, max(hi, max(xs))


def label_offset(x: float, limits: tuple[float, float], row: int) -> tuple[tuple[int, int], str]:
    """Where a point's label goes (offset in points, alignment): to its right, or to its left
    in the right third of the axis, where the text would run past the plot; neighbours' labels
    alternately above and below."""
    lo, hi = (math.log10(v) for v in limits)
    dy = 6 if row % 2 == 0 else -14
    if math.log10(x) > lo + 0.7 * (hi - lo):
        return (-8, dy), "right"
    return (6, dy), "left"


def draw_across(groups: dict[str, list[Row]], path: Path, title: str) -> None:
    """The paper's Figure 1 over several datasets: per method, the mean over datasets of each
    dataset's headline metric (IoU for segmentation, F1 for classification) against the % of
    GFM parameters tuned (log x); each dataset's own point drawn small beside it, with its 95 %
    bootstrap interval over seeds as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = figure_points(groups)
    bars = {(d, row.label): error_bar(row) for d, rows in groups.items() for row in rows}
    markers = dict(zip(groups, "osD^vP"))
    positive = [x for pts in points.values() for _, x, _ in pts if x > 0]
    zero_at = (min(positive) / 4) if positive else 1e-3
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=130)
    limits = x_limits([zero_at, *positive])
    for i, (label, pts) in enumerate(points.items()):
        colour = f"C{i % 10}"
        xs = [x if x > 0 else zero_at for _, x, _ in pts]
        for (dataset, _, y), x in zip(pts, xs):
            _, below, above = bars[(dataset, label)]
            ax.errorbar(x, y, yerr=[[below], [above]], fmt=markers[dataset], color=colour,
                        markersize=5, alpha=0.6, capsize=3, clip_on=False)  # fmt: skip
        x, y = statistics.mean(xs), statistics.mean(y for _, _, y in pts)
        star = label.startswith("deflect")
        ax.plot(x, y, "*" if star else "o", color=colour, markersize=13 if star else 9,
                clip_on=False)  # fmt: skip
        offset, align = label_offset(x, limits, i)
        ax.annotate(f"{label.replace('finetune.', '')}  ({len(pts)} datasets)", (x, y),
                    textcoords="offset points", xytext=offset, ha=align, fontsize=8)  # fmt: skip
    for dataset, marker in markers.items():
        first = groups[dataset][0].runs[0]
        lower = "" if first.higher_is_better else ", lower is better"
        ax.plot([], [], marker, color="grey", label=f"{dataset} ({first.headline}{lower})")
    ax.plot([], [], "o", color="black", markersize=9, label="mean over datasets")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("% of GFM parameters tuned (log scale; decoder excluded)")
    if relative_figure(groups):
        ax.set_ylabel("test headline metric relative to each dataset's methods (best 100, "
                      "worst 0), mean over datasets")  # fmt: skip
    else:
        ax.set_ylabel("test IoU (segmentation) / F1 (classification), mean over datasets (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlim(*limits)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def draw_plot(rows: list[Row], path: Path, title: str) -> None:
    """The headline metric (mIoU, or mF1 for classification) against % of GFM parameters tuned
    (log x), error bars = the 95 % bootstrap interval of the mean over seeds (Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positive = [r.percent for r in rows if r.percent > 0]
    zero_at = (min(positive) / 4) if positive else 1e-3
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=130)
    xs = [r.percent if r.percent > 0 else zero_at for r in rows]
    limits = x_limits(xs) if xs else (1e-3, 100.0)
    for i, row in enumerate(rows):
        x = row.percent if row.percent > 0 else zero_at
        y, below, above = error_bar(row)
        marker = "*" if row.label.startswith("deflect") else "o"
        ax.errorbar(x, y, yerr=[[below], [above]], fmt=marker, markersize=11 if marker == "*" else 7,
                    capsize=4, clip_on=False)  # fmt: skip
        short = row.label.replace("finetune.", "")  # the method's options, by their own names
        label = short + (" (0 %)" if row.percent <= 0 else "") + f"  n={len(row.runs)}"
        offset, align = label_offset(x, limits, i)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=offset, ha=align,
                    fontsize=8)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("% of GFM parameters tuned (log scale; decoder excluded)")
    unit = " (%)" if not rows or rows[0].runs[0].task.percent else ""
    ax.set_ylabel(f"test {rows[0].runs[0].headline}{unit}" if rows else "test metric (%)")
    if rows and not rows[0].runs[0].higher_is_better:  # up is better on every figure
        ax.set_ylabel(f"test {rows[0].runs[0].headline} (lower is better; axis inverted)")
        ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlim(*limits)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# ---- writing -------------------------------------------------------------------------------------
def write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, then renamed over ``path``
    (``deflect.io.atomic_path``: the usual permissions, never a truncated file)."""
    from deflect.io import atomic_path

    with atomic_path(path) as tmp:
        write(str(tmp))


def plot_title(runs: list[Run]) -> str:
    """``<encoder> on <dataset>`` from a finished run's config, flagged when it ran on random
    weights (no ``encoder.checkpoint``)."""
    from omegaconf import OmegaConf

    for run in runs:
        path = run.folder / "config.yaml"
        if run.status == "finished" and path.is_file():
            cfg = OmegaConf.load(path)
            dataset = str(cfg.dataset.get("_target_", "dataset")).rsplit(".", 1)[-1]
            title = f"{cfg.encoder.get('name', 'encoder')} on {dataset}"
            if not cfg.encoder.get("checkpoint"):
                title += " (RANDOM encoder weights: no checkpoint)"
            return title
    return "ablation"


def main(argv: list[str] | None = None) -> int:
    """Print the table, write ``results.md`` and ``results.png``; 0 when a run finished.

    ``higher_is_better`` is given to :func:`render_markdown` (default: the headline metric is
    better higher, as mIoU and mF1 are).

    Several sweep folders (e.g. one per arm of a study, each a ``run.py -m`` over seeds) make
    one table; it is written to ``--out`` (default: the first folder)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", type=Path, nargs="+",
                        help="sweep folders (work_dirs/multirun/<time>)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="where results.md and results.png go (default: the first sweep)")  # fmt: skip
    parser.add_argument("--reference", default=None, metavar="METHOD",
                        help="method (or full row label) every row is compared to, paired by "
                             "seed, e.g. --reference frozen")  # fmt: skip
    args = parser.parse_args(argv)
    runs: list[Run] = []
    expected: list[list[str]] = []
    for sweep in (s.expanduser() for s in args.sweeps):
        if not sweep.is_dir():
            print(f"error: no sweep folder {sweep}; pass the folder a `run.py -m ...` multirun "
                  "wrote, e.g. work_dirs/multirun/<time>", file=sys.stderr)  # fmt: skip
            return 1
        found = collect_runs(sweep)
        if not found:
            print(f"error: {sweep} holds no run folder (<NNN>_<encoder>_<finetune>_<dataset>/ "
                  "with job.json); is it a sweep folder?", file=sys.stderr)  # fmt: skip
            return 1
        runs += found
        expected += expected_jobs(sweep)
    out = (args.out or args.sweeps[0]).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    title = out if len(args.sweeps) == 1 else f"{out} ({len(args.sweeps)} sweeps)"
    for run in runs:
        if run.stale_diagnostics:
            print(f"warning: {run.folder}/diagnostics/explain.json is stale and left out: "
                  f"{run.stale_diagnostics}; re-run scripts/explain.py {run.folder}",
                  file=sys.stderr)  # fmt: skip
    try:
        check_reference(runs, expected, args.reference)
        text = render_markdown(title, runs, expected, reference=args.reference)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(text)
    write_atomic(out / "results.md", lambda tmp: Path(tmp).write_text(text))
    keys = [k for k in sweep_rows(runs, expected)[1] if k != "dataset"]
    groups = {d: build_rows(group, keys) for d, group in by_dataset(runs).items()}
    groups = {d: rows for d, rows in groups.items() if rows}
    if len(groups) > 1:
        draw_across(groups, out / "results.png", f"{len(groups)} datasets")
    elif groups:
        draw_plot(next(iter(groups.values())), out / "results.png", plot_title(runs))
    if groups:
        print(f"wrote {out / 'results.md'} and {out / 'results.png'}")
    return 0 if groups else 1


if __name__ == "__main__":
    sys.exit(main())
