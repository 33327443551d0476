"""scripts/explain.py (deflect.engine.explain): the deflection statistics against numpy on the
same tensors, the occlusions, and the importance ranking of a planted task (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deflect import DeflectConfig
from deflect.engine.explain import BandOcclusion, DeflectionRecorder, record_block_inputs
from tests.test_deflect_oracles import INDICES, adapt, attention, batch, heads, layer_norm, linear


def test_deflection_statistics_equal_numpy_on_the_same_tensors():
    """Angle between δ_uAtt and δ_RGB, their norm ratio, the added update over ‖x‖ (hard
    deflection: ‖δ_RGB‖/‖x‖) and the spectral share of the logits, for block 0, recomputed in
    float64 numpy from the block's input and the spectral stream."""
    adapted, data = adapt(DeflectConfig(indices=INDICES, target_blocks=[0], deflection="hard"))
    adapted.eval()
    x = batch(data)
    vit = adapted.base_model
    captured = {}

    def keep_input(module, args):  # returns None: the block's input is left as it is
        captured.setdefault("x", args[0].detach().double().numpy())

    hook = vit.blocks[0].register_forward_pre_hook(keep_input)
    recorder = DeflectionRecorder(adapted)
    hooks = record_block_inputs(adapted, recorder)
    with torch.no_grad(), recorder:
        adapted.forward_features(x)
    hook.remove()
    for h in hooks:
        h.remove()
    (got,) = recorder.summary()
    block = vit.blocks[0]
    # The spectral stream, as the model computes it from the input and x_P:
    upe = vit.patch_embed.deflect_upe["default"]
    with torch.no_grad():
        tokens = upe(x)
        spectral = upe.finish(tokens, torch.from_numpy(captured["x"]).float(), 1)
    spectral = spectral.double().numpy()
    base, uatt = block.base_layer, block.deflect_uatt["default"]
    u = layer_norm(captured["x"], base.norm1)
    h = base.attn.num_heads
    q_p, k_p, v_p = heads(linear(u, base.attn.qkv), h)
    q_a, k_a, v_a = heads(linear(linear(spectral, uatt.V), uatt.U), h)
    tau = 1 / np.sqrt(q_p.shape[-1])
    d_rgb = linear(attention(q_p, k_p, v_p, tau), base.attn.proj)[:, 1:]
    d_uatt = linear(attention(q_p + q_a, k_p + k_a, v_p + v_a, tau), base.attn.proj)[:, 1:]
    cos = (
        (d_uatt * d_rgb).sum(-1) / np.linalg.norm(d_uatt, axis=-1) / np.linalg.norm(d_rgb, axis=-1)
    )
    angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    ratio = np.linalg.norm(d_uatt, axis=-1) / np.linalg.norm(d_rgb, axis=-1)
    added = np.linalg.norm(d_rgb, axis=-1) / np.linalg.norm(captured["x"][:, 1:], axis=-1)
    for key, values in (("angle", angle), ("ratio", ratio), ("added", added)):
        np.testing.assert_allclose(got[key], np.quantile(values, [0.1, 0.5, 0.9]), rtol=2e-3,
                                   err_msg=key)  # fmt: skip
    rgb = np.abs(q_p @ k_p.transpose(0, 1, 3, 2))[:, :, 1:]
    spec = np.abs(q_p @ k_a.transpose(0, 1, 3, 2) + q_a @ k_p.transpose(0, 1, 3, 2)
                  + q_a @ k_a.transpose(0, 1, 3, 2))[:, :, 1:]  # fmt: skip
    share = spec.sum(axis=(1, 2, 3)) / (rgb.sum(axis=(1, 2, 3)) + spec.sum(axis=(1, 2, 3)))
    assert got["share"] == pytest.approx(share.mean(), rel=1e-3)
    assert 10 < got["angle"][1] < 170  # non-zero adapter weights: a real deflection


def test_band_occlusion_puts_the_training_mean_where_the_band_is_valid():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return x

    x = torch.randn(2, 4, 8, 8)
    x[0, 1, 0, 0] = float("nan")
    BandOcclusion(Probe(), 1)(x)
    (got,) = seen
    assert torch.isnan(got[0, 1, 0, 0]) and (got[:, 1].nan_to_num(0.0) == 0).all()
    assert torch.equal(got[:, [0, 2, 3]], x[:, [0, 2, 3]]) and not torch.isnan(x[0, 1, 1, 1])


@pytest.mark.slow
def test_a_planted_nir_task_ranks_nir_first_and_an_irrelevant_band_near_zero(tmp_path):
    """Two classes identical in every band but NIR (B8A, and so NDVI): a trained DEFLECT run's
    occlusion ranks B8A or NDVI first, and the blue band B2 costs (almost) nothing."""
    from deflect.engine.explain import explain_run
    from tests.conftest import TINY, run_cli
    from tests.test_spectral_study import study

    s = study()
    rng = np.random.default_rng(0)
    root = tmp_path / "nir"
    for split, n in (("train", 24), ("val", 4), ("test", 4)):
        for i in range(n):
            mask = s.class_map(rng, 32, 4) % 2  # 4 regions, 2 classes
            means = np.array([[0.06, 0.09, 0.08, 0.15, 0.22, 0.25, 0.15],
                              [0.06, 0.09, 0.08, 0.15, 0.42, 0.25, 0.15]])  # fmt: skip
            image = means[mask].transpose(2, 0, 1) + rng.normal(0, 0.01, (7, 32, 32))
            s.write_geotiff(root / split / f"t{i}_image.tif", image.astype(np.float32), s.BANDS)
            s.write_geotiff(root / split / f"t{i}_mask.tif", mask.astype(np.uint8))
    work_dir = tmp_path / "run"
    run_cli([*TINY, "dataset=folder", f"dataset.root={root}", "dataset.classes=[low,high]",
             "dataset.ignore_index=255", "epochs=20", "max_steps_per_epoch=null",
             "optimizer.lr=1e-3", "encoder_lr_scale=10", f"work_dir={work_dir}",
             "save_predictions=false", "num_vis=0"], tmp_path)  # fmt: skip
    report = explain_run(work_dir, "test", "cpu")
    assert report["baseline"]["mIoU"] > 0.7, report["importance"][:5]
    first = report["importance"][0]
    assert first["input"] in ("B8A", "NDVI"), report["importance"][:4]
    blue = next(r for r in report["importance"] if r["input"] == "B2" and r["kind"] == "band")
    assert abs(blue["drop"]) < 0.02
    assert json.loads((work_dir / "diagnostics" / "explain.json").read_text())["deflection"]


def test_upe_features_are_occluded_with_their_training_mean():
    """The training means of UPE's per-pixel features (numpy over the valid pixels), and an
    occluded feature takes that value at its valid pixels inside UPE."""
    from deflect.engine.explain import Occlusion, deflect_upe, occluded, upe_training_means
    from deflect.tuners.deflect.upe import pixel_set_statistics

    adapted, data = adapt(DeflectConfig(indices=INDICES))
    x = batch(data)
    samples = [{"image": x[i]} for i in range(len(x))]
    means = upe_training_means(adapted, samples)
    upe = deflect_upe(adapted)
    features, valid = upe.pixel_features(x)
    expected = [
        features[:, f][valid[:, f]].double().mean().item() for f in range(features.shape[1])
    ]
    np.testing.assert_allclose(means["features"], expected, rtol=1e-6)
    index = upe.feature_names().index("NDVI")
    replaced = features.clone()
    replaced[:, index] = torch.where(valid[:, index], means["features"][index], 0.0)
    with torch.no_grad():
        stats = pixel_set_statistics(replaced, upe.patch_size, upe.stats, valid)
        expected_tokens = upe.spectral_map(upe.projection(upe.norm(stats)))
        with occluded(adapted, Occlusion("feature", "NDVI", index), means) as model:
            got = upe(x)
        assert upe.occlude_features == {} and model is adapted  # restored afterwards
        plain = upe(x)
    torch.testing.assert_close(got, expected_tokens)
    assert not torch.allclose(plain, got)  # NDVI mattered to the tokens


def test_the_console_says_how_many_inputs_it_shows_and_tells_a_band_from_its_feature():
    """21 inputs: the table shows 12 and says so; band B8, UPE's raw-band feature B8 and the
    statistic q10 are named apart, as on importance.png."""
    from deflect.engine.explain import importance_table, input_label

    rows = [{"input": "B8", "kind": "band", "drop": 0.05},
            {"input": "B8", "kind": "feature", "drop": 0.04},
            {"input": "q10", "kind": "statistic", "drop": 0.03}]  # fmt: skip
    rows += [{"input": f"I{i}", "kind": "feature", "drop": 0.0} for i in range(18)]
    lines = importance_table({"importance": rows}).splitlines()
    assert lines[0] == "  top 12 of 21 inputs; all in diagnostics/importance.csv"
    assert len(lines) == 13
    assert lines[1].split() == ["B8", "band", "drop", "+5.00"]
    assert lines[2].split() == ["B8", "UPE", "feature", "drop", "+4.00"]
    assert lines[3].split() == ["q10", "UPE", "statistic", "drop", "+3.00"]
    assert [input_label(r) for r in rows[:3]] == ["B8 (band)", "UPE: B8", "UPE stat: q10"]
    assert importance_table({"importance": rows[:3]}).splitlines()[0] == "  all 3 inputs"
