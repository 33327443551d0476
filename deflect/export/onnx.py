"""Export a finished run to one ONNX file that ONNX Runtime runs without PyTorch.

    from deflect.export import export_run
    result = export_run("work_dirs/<run>")   # <run>/export/model.onnx and export/README.md

The file computes :class:`~deflect.export.graph.RawInputModel`: the raw image in the run's band
order -> no-data and normalisation -> the model with its adapter merged where the method allows
-> class logits at the input's size (segmentation) or probabilities and logits
(classification). Batch, height and width are free (height and width multiples of the patch
size, at least two patches for segmentation), except for encoders whose positional embedding
is fixed to the trained size (Scale-MAE, Prithvi): then only the batch is free.

PyTorch's current exporter does it: ``torch.export`` traces the model with symbolic batch,
height and width, and ``torch.onnx.export(..., dynamo=True)`` translates the program to ONNX
(opset 18, through onnxscript). Every export is checked before it is kept: ONNX Runtime's
outputs against the framework's PyTorch model at the traced size and at two other sizes.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deflect.data import DataSpec
from deflect.export.graph import RawInputModel, prepare_for_export

log = logging.getLogger(__name__)

#: ONNX opset of the exported files (antialiased Resize needs 18).
OPSET = 18
#: Largest difference from PyTorch an export may show at fp32 before it is refused.
TOLERANCE = 1e-4
#: The metadata keys of the file (all strings; JSON where structured).
META_PREFIX = "deflect."
#: What ``pip`` installs for exporting (and ``make setup`` installs).
EXTRA_HINT = (
    "pip install -e '.[export]' (or make setup), which installs onnx, onnxscript and onnxruntime"
)


class ExportError(RuntimeError):
    """An export that cannot be done, with its cause and the fix."""


def require_export_extra() -> None:
    """Refuse early, naming the fix, when the ``export`` extra is not installed."""
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(
            f"exporting to ONNX needs {', '.join(missing)}, not installed in this environment; "
            f"install the export extra: {EXTRA_HINT}"
        )


def framework_version() -> str:
    """The installed version of this framework (``deflect-seg``), or ``unknown``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deflect-seg")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote and measured.

    Args:
        path: the ONNX file.
        seconds: wall-clock time of tracing and translating.
        size_bytes: the file's size.
        max_difference: the largest |ONNX Runtime - PyTorch| over every checked size.
        checked_sizes: the ``(height, width)`` sizes checked (the traced one first).
        merged: what happened to the adapter (merged into the weights, or kept).
        any_size: whether height and width are free.
    """

    path: Path
    seconds: float
    size_bytes: int
    max_difference: float
    checked_sizes: tuple[tuple[int, int], ...]
    merged: str
    any_size: bool


# ------------------------------------------------------------------------------ the exporter


def _module_of(program: torch.export.ExportedProgram, op: str) -> str:
    """The module path (and class) of the first node calling ``op`` in ``program``."""
    for node in program.graph.nodes:
        if node.op == "call_function" and op in str(node.target):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path, cls = list(stack.values())[-1]
                name = getattr(cls, "__name__", str(cls)).rsplit(".", 1)[-1]
                return f"{path or '<top>'} ({name})"
            return "<top>"
    return "an unknown module"


def _unsupported(err: Exception, program: torch.export.ExportedProgram | None) -> ExportError:
    """An :class:`ExportError` naming the operator the ONNX translation failed on and the
    module it came from."""
    texts, cause = [], err
    while cause is not None and len(texts) < 5:
        texts.append(str(cause))
        cause = cause.__cause__
    text = "\n".join(texts)
    found = re.search(r"op='(\w+)\.(\w+)'", text) or re.search(r"torch\.ops\.(\w+)\.(\w+)", text)
    reason = re.search(r"(No ONNX function found[^\n]*|Unsupported[^\n]*)", text)
    what, where = "an operator", ""
    if found:
        what = f"operator {found.group(1)}::{found.group(2)}"
        if program is not None:
            where = f" called in {_module_of(program, f'{found.group(1)}.{found.group(2)}')}"
    first = reason.group(1) if reason else (text.strip().splitlines() or [type(err).__name__])[0]
    return ExportError(
        f"the ONNX exporter cannot translate {what}{where}: {first}. Replace that operation in "
        "the module by ones ONNX has (or register a translation with torch.onnx.export's "
        "custom_translation_table), then export again"
    )


def trace(
    module: nn.Module, example: torch.Tensor, any_size: bool, patch: int, min_patches: int
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` with a symbolic batch (and height and width, as multiples
    of the patch size, when ``any_size``).

    Raises:
        ExportError: tracing failed (the message names the module's frame from torch's error).
    """
    batch = torch.export.Dim("batch", min=1, max=65536)
    dims: dict[int, object] = {0: batch}
    if any_size:
        dims[2] = patch * torch.export.Dim("height_patches", min=min_patches, max=8192 // patch)
        dims[3] = patch * torch.export.Dim("width_patches", min=min_patches, max=8192 // patch)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, (example,), dynamic_shapes=(dims,), strict=False)
    except Exception as err:  # torch's many tracing errors: kept as the cause
        raise ExportError(
            f"torch.export could not trace the model ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); the traceback "
            "above names the module's line. Make that code traceable (no Python branches on "
            "tensor values) and export again"
        ) from err


def to_onnx(
    program: torch.export.ExportedProgram,
    example: torch.Tensor,
    output_names: list[str],
    path: Path,
    metadata: dict[str, str],
) -> None:
    """Translate ``program`` to ONNX (opset :data:`OPSET`), add ``metadata``, write ``path``.

    Raises:
        ExportError: an operator the translation cannot handle (named, with its module).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                program, (example,), dynamo=True, opset_version=OPSET,
                input_names=["image"], output_names=output_names, optimize=True, verbose=False,
            )  # fmt: skip
    except Exception as err:
        raise _unsupported(err, program) from err
    for key, value in metadata.items():
        onnx_program.model.metadata_props[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx_program.save(str(tmp), external_data=False)
    tmp.replace(path)


def export_model(
    model: nn.Module,
    spec: DataSpec,
    path: str | Path,
    window: int,
    task: str = "segmentation",
    multi_label: bool = False,
    gsd: float | None = None,
    metadata: dict[str, object] | None = None,
    check_sizes: tuple[tuple[int, int], ...] | None = None,
) -> ExportResult:
    """Export ``model`` (the framework's segmentor or classifier, normalised input) with its
    band handling to ``path``, and check ONNX Runtime against PyTorch.

    Args:
        model: the trained model (left untouched: a prepared copy is exported).
        spec: its band manifest.
        path: the ONNX file to write.
        window: the traced size (the run's ``img_size``).
        task: ``segmentation`` or ``classification``.
        multi_label: classification with one sigmoid per label.
        gsd: constant ground sample distance for encoders that take one.
        metadata: more ``deflect.*`` metadata (JSON-encoded unless strings).
        check_sizes: the other sizes to check (default: two sizes other than ``window``).

    Returns:
        What was written and measured.

    Raises:
        ExportError: the extra is missing, an operator cannot be exported, or the file's
            outputs differ from PyTorch's by more than :data:`TOLERANCE`.
    """
    require_export_extra()
    for name in ("onnx_ir", "onnxscript"):  # one INFO line per pass and initializer otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    path = Path(path)
    model = model.eval()
    patch = int(getattr(model.encoder, "patch_size", 1))
    prepared, changes = prepare_for_export(model)
    any_size = bool(changes["any_size"])
    exported = RawInputModel(prepared, spec, task, multi_label, gsd).eval()
    reference = RawInputModel(_any_size_copy(model) if any_size else model, spec, task,
                              multi_label, gsd).eval()  # fmt: skip
    min_patches = 2 if task == "segmentation" else 1
    example = example_image(spec, 2, window, window, seed=0)
    outputs = ["probabilities", "logits"] if task == "classification" else ["logits"]
    meta = {
        "bands": list(spec.bands),
        "band_manifest": spec.to_dict(),
        "classes": list(spec.classes),
        "task": task,
        "multi_label": multi_label,
        "window": window,
        "patch_size": patch,
        "any_size": any_size,
        "min_size": min_patches * patch,
        "merged": changes["merged"],
        "outputs": outputs,
        "framework_version": framework_version(),
        "torch_version": torch.__version__,
        "opset": OPSET,
        **(metadata or {}),
    }
    strings = {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    start = time.perf_counter()
    with torch.no_grad():
        program = trace(exported, example, any_size, patch, min_patches)
        to_onnx(program, example, outputs, path, strings)
    seconds = time.perf_counter() - start
    if check_sizes is None:
        check_sizes = other_sizes(window, patch, min_patches) if any_size else ()
    sizes = ((window, window), *check_sizes)
    worst = check_against_pytorch(path, reference, spec, sizes)
    if worst > TOLERANCE:
        path.unlink(missing_ok=True)
        raise ExportError(
            f"the exported model differs from PyTorch by up to {worst:.3g} (allowed "
            f"{TOLERANCE:g}) at sizes {list(sizes)}; the file was removed. An operator was "
            "translated with other semantics: report it with the run's config"
        )
    log.info("exported %s in %.1f s (%.1f MB); ONNX Runtime = PyTorch within %.2g at %s; %s",
             path, seconds, path.stat().st_size / 1e6, worst, list(sizes),
             changes["merged"])  # fmt: skip
    return ExportResult(path, seconds, path.stat().st_size, worst, tuple(sizes),
                        str(changes["merged"]), any_size)  # fmt: skip


def _any_size_copy(model: nn.Module) -> nn.Module:
    """The framework's model itself (unmerged, PyTorch's own pooling and fusion), with only its
    positional embedding resampled to the input's grid: the PyTorch reference at other sizes."""
    from deflect.export.graph import allow_any_size, copy_for_export

    reference = copy_for_export(model)
    allow_any_size(reference)
    return reference


def other_sizes(window: int, patch: int, min_patches: int) -> tuple[tuple[int, int], ...]:
    """Two sizes other than ``window``: a larger non-square one and a smaller one."""
    grid = window // patch
    larger = ((grid + 2) * patch, (grid + 3) * patch)
    small = max(min_patches + 1, grid // 2)
    smaller = (small * patch, max(min_patches, small - 1) * patch)
    if smaller[0] == window and smaller[1] == window:
        smaller = ((grid + 1) * patch, (grid + 1) * patch)
    return larger, smaller


def example_image(spec: DataSpec, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Raw-looking input: each band around its training mean and spread, with NaN pixels, a
    no-data patch (when the run has a no-data value) and one all-invalid corner."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(spec.mean_list()).view(1, -1, 1, 1)
    std = torch.tensor(spec.std_list()).view(1, -1, 1, 1)
    raw = mean + std * torch.randn(batch, spec.num_bands, height, width, generator=g)
    raw[:, :, : max(1, height // 8), : max(1, width // 8)] = float("nan")
    if spec.nodata is not None:
        raw[:, 0, height // 2, : width // 3] = float(spec.nodata)
        raw[-1, :, -2:, -3:] = float(spec.nodata)
    return raw.float()


def check_against_pytorch(
    path: Path, reference: nn.Module, spec: DataSpec, sizes: tuple[tuple[int, int], ...]
) -> float:
    """The largest |ONNX Runtime - PyTorch| of every output of ``path`` over raw inputs of
    ``sizes`` (batch 3, an untraced batch size)."""
    from deflect.export.runtime import open_session

    session = open_session(path)
    worst = 0.0
    for i, (h, w) in enumerate(sizes):
        raw = example_image(spec, 3, h, w, seed=10 + i)
        with torch.no_grad():
            expected = reference(raw)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(None, {"image": raw.numpy()})
        for e, o in zip(expected, got):
            if tuple(e.shape) != o.shape:
                raise ExportError(f"ONNX output of shape {o.shape}, PyTorch {tuple(e.shape)}")
            worst = max(worst, float(np.abs(o - e.numpy()).max()))
    return worst


# ------------------------------------------------------------------------------------- a run


def export_run(
    run_dir: str | Path, out: str | Path | None = None, allow_unfinished: bool = False
) -> ExportResult:
    """Export a finished run folder: ``<run>/export/model.onnx`` and ``<run>/export/README.md``.

    Args:
        run_dir: the run folder (or its ``adapter/``).
        out: the ONNX file (default ``<run>/export/model.onnx``); the README goes beside it.
        allow_unfinished: export a run that has not finished (its best checkpoint may still
            change).

    Raises:
        ExportError: the run is unfinished, the extra is missing, or the export failed.
        FileNotFoundError: not a run folder, or no best checkpoint.
    """
    from deflect.engine.workdir import FINISHED_MARKER, eval_config, is_finished
    from deflect.predict import default_stride, load_predictor, resolve_run_dir

    run_dir = resolve_run_dir(run_dir)
    if not is_finished(run_dir) and not allow_unfinished:
        raise ExportError(
            f"run {run_dir} is unfinished (no {FINISHED_MARKER}): its best checkpoint may still "
            "change and it was never tested. Finish it first (python run.py resume=true "
            f"work_dir={run_dir}), or export what it has with --allow-unfinished"
        )
    require_export_extra()
    predictor = load_predictor(run_dir, device="cpu", precision="fp32")
    cfg = eval_config(run_dir, [])
    task = getattr(predictor.task, "name", "segmentation")
    multi_label = bool(getattr(predictor.task, "multi_label", False))
    gsd = (predictor.spec.gsd or 1.0) if "gsd" in predictor.model.metadata_keys else None
    path = Path(out) if out is not None else run_dir / "export" / "model.onnx"
    stride = predictor.window if task == "classification" else default_stride(cfg, predictor.window)
    metadata = {
        "method": method_name(predictor.model),
        "encoder": str(cfg.encoder.get("name", "unknown")),
        "run": run_dir.name,
        "epoch": predictor.epoch,
        "stride": stride,
        "threshold": float(getattr(predictor.task, "threshold", 0.5)),
        "reflectance_scale": predictor.spec.reflectance_scale,
        "nodata": predictor.spec.nodata,
        "file_patterns": list(predictor.file_patterns),
    }
    result = export_model(predictor.model, predictor.spec, path, predictor.window, task,
                          multi_label, gsd, metadata)  # fmt: skip
    write_readme(path.with_name("README.md"), path, predictor.spec, result, task, multi_label,
                 metadata)  # fmt: skip
    return result


def method_name(model: nn.Module) -> str:
    """The fine-tuning method of ``model``'s encoder (``deflect``, ``lora``, ...)."""
    encoder = getattr(model, "encoder", None)
    configs = getattr(encoder, "peft_config", None) or {}
    config = configs.get(getattr(encoder, "active_adapter", None))
    return str(getattr(config, "method", "none"))


def write_readme(
    readme: Path,
    path: Path,
    spec: DataSpec,
    result: ExportResult,
    task: str,
    multi_label: bool,
    metadata: dict[str, object],
) -> None:
    """``export/README.md``: what the file takes and gives, and how to run it."""
    patch = int(json.loads(read_metadata(path)["patch_size"]))
    window = result.checked_sizes[0][0]
    c = spec.num_bands
    if result.any_size:
        sizes = (
            f"any multiple of {patch} px (the patch size), at least "
            f"{(2 if task == 'segmentation' else 1) * patch} px, height and width independent; "
            f"trained at {window} x {window} px. Other sizes resample the positional embedding "
            "(bicubic), as timm does; the framework's own maps use the trained size"
        )
    else:
        sizes = f"exactly {window} x {window} px (this encoder's positional embedding is fixed)"
    stats = "\n".join(
        f"| {i} | {b} | {m:g} | {s:g} |"
        for i, (b, m, s) in enumerate(zip(spec.bands, spec.mean_list(), spec.std_list()))
    )
    if task == "classification":
        outputs = (
            f"* `probabilities` float32 `(B, {spec.num_classes})`: "
            + ("one sigmoid per label (a label is predicted at >= "
               f"{metadata.get('threshold', 0.5)})" if multi_label else "softmax over the classes")
            + f"\n* `logits` float32 `(B, {spec.num_classes})`"
        )  # fmt: skip
        use = "probabilities = session.run(['probabilities'], {'image': image})[0]  # (1, K)"
    else:
        outputs = (
            f"* `logits` float32 `(B, {spec.num_classes}, H, W)`: class logits at the input's "
            "size; the class is the argmax over axis 1. Pixels where every band is invalid get "
            "logits too: mask them yourself (predict.py writes 255 there)"
        )
        use = "classes = session.run(['logits'], {'image': image})[0].argmax(axis=1)  # (1, H, W)"
    nodata = "none" if spec.nodata is None else f"{spec.nodata:g}"
    text = f"""# {path.name}: run `{metadata.get("run", "")}` for ONNX Runtime

Exported by DEFLECT {framework_version()} (`scripts/export.py`): task **{task}**, method
**{metadata.get("method")}**, encoder `{metadata.get("encoder")}`, best epoch
{metadata.get("epoch")}. Adapter: {result.merged}.

## Input `image`

float32 `(B, {c}, H, W)`: **the raw image as stored in the files** (no scaling, no
normalisation), the bands in this order:

| channel | band | training mean | training std |
|---|---|---|---|
{stats}

* H and W: {sizes}.
* Invalid pixels: NaN, +-inf and the training no-data value ({nodata}) are invalid inside the
  graph (the no-data value of your file, if another, must be set to NaN first). Cast integer
  files to float32 (values above 2^24 lose precision).
* Reflectance scale: the model expects stored values where reflectance 1.0 is
  {spec.reflectance_scale:g} (`reflectance_scale`). The graph cannot refuse another scale:
  `scripts/predict.py --onnx` checks each scene before running it (band medians that are not
  plausible surface reflectance, about 0..1, at that scale are warned about) and converts a
  scene of another scale with `--reflectance-scale`; check your data the same way.
* A wrong number of bands, or a size outside the above, is refused by ONNX Runtime with an
  `INVALID_ARGUMENT` or shape error: give exactly these {c} bands in this order.

## Outputs

{outputs}

## Running it (numpy and onnxruntime only)

```python
import json
import numpy as np
import onnxruntime as ort

session = ort.InferenceSession("{path.name}")
meta = session.get_modelmeta().custom_metadata_map
bands = json.loads(meta["deflect.bands"])            # {list(spec.bands)}
image = np.zeros((1, {c}, {window}, {window}), np.float32)    # your pixels, as stored, in this band order
{use}
```

Metadata (`deflect.*` keys of the file): `bands`, `band_manifest` (statistics, no-data value,
reflectance scale, sensor), `classes`, `task`, `method`, `encoder`, `framework_version`,
`window`, `stride` (the run's sliding-window stride), `patch_size`, `any_size`, `min_size`,
`merged`.

Whole scenes, with the framework's tiling, band matching and checks:
`python scripts/predict.py --onnx {path} scene.tif --out maps/`.

Checked at export: ONNX Runtime equals PyTorch within {result.max_difference:.2g} (fp32) at
sizes {", ".join(f"{h}x{w}" for h, w in result.checked_sizes)}. Export took
{result.seconds:.1f} s; the file is {result.size_bytes / 1e6:.1f} MB.
"""
    readme.write_text(text)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``deflect.*`` metadata of an exported file, without the prefix (values as stored)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {
        p.key[len(META_PREFIX) :]: p.value
        for p in model.metadata_props
        if p.key.startswith(META_PREFIX)
    }
