"""ONNX export (issue 30): the exported file equals PyTorch, runs without torch, and says plainly
what it takes.

The default suite exports one tiny model once (LoRA on the tiny ViT with UperNet, demo bands,
a no-data value; about 25 s on 2 cores) and checks it every way; every method under both heads
is exported in ``tests/test_tuner_matrix.py`` (slow), and a trained run goes through
``scripts/export.py`` and ``scripts/predict.py --onnx`` in ``test_run_exports_and_maps_a_scene_
like_pytorch`` (slow).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import rasterio
import torch

from deflect.data import DataSpec
from deflect.export.graph import MatrixAdaptiveAvgPool2d
from tests.conftest import (
    DEMO_BANDS,
    REPO,
    SCENE_NODATA,
    TINY,
    demo_pixels,
    run_cli,
    tiny_encoder,
    write_scene,
)

pytest.importorskip("onnxruntime", reason="the export extra: pip install -e '.[export]'")

NODATA = SCENE_NODATA  # what demo_pixels writes
CLASSES = ("bare", "sparse", "moderate", "dense")
WINDOW = 32  # the tiny model's img_size: the traced size


def demo_spec() -> DataSpec:
    """The demo's bands with statistics of the real scene (reflectance x10000), a no-data value."""
    from datasets.demo import demo_scene

    scene = demo_scene().astype(np.float64)
    mean = {b: float(scene[i].mean()) for i, b in enumerate(DEMO_BANDS)}
    std = {b: float(scene[i].std()) for i, b in enumerate(DEMO_BANDS)}
    return DataSpec(bands=tuple(DEMO_BANDS), mean=mean, std=std, reflectance_scale=10000,
                    nodata=NODATA, classes=CLASSES)  # fmt: skip


def tiny_lora_segmentor(spec: DataSpec) -> torch.nn.Module:
    """The tiny ViT with a LoRA adapter whose B is non-zero (so merging matters), UperNet-16."""
    from deflect import LoraConfig, get_deflect_model
    from segmentors.segmentor import Segmentor

    encoder = get_deflect_model(tiny_encoder(data=spec), LoraConfig(rank=4))
    torch.manual_seed(3)
    model = Segmentor(encoder, len(CLASSES), channels=16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
        for m in model.modules():  # BatchNorm statistics that are not the identity
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def normalised(spec: DataSpec, raw: np.ndarray) -> torch.Tensor:
    """What the data pipeline feeds the PyTorch model, written out here: invalid -> NaN, then
    (x - mean) / std per band."""
    x = np.where(np.isfinite(raw) & (raw != NODATA), raw, np.nan).astype(np.float32)
    mean = np.array(spec.mean_list(), np.float32).reshape(1, -1, 1, 1)
    std = np.array(spec.std_list(), np.float32).reshape(1, -1, 1, 1)
    return torch.from_numpy((x - mean) / std)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(model, spec, path, result)``: the tiny LoRA segmentor exported once."""
    from deflect.export import export_model

    spec = demo_spec()
    model = tiny_lora_segmentor(spec)
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    # Checked here at the traced size only: the tests check the other sizes themselves.
    result = export_model(model, spec, path, WINDOW, metadata={"method": "lora"}, check_sizes=())
    return model, spec, path, result


def batch(top: int, height: int, width: int) -> np.ndarray:
    """Three demo images of ``height`` x ``width`` (one of them with a no-data block)."""
    return np.stack([demo_pixels(height, width, top + 40 * i, 20 * i) for i in range(3)])


def test_onnx_equals_pytorch_on_raw_input_at_the_traced_size_and_two_others(exported):
    """The file takes the raw image: at the trained size it equals the framework's model fed
    by the data pipeline's normalisation; at two other sizes (one not square, neither traced,
    batch 3 where 2 was traced) it equals the PyTorch model with its positional embedding
    resampled, the reference the export is built from."""
    from deflect.export.graph import allow_any_size
    from deflect.export.runtime import open_session

    model, spec, path, result = exported
    session = open_session(path)
    raw = batch(0, WINDOW, WINDOW)
    (got,) = session.run(None, {"image": raw})
    with torch.no_grad():
        expected = model(normalised(spec, raw)).numpy()
    assert got.shape == (3, len(CLASSES), WINDOW, WINDOW)
    assert np.abs(got - expected).max() < 1e-4
    reference = copy.deepcopy(model)
    assert allow_any_size(reference) and result.any_size
    for height, width in ((48, 64), (16, 24)):
        raw = batch(5, height, width)
        (got,) = session.run(None, {"image": raw})
        with torch.no_grad():
            expected = reference(normalised(spec, raw)).numpy()
        assert got.shape == (3, len(CLASSES), height, width)
        difference = np.abs(got - expected).max()
        assert difference < 1e-4, (height, width, difference)
    assert result.max_difference < 1e-4 and result.checked_sizes == ((WINDOW, WINDOW),)


def test_lora_is_merged_into_the_weights(exported):
    """No LoRA tensor is left in the file, and the graph has as many matrix products as the
    plain ViT's linear layers and UperNet's need: the adapter is folded, not run beside."""
    import onnx

    model, _, path, result = exported
    graph = onnx.load(str(path)).graph
    assert "merged" in result.merged
    assert not [i.name for i in graph.initializer if "lora" in i.name.lower()]
    counts = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    linears = sum(isinstance(m, torch.nn.Linear) for n, m in model.named_modules()
                  if "lora_" not in n)  # fmt: skip
    # Each Linear is one MatMul (+Add) or one Gemm; attention adds 2 per block; the pooling
    # matrices and UperNet add a few. LoRA run beside would add 2 per adapted Linear (16 here).
    products = counts.get("MatMul", 0) + counts.get("Gemm", 0)
    assert linears <= products < linears + 8 + 2 * 4 + 8, counts


def test_the_metadata_describe_the_bands_classes_task_and_version(exported):
    from deflect.export import read_metadata
    from deflect.export.onnx import framework_version

    _, spec, path, _ = exported
    meta = read_metadata(path)
    assert DataSpec.from_dict(json.loads(meta["band_manifest"])) == spec
    assert json.loads(meta["bands"]) == DEMO_BANDS
    assert json.loads(meta["classes"]) == list(CLASSES)
    assert meta["task"] == "segmentation" and meta["method"] == "lora"
    assert meta["framework_version"] == framework_version() != ""
    assert json.loads(meta["window"]) == WINDOW and json.loads(meta["patch_size"]) == 8


def test_the_file_runs_with_onnxruntime_and_numpy_and_no_torch(exported, tmp_path):
    """A process where ``import torch`` fails gives the same logits as PyTorch."""
    model, spec, path, _ = exported
    raw = batch(0, 40, 48)
    np.save(tmp_path / "raw.npy", raw)
    from deflect.export.graph import allow_any_size

    reference = copy.deepcopy(model)
    allow_any_size(reference)
    with torch.no_grad():
        np.save(tmp_path / "expected.npy", reference(normalised(spec, raw)).numpy())
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # import torch now raises ImportError
        import json
        import numpy as np
        import onnxruntime as ort
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch could be imported")
        session = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        assert json.loads(meta["deflect.bands"]) == {DEMO_BANDS!r}
        logits = session.run(["logits"], {{"image": np.load({str(tmp_path / "raw.npy")!r})}})[0]
        difference = np.abs(logits - np.load({str(tmp_path / "expected.npy")!r})).max()
        print("max difference", difference)
        assert difference < 1e-4
        assert "torch" not in [m.split(".")[0] for m, v in sys.modules.items() if v is not None]
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max difference" in proc.stdout


def test_a_wrong_band_count_or_size_is_refused_naming_what_the_file_takes(exported):
    from deflect.export.runtime import OnnxModel

    _, _, path, _ = exported
    model = OnnxModel(path, threads=1)
    with pytest.raises(ValueError, match=r"takes 4 bands \['B2', 'B3', 'B4', 'B8'\], got 3"):
        model(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="cannot take 30 x 32 px.*multiples of 8 px"):
        model(torch.zeros(1, 4, 30, 32))
    with pytest.raises(ValueError, match="at least 16 px"):
        model(torch.zeros(1, 4, 8, 32))
    assert model(torch.zeros(2, 4, 24, 40)).shape == (2, len(CLASSES), 24, 40)
    assert model(torch.zeros(1, 4, 16, 16)).shape == (1, len(CLASSES), 16, 16)  # batch 1, 2x2


def test_a_scene_mapped_with_onnx_runtime_equals_the_pytorch_map(exported, tmp_path):
    """The same tiler over a demo scene (NaN, no-data, an edge not on the tile grid): the
    ONNX Runtime map equals the PyTorch one on at least 99.9 % of the pixels (here: all), and the
    averaged probabilities within 1e-4."""
    from deflect import predict
    from deflect.export.runtime import load_onnx_predictor

    model, spec, path, _ = exported
    image = demo_pixels(75, 53, 100, 60)
    scene = write_scene(tmp_path / "scene.tif", image)
    torch_predictor = predict.Predictor(model, spec, WINDOW, WINDOW // 2, torch.device("cpu"))
    onnx_predictor = load_onnx_predictor(path, threads=1)
    assert (onnx_predictor.window, onnx_predictor.stride) == (WINDOW, WINDOW // 2)
    out = {}
    for name, predictor in (("torch", torch_predictor), ("onnx", onnx_predictor)):
        written = predict.predict_scene(predictor, scene, tmp_path / name, batch_size=3,
                                        block=32, probabilities=True, progress=False)  # fmt: skip
        with rasterio.open(written.prediction) as a, rasterio.open(written.probabilities) as b:
            out[name] = a.read(1), b.read()
    same = (out["torch"][0] == out["onnx"][0]).mean()
    assert same >= 0.999, same
    # the pixels where every band is invalid (NaN block, no-data corner and pair), as PyTorch's
    assert (out["onnx"][0] == 255).sum() == (out["torch"][0] == 255).sum() == 18 + 12 + 2
    np.testing.assert_allclose(out["onnx"][1], out["torch"][1], atol=1e-4, equal_nan=True)
    # The scene stored as float reflectance: --reflectance-scale 1 converts it for the file too.
    valid = np.isfinite(image) & (image != NODATA)
    write_scene(scene, np.where(valid, image / 10000, image).astype(np.float32))
    written = predict.predict_scene(onnx_predictor, scene, tmp_path / "scaled", batch_size=3,
                                    block=32, progress=False, probabilities=True,
                                    reflectance_scale=1.0)  # fmt: skip
    with rasterio.open(written.prediction) as a, rasterio.open(written.probabilities) as b:
        assert (a.read(1) == out["torch"][0]).mean() >= 0.999
        np.testing.assert_allclose(b.read(), out["torch"][1], atol=1e-4, equal_nan=True)


def test_the_matrix_pooling_equals_adaptive_average_pooling_at_every_size():
    """The exporter writes ``AdaptiveAvgPool2d`` as a pooling with the traced size's kernel
    (wrong at other sizes); its replacement in the exported graph is the same function."""
    torch.manual_seed(0)
    for bins in (1, 2, 3, 6):
        for h, w in ((1, 1), (2, 2), (3, 4), (7, 5), (12, 16), (13, 6)):
            x = torch.randn(2, 3, h, w)
            torch.testing.assert_close(MatrixAdaptiveAvgPool2d(bins)(x),
                                       torch.nn.AdaptiveAvgPool2d(bins)(x),
                                       atol=1e-6, rtol=1e-6)  # fmt: skip


# ----------------------------------------------------------------------------- refusals


def test_an_unfinished_run_is_refused_with_the_way_to_finish_it(tmp_path):
    from deflect.export import ExportError, export_run

    (tmp_path / "config.yaml").write_text("img_size: 32\n")
    with pytest.raises(ExportError, match=r"unfinished \(no metrics.json\).*resume=true"):
        export_run(tmp_path)


def test_a_missing_extra_is_refused_with_the_install_command(monkeypatch):
    import builtins

    from deflect.export import ExportError
    from deflect.export.onnx import require_export_extra

    real = builtins.__import__

    def without_onnxscript(name, *args, **kwargs):
        if name == "onnxscript":
            raise ImportError("No module named 'onnxscript'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxscript)
    with pytest.raises(ExportError, match=r"needs onnxscript.*pip install -e '\.\[export\]'"):
        require_export_extra()


@torch.library.custom_op("deflect_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    """An operator with no ONNX translation."""
    return x.clone()


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Mysterious(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mystery(x) + 1


def test_an_operator_the_exporter_cannot_translate_is_named_with_its_module(tmp_path):
    from deflect.export import ExportError
    from deflect.export.onnx import to_onnx, trace

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1), Mysterious()).eval()
    program = trace(model, torch.randn(2, 2, 8, 8), any_size=True, patch=1, min_patches=1)
    with pytest.raises(ExportError) as caught:
        to_onnx(program, torch.randn(2, 2, 8, 8), ["out"], tmp_path / "m.onnx", {})
    message = str(caught.value)
    assert "deflect_test::mystery" in message
    assert "1 (Mysterious)" in message  # the module's path in the Sequential, and its class
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------- a run, end to end


@pytest.mark.slow
def test_run_exports_and_maps_a_scene_like_pytorch(demo_root, tmp_path):
    """A trained DEFLECT run (the tiny demo with a no-data value): ``scripts/export.py`` writes
    the file and its README; ``predict.py --onnx`` maps a demo scene as ``predict.py`` does (at
    least 99.9 % of pixels equal) and warns about a scene at another reflectance scale as it does;
    the README's example runs without torch."""
    run_cli([*TINY, f"dataset.root={demo_root}", "epochs=1", "max_steps_per_epoch=1",
             f"+dataset.nodata={NODATA}", "num_vis=0", "save_predictions=false"], tmp_path)  # fmt: skip
    (run,) = (tmp_path / "work_dirs").iterdir()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), str(run)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    onnx_file = run / "export" / "model.onnx"
    readme = (run / "export" / "README.md").read_text()
    assert "acts on activations" in proc.stdout  # DEFLECT keeps its modules
    from deflect.export import read_metadata

    meta = read_metadata(onnx_file)
    assert (meta["method"], meta["task"], meta["encoder"]) == (
        "deflect",
        "segmentation",
        "tiny_vit",
    )
    assert json.loads(meta["stride"]) == 16 and json.loads(meta["nodata"]) == NODATA
    assert "| 0 | B2 |" in readme and "| 3 | B8 |" in readme
    assert "10000" in readme and "predict.py --onnx" in readme
    image = demo_pixels(130, 75)
    scene = write_scene(tmp_path / "scene.tif", image)
    maps = {}
    for name, head in (("torch", [str(run)]), ("onnx", ["--onnx", str(onnx_file)])):
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "predict.py"), *head, str(scene), "--out",
             str(tmp_path / name), "--no-progress"], capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        with rasterio.open(tmp_path / name / "scene_pred.tif") as src:
            maps[name] = src.read(1)
    same = (maps["torch"] == maps["onnx"]).mean()
    assert same >= 0.999, f"{(maps['torch'] != maps['onnx']).sum()} pixels differ"
    valid = np.isfinite(image) & (image != NODATA)
    scaled = write_scene(tmp_path / "scaled.tif", np.where(valid, image / 10000, image))
    for head in ([str(run)], ["--onnx", str(onnx_file)]):
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "predict.py"), *head, str(scaled), "--out",
             str(tmp_path / "scaled"), "--no-progress"], capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        # the framework's warning, logged (warnings go to the log) by both
        assert "looks like another reflectance scale" in proc.stdout + proc.stderr, proc.stdout
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    script = "import sys\nsys.modules['torch'] = None\n" + example + "print(sorted(meta))\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=onnx_file.parent,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "deflect.band_manifest" in proc.stdout
