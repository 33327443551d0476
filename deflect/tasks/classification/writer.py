"""What a classification run's test split leaves: ``predictions.csv`` and a picture of samples."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from deflect.io import atomic_path
from deflect.pictures import rgb_composite, save_label_panels, stretch_limits

log = logging.getLogger(__name__)


class ClassificationWriter:
    """What a classification run's test split leaves: ``predictions.csv`` (one row per sample:
    ``sample``, ``label``, ``prediction`` and one probability column per class; label sets as
    ``;``-joined class names) and ``test_predictions.png`` (a few samples: colour composite,
    true and predicted labels). Under torchrun each rank's rows are gathered by rank 0.

    Args:
        dataset: the evaluated dataset (names, classes, ``spec``).
        out_dir: where the files go.
        num_panels: samples shown in the PNG.
        is_main: whether this rank writes.
        task: the classification task (its probabilities and multi-label flag).
        info: rank and world size (for the gather).
    """

    def __init__(self, dataset, out_dir: Path, num_panels: int, is_main: bool, task,
                 info=None) -> None:  # fmt: skip
        spec = dataset.spec
        self.dataset, self.out_dir, self.task, self.info = dataset, out_dir, task, info
        self.is_main = is_main
        self.num_panels = num_panels if is_main else 0
        self.rgb_index = spec.index_of(spec.display_bands, "the prediction pictures")
        self.mean = np.asarray(spec.mean_list(), dtype=np.float32)[self.rgb_index, None, None]
        self.std = np.asarray(spec.std_list(), dtype=np.float32)[self.rgb_index, None, None]
        self.rows: list[tuple[int, str, str, str, list[float]]] = []
        # The first ``num_panels`` misclassified samples and the first correct ones, as
        # (display bands in file units, true, predicted): the picture shows the former first.
        self.wrong: list[tuple[np.ndarray, str, str]] = []
        self.right: list[tuple[np.ndarray, str, str]] = []

    def _names(self, label) -> str:
        classes = self.dataset.classes
        if self.task.multi_label:
            return ";".join(c for c, v in zip(classes, label) if v >= 0.5)
        index = int(label)
        return classes[index] if 0 <= index < len(classes) else ""

    def __call__(self, batch: dict, prediction: torch.Tensor, output: torch.Tensor) -> None:
        """Record one evaluated batch."""
        probabilities = self.task.probabilities(output).cpu().numpy()
        labels = batch["label"].cpu().numpy()
        prediction = prediction.cpu().numpy()
        empty = torch.isnan(batch["image"]).flatten(1).all(dim=1).tolist()  # (B,)
        for j, index in enumerate(batch["index"].tolist()):
            true, predicted = self._names(labels[j]), self._names(prediction[j])
            scores = [float(p) for p in probabilities[j]]
            if empty[j]:  # no valid pixel: not classified, not scored (the dataset's rule)
                predicted, scores = "", []
            self.rows.append((index, self.dataset.sample_name(index), true, predicted, scores))
            kept = self.wrong if true != predicted else self.right
            if not empty[j] and len(kept) < self.num_panels:
                image = batch["image"][j].numpy()[self.rgb_index] * self.std + self.mean
                kept.append((image, true, predicted))

    def panels(self) -> list[tuple[np.ndarray, str, str]]:
        """The samples of the picture: misclassified ones first, then correct ones, at most
        ``num_panels``, each as (colour composite, true, predicted) under one common stretch
        (:func:`stretch_limits`), so uniform samples of different values look different."""
        chosen = (self.wrong + self.right)[: self.num_panels]
        limits = stretch_limits([image for image, _, _ in chosen])
        return [(rgb_composite(image, limits), true, predicted)
                for image, true, predicted in chosen]  # fmt: skip

    def finish(self, out_dir: Path) -> None:
        """Gather every rank's rows (rank 0 writes): ``predictions.csv`` in sample order, and
        the picture."""
        rows = self.rows
        info = self.info
        if info is not None and getattr(info, "distributed", False):
            import torch.distributed as dist

            gathered: list = [None] * info.world_size
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not self.is_main:
            return
        out_dir = Path(out_dir)
        header = ["sample", "label", "prediction", *(f"p_{c}" for c in self.dataset.classes)]
        lines = [",".join(header)]
        for _, name, true, predicted, probabilities in sorted(rows):
            cells = [name, true, predicted, *(f"{p:.6f}" for p in probabilities)]
            cells += [""] * (len(header) - len(cells))
            lines.append(",".join(f'"{c}"' if "," in c else c for c in cells))
        empty = [r[1] for r in sorted(rows) if not r[4]]
        if empty:
            log.warning(
                "%d of %d test images have no valid pixel (e.g. %s): not classified and not "
                "scored (out of the metrics' samples; empty label and prediction in "
                "predictions.csv)", len(empty), len(rows), empty[0],
            )  # fmt: skip
        with atomic_path(out_dir / "predictions.csv") as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        panels = self.panels()
        if panels:
            title = " / ".join(self.dataset.spec.display_bands)
            save_label_panels(panels, out_dir / "test_predictions.png",
                              f"{title} (one stretch for all); misclassified samples first")  # fmt: skip
