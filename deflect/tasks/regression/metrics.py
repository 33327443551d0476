"""The metrics of pixel-wise regression, from sums that add up across batches and ranks.

Per target, over the pixels whose target is finite (NaN marks a pixel without a valid target),
the accumulator keeps six float64 sums: the count ``n``, and with the error ``e = prediction -
target`` and the target ``y``: ``Σe``, ``Σ|e|``, ``Σe²``, ``Σy``, ``Σy²``. Sums of two shards
added together are the sums of their union, so an evaluation split over ranks is one
``all_reduce`` away from its metrics, and every metric is that of the whole evaluation:

* RMSE ``sqrt(Σe² / n)``, MAE ``Σ|e| / n``, bias ``Σe / n`` (mean of prediction - target);
* R² ``1 - SSE / SST`` with ``SSE = Σe²`` and ``SST = Σ(y - ȳ)²`` about the mean ``ȳ`` of the
  valid targets of the whole evaluation (not of a batch, not of the predictions): predicting
  that mean everywhere scores 0, a perfect prediction 1.

A target without a valid pixel has no metrics (``None``) and is left out of the means over
targets; a target whose valid values are all equal (SST 0) has no R².
"""

from __future__ import annotations

import math

import torch

from deflect.tasks.base import Metric

#: Columns of the sums: count, Σe, Σ|e|, Σe², Σy, Σy².
SUMS = ("n", "sum_e", "sum_abs_e", "sum_e2", "sum_y", "sum_y2")
#: The metrics ``monitor`` may select, the default first, and whether higher is better.
HIGHER_IS_BETTER = {"rmse": False, "mae": False, "r2": True}


def regression_sums(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(T, 6)`` float64 sums (:data:`SUMS`) of a batch: ``output`` and ``target`` are
    ``(B, T, H, W)``; pixels whose target is not finite are left out."""
    if output.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(output.shape)} and target {tuple(target.shape)} differ in shape: "
            "the head needs one output channel per target (task.targets)"
        )
    y = target.detach().double().transpose(0, 1).flatten(1)  # (T, B*H*W)
    p = output.detach().double().transpose(0, 1).flatten(1)
    valid = torch.isfinite(y)
    y = torch.where(valid, y, 0.0)
    e = torch.where(valid, p - y, 0.0)
    columns = (valid.double(), e, e.abs(), e * e, y, y * y)
    return torch.stack([c.sum(dim=1) for c in columns], dim=1)


def target_metrics(sums: torch.Tensor) -> dict:
    """RMSE, MAE, R², bias and the valid pixels of one target's sums (a row of
    :func:`regression_sums`); ``None`` where undefined."""
    n, se, sae, see, sy, syy = (float(v) for v in sums)
    if n == 0:
        return {"rmse": None, "mae": None, "r2": None, "bias": None, "pixels": 0}
    mean = sy / n  # of the valid targets of the whole evaluation
    sst = syy - 2 * mean * sy + n * mean**2
    # SST below float64's rounding of Σy² means the targets do not vary: R² is undefined.
    r2 = 1 - see / sst if sst > 1e-12 * max(syy, 1e-300) else None
    return {
        "rmse": math.sqrt(see / n),
        "mae": sae / n,
        "r2": r2,
        "bias": se / n,
        "pixels": int(n),
    }


def metrics_from_sums(sums: torch.Tensor, names: list[str]) -> dict:
    """The metrics of an evaluation: per target (``per_target``), and each metric's mean over
    the targets that have it (NaN when none does); ``pixels`` counts valid target values."""
    if len(names) != sums.shape[0]:
        raise ValueError(f"{sums.shape[0]} targets were scored but {len(names)} named: {names}")
    per_target = {name: target_metrics(row) for name, row in zip(names, sums.cpu())}

    def mean(key: str) -> float:
        values = [m[key] for m in per_target.values() if m[key] is not None]
        return sum(values) / len(values) if values else float("nan")

    return {
        **{key: mean(key) for key in ("rmse", "mae", "r2", "bias")},
        "pixels": sum(m["pixels"] for m in per_target.values()),
        "per_target": per_target,
    }


def target_names(names, count: int) -> list[str]:
    """``names`` when given (checked against ``count``), else ``target_1`` ... ``target_T``."""
    if not names:
        return [f"target_{i + 1}" for i in range(count)]
    if len(names) != count:
        raise ValueError(
            f"task.targets names {len(names)} targets ({list(names)}) but the model predicts "
            f"{count}: name one per output channel"
        )
    return [str(n) for n in names]


class RegressionMetric(Metric):
    """The sums of one evaluation (:func:`regression_sums`), added over batches and, at
    ``compute``, over the ranks of a distributed run.

    Args:
        names: the targets' names; None names them ``target_1`` ... after the first batch.
        device: where the sums are kept (the evaluated outputs' device).
    """

    def __init__(self, names=None, device: torch.device | str = "cpu") -> None:
        self.names = list(names) if names else None
        self.device = torch.device(device)
        self.sums: torch.Tensor | None = None

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        batch = regression_sums(output, target).to(self.device)
        self.sums = batch if self.sums is None else self.sums + batch

    def compute(self) -> dict:
        sums = self.sums
        if sums is None:
            count = len(self.names or [])
            sums = torch.zeros((count, len(SUMS)), dtype=torch.float64, device=self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = sums.clone()
            torch.distributed.all_reduce(sums)  # sums of the shards = sums of the union
        return metrics_from_sums(sums, target_names(self.names, sums.shape[0]))
