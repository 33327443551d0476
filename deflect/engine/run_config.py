"""The run's config: its top-level settings checked before anything is built or written, a
finished run's saved config rebuilt for evaluation (with command-line key overrides on top, and
only the framework's own classes instantiable), and what a resume changes against it."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_GROUPS = (
    "encoder", "task", "loss", "dataset", "segmentor", "augmentation", "finetune", "optimizer",
    "scheduler",
)  # fmt: skip


# ---- the run's top-level settings, checked before anything is built or written ----------------
_INT, _FLOAT, _BOOL, _CHOICE = "an integer", "a number", "true or false", "one of"
_NAME = "a name"
_RANGE, _LIST = "a number in", "a list"
#: key -> (kind, lower bound, choices or interval, may be null, an example); a key absent from
#: the config (another dataset's or task's) is not checked. An interval is (low, high, low
#: included, high included).
RUN_SETTINGS: dict[str, tuple] = {
    "seed": (_INT, None, False, "seed=0"),
    "img_size": (_INT, 1, False, "img_size=224"),
    "batch_size": (_INT, 1, False, "batch_size=8 (per process; UperNet's BatchNorm needs 2)"),
    "eval_batch_size": (_INT, 1, False, "eval_batch_size=8"),
    "num_workers": (_INT, 0, False, "num_workers=4"),
    "epochs": (_INT, 1, False, "epochs=15"),
    "max_steps_per_epoch": (_INT, 1, True, "max_steps_per_epoch=100 (null: whole epochs)"),
    "stop_after_epochs": (_INT, 1, True, "stop_after_epochs=5"),
    "early_stopping_patience": (_INT, 0, True, "early_stopping_patience=5 (null or 0: off)"),
    "early_stopping_min_delta": (_FLOAT, 0.0, False, "early_stopping_min_delta=0.001"),
    "val_every": (_INT, 1, False, "val_every=3 (validate every 3rd epoch and after the last)"),
    "log_interval": (_INT, 1, False, "log_interval=10"),
    "num_vis": (_INT, 0, False, "num_vis=4"),
    "eval_stride": (_INT, 1, True, "eval_stride=112 (null: half of img_size)"),
    "grad_clip": (_FLOAT, 0.0, False, "grad_clip=1.0 (0 disables it)"),
    "encoder_lr_scale": (_FLOAT, 0.0, False, "encoder_lr_scale=10"),
    "dist_timeout": (_FLOAT, 1.0, False, "dist_timeout=600 (seconds)"),
    "precision": (_CHOICE, ("fp32", "fp16", "bf16"), False, "precision=bf16"),
    "device": (_CHOICE, ("auto", "cpu", "cuda"), False, "device=cuda"),
    "matmul_precision": (_CHOICE, ("highest", "high", "medium"), False, "matmul_precision=high"),
    "cpu_allocator": (_CHOICE, ("tuned", "default"), False, "cpu_allocator=default"),
    # Which names: the run's task says (deflect.engine.build.train_settings, before building).
    "monitor": (_NAME, None, True, "monitor=<one of the task's monitors> (null: its headline)"),
    **{key: (_BOOL, None, False, f"{key}=true") for key in (
        "compile", "activation_checkpointing", "save_predictions", "resume",
        "resume_allow_changes", "keep_last", "check_reflectance_scale", "diagnostics",
    )},
    "optimizer.lr": (_FLOAT, 0.0, False, "optimizer.lr=1e-4"),
    "optimizer.weight_decay": (_FLOAT, 0.0, False, "optimizer.weight_decay=0.05"),
    # The groups' switches: Python's bool() would take any non-empty string (no, off) as true.
    "finetune.train_patch_embed": (_BOOL, None, True,
                                   "finetune.train_patch_embed=true (null: the method's own)"),
    **{key: (_BOOL, None, False, f"{key}=true") for key in (
        "dataset.multi_label", "task.multi_label", "augmentation.rot90",
        "finetune.nir_from_b8a", "finetune.raw_bands",
        "finetune.norm_match", "finetune.train_norms", "finetune.keep_pretrained",
        "encoder.coords_scale_learn", "segmentor.fast_fusion", "segmentor.fold_laterals",
    )},
    "task.threshold": (_RANGE, (0.0, 1.0, False, False), False, "task.threshold=0.5"),
    "task.dropout": (_RANGE, (0.0, 1.0, True, False), False, "task.dropout=0.1"),
    "loss.label_smoothing": (_RANGE, (0.0, 1.0, True, False), False, "loss.label_smoothing=0.1"),
    "dataset.classes": (_LIST, None, True,
                        "dataset.classes=[forest,field,water] (null: those of the data)"),
}  # fmt: skip
#: Keys whose value must be strictly above the lower bound (a learning rate of 0 trains nothing).
_STRICT = {"encoder_lr_scale", "optimizer.lr"}
#: Top-level keys the framework reads (config groups, settings and the folders).
KNOWN_KEYS = {
    *CONFIG_GROUPS, *(k for k in RUN_SETTINGS if "." not in k), "work_root", "work_dir",
    "eval_dir", "cross_sensor",
}  # fmt: skip


def check_run_config(cfg: DictConfig) -> list[str]:
    """Check the top-level settings before anything is built or any folder is made: each bad
    value is an error naming the key, what it must be and an example. Keys no part reads (a
    ``+typo=...``) are returned, and warned about by the caller.

    Raises:
        ValueError: every bad value found, one per line.
    """
    problems = []
    for key, (kind, bound, nullable, example) in RUN_SETTINGS.items():
        if _interpolates_a_checked_key(cfg, key):  # task.multi_label: ${dataset.multi_label}
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            if not nullable and OmegaConf.select(cfg, key, default="<absent>") != "<absent>":
                problems.append(f"{key}=null: expected {kind}; e.g. {example}")
            continue
        ok = True
        if kind == _BOOL:
            ok = isinstance(value, bool)
        elif kind == _CHOICE:
            ok = value in bound
        elif kind == _INT:
            ok = isinstance(value, int) and not isinstance(value, bool)
            ok = ok and (bound is None or value >= bound)
        elif kind == _FLOAT:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = (
                ok
                and value == value
                and (  # NaN is no number here
                    bound is None or (value > bound if key in _STRICT else value >= bound)
                )
            )
        elif kind == _RANGE:
            low, high, low_in, high_in = bound
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and (low <= value if low_in else low < value)
            ok = ok and (value <= high if high_in else value < high)
        elif kind == _LIST:
            ok = isinstance(value, (list, tuple, ListConfig))
        elif kind == _NAME:
            ok = isinstance(value, str) and bool(value.strip())
        if not ok:
            if kind == _RANGE:
                low, high, low_in, high_in = bound
                expected = (
                    f"{kind} {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
                )
            elif kind == _LIST:
                expected = "a list, not a single value"
            elif kind == _CHOICE:
                expected = f"one of {list(bound)}"
            elif bound is None or kind == _BOOL:
                expected = kind
            else:
                expected = f"{kind} {'>' if key in _STRICT else '>='} {bound}"
            problems.append(f"{key}={value!r}: expected {expected}; e.g. {example}")
    task_multi = OmegaConf.select(cfg, "task.multi_label", default=None)
    data_multi = OmegaConf.select(cfg, "dataset.multi_label", default=False)
    if isinstance(task_multi, bool) and isinstance(data_multi, bool) and task_multi != data_multi:
        problems.append(
            f"task.multi_label={str(task_multi).lower()} but dataset.multi_label="
            f"{str(data_multi).lower()}: the dataset gives "
            f"{'sets of labels' if data_multi else 'one class'} per image. Leave task.multi_label "
            "out (it follows the dataset), or set dataset.multi_label for data with label sets"
        )
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError("bad settings:\n  " + "\n  ".join(problems))
    return sorted(set(cfg) - KNOWN_KEYS)


def _interpolates_a_checked_key(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` is an interpolation of another checked key (``task.multi_label`` of
    ``dataset.multi_label``): its value is checked there, and said once."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node:
        return False
    if not OmegaConf.is_interpolation(node, leaf):
        return False
    text = str(OmegaConf.to_container(node, resolve=False)[leaf])
    return any(re.search(rf"[{{:,]\s*{re.escape(other)}\s*[}},]", text)
               for other in RUN_SETTINGS if other != key)  # fmt: skip


#: What a saved run's ``config.yaml`` may instantiate: the framework's own classes and torch's
#: optimisers and schedulers. A run folder can come from anyone; its config must not run code.
ALLOWED_TARGETS = ("deflect.", "datasets.", "segmentors.", "torch.optim.")
#: The functions among them (every other target must be a class).
ALLOWED_FUNCTIONS = frozenset({"deflect.engine.scheduler.warmup_decay"})


def resolve_target(target: str) -> object | None:
    """The object a dotted ``_target_`` names (its longest importable module prefix, then
    attributes), without calling it; ``None`` when it names nothing. Only called on targets
    under :data:`ALLOWED_TARGETS`, so only the framework's and torch's modules are imported."""
    import importlib

    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return None
        return obj
    return None


def target_problem(target: str) -> str | None:
    """Why a saved config may not instantiate ``target``, or ``None`` when it may: it must be
    a class defined in the framework's packages or ``torch.optim`` (or one of
    :data:`ALLOWED_FUNCTIONS`), not anything reachable through them
    (``deflect.engine.workdir.os.system`` names ``os.system``)."""
    import inspect

    if not target.startswith(ALLOWED_TARGETS) or ".." in target:
        return f"outside the framework ({', '.join(ALLOWED_TARGETS)})"
    obj = resolve_target(target)
    if obj is None:
        return "names nothing importable"
    module = getattr(obj, "__module__", None) or ""
    home = f"{module}.{getattr(obj, '__qualname__', '')}"
    if not (module + ".").startswith(ALLOWED_TARGETS):
        return f"resolves to {home}, outside the framework"
    if not inspect.isclass(obj) and home not in ALLOWED_FUNCTIONS:
        return f"resolves to {home}, which is not a class"
    return None


def check_targets(tree: object, source: str, path: str = "") -> None:
    """Refuse a config whose ``_target_`` (or ``_partial_`` callables) name anything outside
    :data:`ALLOWED_TARGETS`, before it is instantiated.

    Raises:
        ValueError: naming the key, the target and the file.
    """
    if isinstance(tree, dict):
        for key, value in tree.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                target = str(value)
                problem = target_problem(target)
                if problem:
                    raise ValueError(
                        f"{source} sets {where}={target!r} ({problem}): a saved run may only "
                        "build the framework's own classes and torch optimisers "
                        f"({', '.join(ALLOWED_TARGETS)}). The file was edited or is not from "
                        "this framework; refusing to instantiate it"
                    )
            else:
                check_targets(value, source, where)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            check_targets(value, source, f"{path}[{i}]")


def eval_config(
    work_dir: Path, overrides: list[str], dataset: DictConfig | None = None
) -> DictConfig:
    """The config a run was trained with, updated by command-line key overrides.

    ``dataset.root=...`` or ``batch_size=...`` apply; selecting another config group
    (``encoder=...``) would evaluate a different experiment and is refused. ``dataset=other``
    (another sensor's data, evaluated through a band mapping) is taken when the caller passes
    that dataset's composed config as ``dataset``; the result's ``cross_sensor`` then holds
    that dataset config's name (``folder``, ``chips``; false otherwise).
    """
    path = work_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"eval_dir {work_dir} is not a run folder (no config.yaml); point eval_dir at a "
            "folder written by a training run, e.g. work_dirs/<time>_<encoder>_<finetune>_<dataset>"
        )
    saved = OmegaConf.load(path)
    chosen = [item.split("=", 1)[1] for item in overrides if item.split("=", 1)[0] == "dataset"]
    other = bool(chosen)
    if other and dataset is None:
        raise ValueError("eval_dir with dataset=<other>: the other dataset's config is needed")
    keep = []
    for item in overrides:
        key = item.split("=", 1)[0]
        if key == "eval_dir" or (other and (key == "dataset" or key.startswith("dataset."))):
            continue  # another dataset: its own composed config replaces the saved one
        if key.startswith(("+", "~")) or key in CONFIG_GROUPS:
            raise ValueError(
                f"eval_dir: the override {item!r} changes the experiment; only key overrides "
                "such as dataset.root=... or batch_size=... apply to a saved run"
            )
        keep.append(item)
    merged = OmegaConf.merge(saved, OmegaConf.from_dotlist(keep))
    if other:
        merged.dataset = OmegaConf.create(OmegaConf.to_container(dataset, resolve=True))
    check_targets(OmegaConf.to_container(merged, resolve=False), str(path))
    merged.eval_dir = str(work_dir)
    merged.cross_sensor = chosen[-1] if other else False
    return merged


# Keys that may change between a run and its resumption without changing the experiment.
RESUME_FREE_KEYS = {
    "resume", "resume_allow_changes", "work_dir", "work_root", "stop_after_epochs",
    "num_workers", "eval_dir", "log_interval", "device", "dist_timeout", "keep_last",
    "eval_batch_size", "num_vis", "save_predictions", "check_reflectance_scale", "diagnostics",
}  # fmt: skip


#: Command-line keys that say how a job was run or continued, not what it trained: resuming a
#: sweep adds ``resume=true`` to every job. They never tell the jobs of an ablation apart.
BOOKKEEPING_KEYS = frozenset(
    {"resume", "resume_allow_changes", "stop_after_epochs", "keep_last", "diagnostics"}
)


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


#: Settings added after runs were saved, with the value that does what runs did before them: a
#: saved config without the key trained that way, so resuming it with that value changes nothing.
ADDED_SETTINGS = {"early_stopping_patience": None, "early_stopping_min_delta": 0.0,
                  "val_every": 1}  # fmt: skip


def _named_task(settings: dict[str, object]) -> dict[str, object]:
    """A config saved when tasks were built from ``task._target_`` (``deflect.tasks.XTask``),
    as ``task.name`` (``x``) names the same task now: resuming it changes nothing."""
    target = settings.get("task._target_")
    if isinstance(target, str) and "task.name" not in settings:
        settings = {k: v for k, v in settings.items() if k != "task._target_"}
        settings["task.name"] = target.rsplit(".", 1)[-1].removesuffix("Task").lower()
    return settings


def resume_config_changes(saved: DictConfig, current: DictConfig) -> list[str]:
    """``key: saved -> current`` for every setting a resumed run changes (free keys aside)."""
    old = {**ADDED_SETTINGS, **_named_task(_flatten(OmegaConf.to_container(saved, resolve=True)))}
    new = {**ADDED_SETTINGS, **_flatten(OmegaConf.to_container(current, resolve=True))}
    changes = []
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in RESUME_FREE_KEYS or old.get(key) == new.get(key):
            continue
        changes.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return changes
