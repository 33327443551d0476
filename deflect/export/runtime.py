"""An exported ONNX file run by ONNX Runtime behind the framework's scene tiler.

    python scripts/predict.py --onnx work_dirs/<run>/export/model.onnx scene.tif --out maps/

:func:`load_onnx_predictor` reads the file's metadata (band manifest, classes, task, window,
stride) into a :class:`~deflect.predict.Predictor` whose model is an :class:`OnnxModel`:
the tiler reads, matches bands, checks the reflectance scale and averages tiles exactly as for
the PyTorch model, but hands the model raw tiles (no-data as NaN, in the files' units), since
the file normalises them itself. Tiles are checked against what the file takes before ONNX
Runtime sees them, so a wrong band count or size is said plainly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deflect.data import DataSpec
from deflect.export.onnx import EXTRA_HINT, META_PREFIX, ExportError


def open_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session of ``path`` (``threads`` intra-op threads; default: as many
    as torch uses).

    Raises:
        ExportError: onnxruntime is not installed.
        FileNotFoundError: no such file.
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ExportError(f"running an ONNX file needs onnxruntime; {EXTRA_HINT}") from err
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ONNX file {str(path)!r} does not exist; export the run first: python "
            "scripts/export.py work_dirs/<run>"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.log_severity_level = 3  # errors only: not the constant-folding notices
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModel(nn.Module):
    """An exported file as a model the tiler calls: raw ``(B, C, H, W)`` torch tiles -> the
    task's logits as a torch tensor (classification: the ``logits`` output, from which the task
    derives probabilities and decisions as for the PyTorch model).

    Args:
        path: the ONNX file written by ``scripts/export.py``.
        threads: ONNX Runtime intra-op threads.
    """

    metadata_keys: tuple[str, ...] = ()

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = open_session(self.path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        if META_PREFIX + "band_manifest" not in meta:
            raise ExportError(
                f"{self.path} has no deflect.band_manifest metadata: it was not written by "
                "scripts/export.py; export the run with it"
            )
        self.metadata = {k[len(META_PREFIX) :]: v for k, v in meta.items()
                         if k.startswith(META_PREFIX)}  # fmt: skip
        self.spec = DataSpec.from_dict(json.loads(self.metadata["band_manifest"]))
        self.task = self.metadata.get("task", "segmentation")
        self.window = int(self.metadata["window"])
        self.patch = int(self.metadata["patch_size"])
        self.any_size = json.loads(self.metadata.get("any_size", "false"))
        self.min_size = int(self.metadata.get("min_size", self.patch))
        self.outputs = json.loads(self.metadata.get("outputs", '["logits"]'))

    def expects(self) -> str:
        """What the file takes, in words."""
        c, bands = self.spec.num_bands, list(self.spec.bands)
        if self.any_size:
            size = f"H and W multiples of {self.patch} px, at least {self.min_size} px"
        else:
            size = f"H = W = {self.window} px"
        return f"float32 (B, {c}, H, W) with the bands {bands} in that order, {size}"

    def check(self, shape: tuple[int, ...]) -> None:
        """Refuse a batch the file cannot take, naming what it takes.

        Raises:
            ValueError: not 4-D, another number of bands, or an unsupported size.
        """
        if len(shape) != 4:
            raise ValueError(f"{self.path.name} takes {self.expects()}; got shape {shape}")
        _, c, h, w = shape
        if c != self.spec.num_bands:
            raise ValueError(
                f"{self.path.name} takes {self.spec.num_bands} bands {list(self.spec.bands)}, "
                f"got {c}: give exactly those bands, in that order ({self.expects()})"
            )
        if self.any_size:
            bad = h % self.patch or w % self.patch or min(h, w) < self.min_size
        else:
            bad = (h, w) != (self.window, self.window)
        if bad:
            raise ValueError(
                f"{self.path.name} cannot take {h} x {w} px: it takes {self.expects()}; crop or "
                "pad (with NaN) the image, or predict it with scripts/predict.py --onnx, which "
                "tiles it"
            )

    def run(self, raw: np.ndarray) -> list[np.ndarray]:
        """Every output of the file for raw float32 input ``(B, C, H, W)``, after :meth:`check`."""
        self.check(tuple(raw.shape))
        return self.session.run(None, {"image": np.ascontiguousarray(raw, dtype=np.float32)})

    def forward(self, x: torch.Tensor, **metadata: torch.Tensor) -> torch.Tensor:
        """Raw tiles -> logits (the ``logits`` output), on ``x``'s device."""
        out = self.run(x.detach().float().cpu().numpy())
        logits = out[self.outputs.index("logits")]
        return torch.from_numpy(logits).to(x.device)


def load_onnx_predictor(path: str | Path, stride: int | None = None, threads: int | None = None):
    """A :class:`~deflect.predict.Predictor` running ``path`` with ONNX Runtime.

    Args:
        path: the exported ``model.onnx``.
        stride: sliding-window stride; None uses the run's (stored in the file).
        threads: ONNX Runtime intra-op threads (default: as many as torch uses).

    Raises:
        ExportError: onnxruntime missing, or not a file written by ``scripts/export.py``.
        ValueError: a bad stride.
    """
    from deflect.predict import Predictor
    from deflect.tasks import ClassificationTask, SegmentationTask

    model = OnnxModel(path, threads)
    meta = model.metadata
    window = model.window
    if model.task == "classification":
        task = ClassificationTask(
            multi_label=json.loads(meta.get("multi_label", "false")),
            threshold=float(meta.get("threshold", 0.5)),
        )
        default = window
    else:
        task = SegmentationTask()
        default = int(meta.get("stride", window // 2))
    stride = int(default if stride is None else stride)
    if not 1 <= stride <= window:
        raise ValueError(f"stride={stride} must be between 1 and the window ({window} px)")
    epoch = json.loads(meta.get("epoch", "null"))
    return Predictor(
        model, model.spec, window, stride, torch.device("cpu"), "fp32", Path(path).parent,
        epoch, tuple(json.loads(meta.get("file_patterns", "[null, null]"))), task, raw_input=True,
    )  # fmt: skip
