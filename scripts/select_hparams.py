"""The protocol's selection step: each method's hyperparameters chosen on VALIDATION, then K seeds.

    # stage 1: a grid over methods and learning rates (any launcher: local, submitit_slurm)
    python run.py -m finetune=frozen,lora,deflect optimizer.lr=1e-4,3e-4,1e-3 encoder_lr_scale=1,10
    # the selection: reads every run's best validation metric, never its test metric
    python scripts/select_hparams.py work_dirs/multirun/<time> --seeds 5
    # stage 2: one multirun, every method at its chosen values, seeds 0..K-1 (printed above)
    python run.py -m hydra.searchpath=[file://<stage 1>/selected] +selected=frozen,lora,deflect \\
        seed=0,1,2,3,4
    python scripts/ablation_table.py work_dirs/multirun/<stage 2 time> --reference frozen

What is compared and what is tuned are told apart by the overrides that vary across stage 1's
jobs: config groups (``finetune``, ``dataset``, ``encoder``, ...) name a contestant (one choice
per contestant, e.g. per method and dataset); every other varying key (``optimizer.lr``,
``encoder_lr_scale``, ``finetune.rank``, ...) is a hyperparameter; ``seed`` is averaged over.
Per contestant, the values with the best mean validation score win (the first in the sweep's
order on a tie). ``--family deflect=deflect_hard,deflect_embedding`` makes several choices of a
config group one contestant whose choice is tuned like a value (DEFLECT with the deflection
validation prefers); its option overrides the group with the chosen member.

Each run's validation score is ``metrics.json``'s ``best_val`` (the monitored metric of the
epoch ``best.pt`` was saved at; ``best_val_metrics.json`` for a run that has not been tested
yet); the metric is the run's ``monitor`` (null: its task's headline), or ``--metric``, and its
direction the task's (regression's ``rmse``: lower is better), or ``--lower-is-better``.

Writes into the stage-1 folder: ``selected.yaml`` (per contestant: the chosen overrides, their
mean validation score, every candidate's) and ``selected/selected/<contestant>.yaml``, one Hydra
option per contestant (``# @package _global_``: its config-group choices as ``override``
defaults and its chosen values), so stage 2 is ``+selected=<all contestants>`` with the seeds in
one sweep, through whatever launcher ``hydra/launcher`` names.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEED = "seed"
GROUP = "selected"  # the config group stage 2 selects from


@dataclass
class Trial:
    """One finished stage-1 job: its overrides and its best validation metrics."""

    folder: Path
    settings: dict[str, str]
    validation: dict


def config_groups() -> set[str]:
    """The framework's config groups (folders of ``configs/``)."""
    return {p.name for p in (REPO / "configs").iterdir() if p.is_dir() and p.name != "hydra"}


def read_json(path: Path) -> dict:
    """A JSON file, or ``{}`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def validation_of(folder: Path) -> dict:
    """The run's best validation metrics: ``metrics.json``'s ``best_val``, else
    ``best_val_metrics.json`` (trained, not yet tested); ``{}`` when it has neither."""
    return read_json(folder / "metrics.json").get("best_val") or read_json(
        folder / "best_val_metrics.json"
    )


def collect_trials(sweep: Path) -> list[Trial]:
    """The jobs of ``sweep`` (folders with ``job.json``) that reached a best validation
    checkpoint, in job order."""
    from deflect.engine.workdir import BOOKKEEPING_KEYS

    trials = []
    for folder in sorted(p for p in sweep.iterdir() if (p / "job.json").is_file()):
        overrides = read_json(folder / "job.json").get("overrides", [])
        settings = dict(item.split("=", 1) for item in overrides if "=" in item)
        settings = {k: v for k, v in settings.items() if k.lstrip("+~") not in BOOKKEEPING_KEYS}
        validation = validation_of(folder)
        if validation:
            trials.append(Trial(folder, settings, validation))
    return trials


def monitor_of(folder: Path, metric: str | None = None) -> tuple[str, bool]:
    """``(metric, higher is better)``: ``metric``, else the run's ``monitor``, else its task's
    headline; the direction is the task's for that metric (``task.better``; higher when the
    task does not say, as for mIoU and mF1)."""
    from omegaconf import OmegaConf

    from deflect.engine.build import build_task

    path = folder / "config.yaml"
    if not path.is_file():  # a run folder without its config: the flags say it all
        if metric is None:
            raise KeyError(f"{path} is missing, so the run's monitor is unknown: pass --metric")
        return metric, True
    cfg = OmegaConf.load(path)
    task = build_task(cfg)
    metric = metric or str(cfg.get("monitor") or task.headline)
    better = getattr(task, "better", None)
    return metric, True if better is None else bool(better(metric, 1.0, 0.0))


def split_keys(trials: list[Trial]) -> tuple[list[str], list[str], dict[str, str]]:
    """``(contestant keys, tuned keys, common settings)``: varying config-group keys, the other
    varying keys (seed excluded), and the keys every job shares."""
    keys = list(dict.fromkeys(k for t in trials for k in t.settings))
    varying = [k for k in keys if len({t.settings.get(k) for t in trials}) > 1]
    groups = config_groups()
    contestant = [k for k in varying if k.lstrip("+~") in groups]
    tuned = [k for k in varying if k not in contestant and k != SEED]
    common = {k: v for k, v in trials[0].settings.items() if k not in varying and k != SEED}
    return contestant, tuned, common


def name_of(settings: dict[str, str], contestant: list[str],
            families: dict[str, list[str]] | None = None) -> str:  # fmt: skip
    """The contestant's option name: its config-group choices joined by ``-``, a choice that
    belongs to a family (``{family: [choices]}``) named by its family."""
    family = {c: name for name, choices in (families or {}).items() for c in choices}
    return "-".join(family.get(settings[k], settings[k]).replace("/", "_")
                    for k in contestant) or "all"  # fmt: skip


def check_families(trials: list[Trial], contestant: list[str],
                   families: dict[str, list[str]]) -> None:  # fmt: skip
    """Every choice a family lists is a config-group choice some stage-1 job made."""
    made = {t.settings[k] for t in trials for k in contestant if k in t.settings}
    for name, choices in families.items():
        missing = [c for c in choices if c not in made]
        if missing:
            raise KeyError(
                f"family {name!r} lists {missing}, which no stage-1 job chose (the sweep's "
                f"config-group choices: {sorted(made)}); e.g. --family {name}="
                + ",".join(c for c in choices if c in made)
            )


def select(
    trials: list[Trial],
    metric: str,
    higher_is_better: bool = True,
    families: dict[str, list[str]] | None = None,
) -> tuple[dict[str, dict], list[str], dict[str, str]]:
    """Per contestant, the tuned values with the best mean validation ``metric`` over seeds.

    ``families`` (``{name: [config-group choices]}``) makes several choices of a config group
    one contestant, ``name``, whose choice is tuned like a value: e.g. ``{"deflect":
    ["deflect_hard", "deflect_embedding"]}`` picks one of the two per dataset.

    Returns:
        ``({contestant: {"groups", "chosen", "validation", "candidates"}}, contestant keys,
        common settings)``; ``groups`` holds the chosen family member, ``chosen`` the tuned
        values (and, for a family, the group key with the member chosen).

    Raises:
        KeyError: a run's validation metrics lack ``metric`` (listing those it has), or a
            family lists a choice no job made.
    """
    contestant, tuned, common = split_keys(trials)
    families = families or {}
    check_families(trials, contestant, families)
    members = {c for choices in families.values() for c in choices}
    scores: dict[str, dict[tuple, list[float]]] = {}
    for trial in trials:
        if metric not in trial.validation:
            raise KeyError(
                f"{trial.folder}: validation metric {metric!r} not recorded; it has "
                f"{sorted(k for k in trial.validation if k != 'epoch')}: pass --metric"
            )
        values = tuple((k, trial.settings[k]) for k in contestant
                       if trial.settings.get(k) in members)  # fmt: skip
        values += tuple((k, trial.settings[k]) for k in tuned if k in trial.settings)
        name = name_of(trial.settings, contestant, families)
        scores.setdefault(name, {}).setdefault(values, []).append(float(trial.validation[metric]))
    chosen = {}
    for name, candidates in scores.items():
        means = {values: statistics.mean(v) for values, v in candidates.items()}
        best = max(means, key=lambda v: means[v] if higher_is_better else -means[v])
        first = next(t for t in trials if name_of(t.settings, contestant, families) == name)
        chosen[name] = {
            "groups": {k: dict(best).get(k, first.settings[k]) for k in contestant},
            "chosen": dict(best),
            "validation": means[best],
            "candidates": [
                {"overrides": dict(v), "validation": m, "seeds": len(candidates[v])}
                for v, m in means.items()
            ],  # fmt: skip
        }
    return chosen, contestant, common


def option_yaml(groups: dict[str, str], chosen: dict[str, str]) -> str:
    """One stage-2 option: the contestant's config-group choices and its chosen values."""
    from omegaconf import OmegaConf

    lines = ["# @package _global_", "# written by scripts/select_hparams.py", "defaults:"]
    lines += [f"  - override /{k.lstrip('+')}: {v}" for k, v in groups.items()]
    chosen = {k: v for k, v in chosen.items() if k not in groups}  # a family's member: a group
    values = OmegaConf.to_yaml(OmegaConf.from_dotlist([f"{k}={v}" for k, v in chosen.items()]))
    return "\n".join(lines) + "\n" + (values if chosen else "")


def write_selection(sweep: Path, chosen: dict, common: dict[str, str], seeds: int,
                    metric: str, higher_is_better: bool) -> str:  # fmt: skip
    """Write ``selected.yaml`` and the options; return the stage-2 command."""
    import yaml

    options = sweep / "selected" / GROUP
    options.mkdir(parents=True, exist_ok=True)
    for name, entry in chosen.items():
        (options / f"{name}.yaml").write_text(option_yaml(entry["groups"], entry["chosen"]))
    command = " ".join([
        "python run.py -m", f"'hydra.searchpath=[file://{(sweep / 'selected').resolve()}]'",
        f"+{GROUP}={','.join(chosen)}", f"{SEED}={','.join(str(s) for s in range(seeds))}",
        *(f"{k}={v}" for k, v in common.items()),
    ])  # fmt: skip
    summary = {"metric": metric, "higher_is_better": higher_is_better, "split": "validation",
               "stage_2": command, "methods": chosen}  # fmt: skip
    (sweep / "selected.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    return command


def main(argv: list[str] | None = None) -> int:
    """Select, write, print the choices and the stage-2 command; 1 when nothing can be chosen."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="the stage-1 sweep folder")
    parser.add_argument("--seeds", type=int, default=5, help="K: stage 2 runs seeds 0..K-1")
    parser.add_argument("--metric", default=None,
                        help="validation metric (default: the runs' monitor)")  # fmt: skip
    parser.add_argument("--lower-is-better", action="store_true", default=None,
                        help="the metric is better lower (default: the run's task says, e.g. "
                             "rmse is lower-is-better)")  # fmt: skip
    parser.add_argument("--family", action="append", default=[], metavar="NAME=C1,C2,...",
                        help="config-group choices that are one contestant NAME whose choice is "
                             "tuned, e.g. deflect=deflect_hard,deflect_embedding (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    families = {}
    for item in args.family:
        name, _, choices = item.partition("=")
        if not name or not choices:
            parser.error(f"--family {item!r}: use NAME=choice1,choice2, e.g. "
                         "deflect=deflect_hard,deflect_embedding")  # fmt: skip
        families[name] = choices.split(",")
    sweep = args.sweep.expanduser()
    trials = collect_trials(sweep) if sweep.is_dir() else []
    if not trials:
        print(f"error: {sweep} holds no run with validation metrics (metrics.json's best_val "
              "or best_val_metrics.json); pass a stage-1 `run.py -m` sweep folder",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        metric, higher = monitor_of(trials[0].folder, args.metric)
        higher = higher and not args.lower_is_better
        chosen, contestant, common = select(trials, metric, higher, families)
    except KeyError as error:
        print(f"error: {error.args[0]}", file=sys.stderr)
        return 1
    command = write_selection(sweep, chosen, common, args.seeds, metric, higher)
    for name, entry in chosen.items():
        values = " ".join(f"{k}={v}" for k, v in entry["chosen"].items()) or "(nothing tuned)"
        print(f"{name}: {values}  (validation {metric} {entry['validation']:.4f}, "
              f"{len(entry['candidates'])} candidates)")  # fmt: skip
    print(f"\nwrote {sweep / 'selected.yaml'}; stage 2:\n{command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
