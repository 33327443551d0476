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
order on a tie).

A config group's choices can instead be one contestant whose choice is tuned: ``--family
NAME=choice1,choice2,...`` (repeatable; ``select(..., families={NAME: [choices]})`` from
Python). With stage 1 ``finetune=frozen,deflect_hard,deflect_embedding,deflect_none
encoder_lr_scale=3,30`` and ``--family deflect=deflect_hard,deflect_embedding,deflect_none``
the contestants are ``frozen`` and ``deflect``: deflect's candidates are every (choice,
values) pair, the best mean validation wins (not the choice with the best single run), its
chosen values include ``finetune: deflect_embedding`` (say), and ``selected/selected/deflect.yaml``
selects it as ``- override /finetune: deflect_embedding``. With other varying groups the name
is joined as usual (``<dataset>-deflect``). Every listed choice must be one the sweep ran.

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


def search_path(sweep: Path | None) -> list[Path]:
    """The folders of the sweep's ``hydra.searchpath`` (``file://`` entries of its
    ``multirun.yaml``): where options of the user's own config groups live."""
    if sweep is None or not (sweep / "multirun.yaml").is_file():
        return []
    from omegaconf import OmegaConf

    entries = OmegaConf.load(sweep / "multirun.yaml").get("hydra", {}).get("searchpath") or []
    return [Path(str(e)[len("file://") :]) for e in entries if str(e).startswith("file://")]


def config_groups(sweep: Path | None = None) -> set[str]:
    """The config groups: folders of the framework's ``configs/``, and of the folders on the
    sweep's search path (e.g. ``+study=...`` options of one's own)."""
    roots = [REPO / "configs", *search_path(sweep)]
    return {p.name for root in roots if root.is_dir() for p in root.iterdir()
            if p.is_dir() and p.name not in ("hydra", GROUP)}  # fmt: skip


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
    groups = config_groups(trials[0].folder.parent if trials else None)
    contestant = [k for k in varying if k.lstrip("+~") in groups]
    tuned = [k for k in varying if k not in contestant and k != SEED]
    common = {k: v for k, v in trials[0].settings.items() if k not in varying and k != SEED}
    return contestant, tuned, common


def name_of(settings: dict[str, str], contestant: list[str],
            family_of: dict[tuple[str, str], str] | None = None) -> str:  # fmt: skip
    """The contestant's option name: its config-group choices joined by ``-``, a choice in a
    family (``family_of``: ``(key, choice) -> family``) named by its family."""
    family_of = family_of or {}
    return (
        "-".join(family_of.get((k, settings[k]), settings[k]).replace("/", "_") for k in contestant)
        or "all"
    )


def family_keys(trials: list[Trial], contestant: list[str],
                families: dict[str, list[str]]) -> dict[tuple[str, str], str]:  # fmt: skip
    """``(config-group key, choice) -> family`` for ``families`` (``{name: [choices]}``).

    Raises:
        ValueError: a family without choices, a choice the sweep did not run as a varying
            config group's, a family's choices in two groups, a choice in two families, or a
            family named as a choice of the sweep.
    """
    ran = {k: list(dict.fromkeys(t.settings[k] for t in trials if k in t.settings))
           for k in contestant}  # fmt: skip
    family_of: dict[tuple[str, str], str] = {}
    for name, choices in families.items():
        if not choices:
            raise ValueError(f"family {name!r} lists no choice: --family {name}=<choice>,...")
        keys = set()
        for choice in choices:
            where = [k for k in contestant if choice in ran[k]]
            if not where:
                varied = "; ".join(f"{k}: {', '.join(v)}" for k, v in ran.items()) or "none"
                raise ValueError(
                    f"family {name!r}: {choice!r} is not a choice the sweep ran of a config "
                    f"group it varies ({varied}); list only those, e.g. --family "
                    f"{name}=<choice>,<choice>"
                )
            keys.update(where)
            if (where[0], choice) in family_of:
                raise ValueError(f"{choice!r} is in two families: {family_of[where[0], choice]!r}"
                                 f" and {name!r}")  # fmt: skip
            family_of[where[0], choice] = name
        if len(keys) > 1:
            raise ValueError(f"family {name!r} mixes config groups {sorted(keys)}: a family's "
                             "choices are one group's")  # fmt: skip
        clash = [k for k in contestant if name in ran[k] and (k, name) not in family_of]
        if clash:
            raise ValueError(f"family {name!r} is also a {clash[0]} choice the sweep ran: "
                             "name the family otherwise")  # fmt: skip
    return family_of


def select(
    trials: list[Trial],
    metric: str,
    higher_is_better: bool = True,
    families: dict[str, list[str]] | None = None,
) -> tuple[dict[str, dict], list[str], dict[str, str]]:
    """Per contestant, the tuned values with the best mean validation ``metric`` over seeds.

    Args:
        families: ``{name: [choices of one config group]}``: those choices are one contestant
            ``name`` whose choice is tuned with its values (the key is in its ``chosen``, and
            its ``groups`` hold the winning choice).

    Returns:
        ``({contestant: {"groups", "chosen", "validation", "candidates"}}, contestant keys,
        common settings)``.

    Raises:
        KeyError: a run's validation metrics lack ``metric`` (listing those it has).
        ValueError: a family's choice the sweep did not run (see :func:`family_keys`).
    """
    contestant, tuned, common = split_keys(trials)
    family_of = family_keys(trials, contestant, families or {})
    scores: dict[str, dict[tuple, list[float]]] = {}
    for trial in trials:
        if metric not in trial.validation:
            raise KeyError(
                f"{trial.folder}: validation metric {metric!r} not recorded; it has "
                f"{sorted(k for k in trial.validation if k != 'epoch')}: pass --metric"
            )
        values = tuple((k, trial.settings[k]) for k in tuned if k in trial.settings)
        family = tuple((k, trial.settings[k]) for k in contestant
                       if (k, trial.settings[k]) in family_of)  # fmt: skip
        values = family + values  # a family's choice is tuned like a value
        name = name_of(trial.settings, contestant, family_of)
        scores.setdefault(name, {}).setdefault(values, []).append(float(trial.validation[metric]))
    chosen = {}
    for name, candidates in scores.items():
        means = {values: statistics.mean(v) for values, v in candidates.items()}
        best = max(means, key=lambda v: means[v] if higher_is_better else -means[v])
        first = next(t for t in trials if name_of(t.settings, contestant, family_of) == name)
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
    lines += [
        f"  - /{k[1:]}: {v}" if k.startswith("+") else f"  - override /{k}: {v}"
        for k, v in groups.items()
    ]  # fmt: skip  (an appended group: no override)
    chosen = {k: v for k, v in chosen.items() if k not in groups}  # a family's choice: above
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
    path = ",".join(f"file://{p}" for p in [(sweep / "selected").resolve(), *search_path(sweep)])
    command = " ".join([
        "python run.py -m", f"'hydra.searchpath=[{path}]'",
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
                        help="one config group's choices as one contestant NAME whose choice is "
                             "tuned, not compared (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    families = {}
    for item in args.family:
        name, _, choices = item.partition("=")
        if not name or not choices:
            parser.error(f"--family {item!r}: expected NAME=choice1,choice2,... e.g. "
                         "--family deflect=deflect_hard,deflect_embedding")  # fmt: skip
        families[name] = [c for c in choices.split(",") if c]
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
        chosen, contestant, common = select(trials, metric, higher, families=families)
    except (KeyError, ValueError) as error:
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
