"""The invariant matrix: every registered tuner, on the framework's encoder and on a bare timm ViT.

A new method adds one row to ``ROWS`` (its config and a hand count of what it trains); a
registered method without a row fails ``test_every_registered_method_has_a_row``.

For every row: only the intended parameters train and each gets a gradient; frozen weights stay
bit-identical after optimiser steps; the outputs equal the base model's at initialisation (for a
band strategy: the base model's on the input that strategy's kernel amounts to); save -> load onto
a fresh base gives identical outputs; ``disable_adapter()`` gives the base outputs; ``unload()``
gives back the base module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deflect import (
    BitFitConfig,
    DeflectConfig,
    DeflectModel,
    FrozenConfig,
    FullConfig,
    LoraConfig,
    NormTuningConfig,
    ScaledLoraConfig,
    SpectralKernelConfig,
    TunerConfig,
    get_deflect_model,
    registered_methods,
)
from deflect.encoders import Encoder
from tests.conftest import S2_BANDS, s2_spec, tiny_encoder, tiny_timm_vit

D, DEPTH, HEADS, PATCH = 32, 4, 4, 8  # the tiny ViT
RGB = ["B4", "B3", "B2"]
C = len(S2_BANDS)


def rgb_of(x: torch.Tensor) -> torch.Tensor:
    return x[:, [S2_BANDS.index(b) for b in RGB]]


def repeat_mix(x: torch.Tensor) -> torch.Tensor:
    """What ``repeat``'s kernel amounts to, by hand: each band goes to its own pretrained kernel
    slice (B4, B3, B2) or, for the other bands in order, to B4, B3, B2, B4, ... in turn; every
    slice sees (3 / C) x the sum of its bands."""
    order = [b for b in S2_BANDS if b not in RGB]
    groups = {b: [b] + order[RGB.index(b) :: 3] for b in RGB}
    assert sorted(sum(groups.values(), [])) == sorted(S2_BANDS)
    return torch.stack(
        [sum(x[:, S2_BANDS.index(b)] for b in groups[r]) * 3 / C for r in RGB], dim=1
    )


def zero_extra(x: torch.Tensor) -> torch.Tensor:
    """The input with every band but the RGB ones zeroed (``rgb_random``'s random slices then
    add nothing)."""
    keep = torch.zeros(C, dtype=torch.bool)
    keep[[S2_BANDS.index(b) for b in RGB]] = True
    return x * keep[None, :, None, None]


def same(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class Row:
    """One method: its config, the trainable count by hand, which names may train, and what
    the adapted model equals at initialisation: ``init_pair = (f, g)`` says adapted(f(x)) =
    base(g(x)) for all-band ``x`` (``g`` gives three RGB channels)."""

    config: Callable[[], TunerConfig]
    count: Callable[[bool], int]  # final_norm -> number of trainable parameters
    owns: Callable[[str], bool]  # parameter name -> whether the method trains it
    all_bands: bool = False  # a bare ViT adapted this way takes every band
    init_pair: tuple[Callable, Callable] = (same, rgb_of)


def deflect_count(final_norm: bool) -> int:
    """Spec section 4 for 11 bands + the 11 default indices, 8 statistics, r = 8, h = 8."""
    features, stats, h, r, blocks = 22, 8, 8, 8, 3
    return features * stats * D + D + 2 * D * h + h + D + 4 * D * r * blocks


def bitfit_count(final_norm: bool) -> int:
    """Per block: norm1 (D), qkv (3D), proj (D), norm2 (D), fc1 (4D), fc2 (D); the patch
    embedding's conv (D); the final norm (D) where the encoder keeps it."""
    return DEPTH * (D + 3 * D + D + D + 4 * D + D) + D + (D if final_norm else 0)


def norm_count(final_norm: bool) -> int:
    """Two LayerNorms (weight and bias) per block, and the final norm where kept."""
    return DEPTH * 2 * 2 * D + (2 * D if final_norm else 0)


def lora_count(rank: int) -> int:
    """r (in + out) per Linear: qkv r(D + 3D), proj r(2D), fc1 r(D + 4D), fc2 r(4D + D)."""
    return DEPTH * rank * (4 * D + 2 * D + 5 * D + 5 * D)


def slr_scales() -> int:
    """s_in and s_out per Linear: the same (in + out) sums, once."""
    return lora_count(1)


def full_count(final_norm: bool) -> int:
    """Everything of the tiny ViT, counted by hand: patch conv, CLS, positions, blocks, final
    norm where kept."""
    block = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D)
    tokens = D + (1 + (32 // PATCH) ** 2) * D
    return 3 * PATCH * PATCH * D + D + tokens + DEPTH * block + (2 * D if final_norm else 0)


KERNEL = D * C * PATCH * PATCH  # a band strategy's kernel over every band
PRETRAINED_KERNEL = D * 3 * PATCH * PATCH


def lora_owns(n: str) -> bool:
    return ".lora_" in n


ROWS: dict[str, Row] = {
    "frozen": Row(FrozenConfig, lambda norm: 0, lambda n: False),
    "full": Row(FullConfig, full_count, lambda n: True),
    "bitfit": Row(BitFitConfig, bitfit_count, lambda n: n.endswith("bias")),
    "norm_tuning": Row(NormTuningConfig, norm_count, lambda n: n.split(".")[-2].startswith("norm")),
    "lora": Row(LoraConfig, lambda norm: lora_count(16), lora_owns),
    "scaled_lora": Row(ScaledLoraConfig, lambda norm: lora_count(16) + slr_scales(), lora_owns),
    "lora_norms_regex": Row(
        lambda: LoraConfig(rank=4, target_modules=r"blocks\.[13]\.attn\.qkv", train_norms=True),
        lambda norm: 2 * 4 * (D + 3 * D) + norm_count(norm),
        lambda n: ".lora_" in n or n.split(".")[-2].startswith("norm"),
    ),  # fmt: skip
    "bitfit_repeat": Row(
        lambda: BitFitConfig(band_strategy="repeat"),
        bitfit_count,
        lambda n: n.endswith("bias"),
        all_bands=True,
        init_pair=(same, repeat_mix),
    ),  # fmt: skip
    "frozen_repeat": Row(
        lambda: FrozenConfig(band_strategy="repeat"),
        lambda norm: 0,
        lambda n: False,
        all_bands=True,
        init_pair=(same, repeat_mix),
    ),  # fmt: skip
    "lora_rgb_random": Row(
        lambda: LoraConfig(rank=2, band_strategy="rgb_random"),
        lambda norm: lora_count(2) + KERNEL,
        lambda n: ".lora_" in n or ".bands_kernel." in n,
        all_bands=True,
        init_pair=(zero_extra, rgb_of),
    ),  # fmt: skip
    "full_repeat": Row(
        lambda: FullConfig(band_strategy="repeat"),
        lambda norm: full_count(norm) - PRETRAINED_KERNEL + KERNEL,
        lambda n: not n.endswith("patch_embed.base_layer.proj.weight"),
        all_bands=True,
        init_pair=(same, repeat_mix),
    ),  # fmt: skip
    "spectral_kernel": Row(
        SpectralKernelConfig,
        lambda norm: KERNEL,
        lambda n: ".bands_kernel." in n,
        all_bands=True,
        init_pair=(zero_extra, rgb_of),
    ),  # fmt: skip
    "deflect": Row(DeflectConfig, deflect_count, lambda n: ".deflect_" in n, all_bands=True),
    "deflect_soft": Row(
        lambda: DeflectConfig(deflection="soft", cls_token="learned"),
        lambda norm: deflect_count(norm) + D,
        lambda n: ".deflect_" in n,
        all_bands=True,
    ),  # fmt: skip
    "deflect_hard": Row(
        lambda: DeflectConfig(deflection="hard", target_blocks=[0, 2]),
        lambda norm: deflect_count(norm) - 4 * D * 8,
        lambda n: ".deflect_" in n,
        all_bands=True,
    ),  # fmt: skip
    "deflect_none": Row(
        lambda: DeflectConfig(deflection="none", target_blocks=[1, 3]),
        lambda norm: deflect_count(norm) - 4 * D * 8,
        lambda n: ".deflect_" in n,
        all_bands=True,
    ),  # fmt: skip
}
KINDS = ["encoder", "timm"]


def test_every_registered_method_has_a_row():
    assert set(registered_methods()) <= set(ROWS)


def build_base(kind: str) -> torch.nn.Module:
    return tiny_encoder() if kind == "encoder" else tiny_timm_vit()


def adapt(kind: str, method: str, base: torch.nn.Module | None = None) -> DeflectModel:
    base = build_base(kind) if base is None else base
    data = None if kind == "encoder" else s2_spec()
    torch.manual_seed(5)
    return get_deflect_model(base, ROWS[method].config(), data=data)


def inputs(kind: str, method: str) -> torch.Tensor:
    torch.manual_seed(2)
    x = torch.randn(2, len(S2_BANDS), 32, 32)
    if kind == "timm" and not ROWS[method].all_bands:  # a bare ViT takes its RGB only
        x = rgb_of(x)
    return x


def flat(out: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Everything a model returns, flattened (encoder: all maps; timm: the pooled token)."""
    return torch.cat([o.flatten() for o in out]) if isinstance(out, list) else out.flatten()


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs on ``x``, without autograd, flattened."""
    with torch.no_grad():
        return flat(model(x))


def base_input(kind: str, x: torch.Tensor) -> torch.Tensor:
    """What the unadapted base takes for the same data (a bare ViT: the RGB bands)."""
    if kind == "timm" and x.shape[1] == len(S2_BANDS):
        return rgb_of(x)
    return x


def as_base_input(kind: str, rgb: torch.Tensor) -> torch.Tensor:
    """Three RGB channels as the base takes them (the framework encoder: inside all bands)."""
    if kind == "timm":
        return rgb
    x = torch.zeros(rgb.shape[0], C, *rgb.shape[2:])
    x[:, [S2_BANDS.index(b) for b in RGB]] = rgb
    return x


def train(model: DeflectModel, x: torch.Tensor, steps: int = 3) -> None:
    """A few Adam steps (no weight decay: a parameter moves only with a gradient)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2) if params else None
    for _ in range(steps):
        loss = (flat(model(x)) - 0.3).square().mean() + sum(model.auxiliary_losses().values())
        if optimizer is None:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def trained(kind: str, method: str):
    """``(base, an untouched copy of it, the adapted and trained model, the inputs)``."""
    base = build_base(kind)
    reference = copy.deepcopy(base)
    model = adapt(kind, method, base)
    perturb_zero_inits(model)
    x = inputs(kind, method)
    train(model, x)
    return base, reference, model, x


def perturb_zero_inits(model: DeflectModel) -> None:
    """U_ℓ starts at zero (identity); give it values so every adapter parameter gets a signal."""
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("deflect_uatt.default.U.weight", "lora_B.default.weight")):
                p.normal_(0, 0.3)


CASES = [(kind, method) for kind in KINDS for method in ROWS]
IDS = [f"{k}-{m}" for k, m in CASES]


@pytest.mark.parametrize(("kind", "method"), CASES, ids=IDS)
def test_only_intended_parameters_train_and_each_gets_a_gradient(kind, method):
    model = adapt(kind, method)
    row = ROWS[method]
    trainable = {n: p for n, p in model.base_model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(model.tuner.adapter_parameter_names("default"))
    assert all(row.owns(n) for n in trainable), [n for n in trainable if not row.owns(n)]
    final_norm = kind == "timm"  # the framework encoder prunes the unused final norm
    expected = row.count(final_norm)
    assert sum(p.numel() for p in trainable.values()) == expected
    assert model.num_adapter_parameters() == expected
    assert model.get_nb_trainable_parameters()[0] == expected
    if not trainable:
        return
    perturb_zero_inits(model)
    model.train()
    out = flat(model(inputs(kind, method)))
    ((out - 0.3).square().mean() + sum(model.auxiliary_losses().values())).backward()
    for name, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize(("kind", "method"), CASES, ids=IDS)
def test_frozen_weights_bit_identical_and_trainable_ones_move(kind, method):
    model = adapt(kind, method)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb_zero_inits(model)
    perturbed = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, inputs(kind, method))
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, perturbed[name]), f"{name} did not move"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


@pytest.mark.parametrize(("kind", "method"), CASES, ids=IDS)
def test_identity_at_initialisation(kind, method):
    base = build_base(kind)
    reference = copy.deepcopy(base)
    model = adapt(kind, method, base)
    torch.manual_seed(2)
    x = torch.randn(2, C, 32, 32)
    adapted_input, rgb_input = ROWS[method].init_pair
    x_adapted = adapted_input(x)
    if kind == "timm" and not ROWS[method].all_bands:
        x_adapted = rgb_of(x_adapted)
    torch.testing.assert_close(
        outputs(model, x_adapted),
        outputs(reference, as_base_input(kind, rgb_input(x))),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize(("kind", "method"), CASES, ids=IDS)
def test_save_load_onto_a_fresh_base_gives_identical_outputs(kind, method, tmp_path):
    _, _, model, x = trained(kind, method)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "default" / "deflect_model.safetensors"))
    assert tensors.keys() == model.adapter_state_dict().keys()
    buffers = dict(model.base_model.named_buffers())
    saved_buffers = sum(buffers[n].numel() for n in model.tuner.adapter_tensor_names("default")
                        if n in buffers)  # fmt: skip
    assert sum(t.numel() for t in tensors.values()) == (
        model.num_adapter_parameters() + saved_buffers
    )
    tuned = outputs(model, x)
    loaded = DeflectModel.from_pretrained(build_base(kind), tmp_path)
    assert torch.equal(outputs(loaded, x), tuned)
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize(("kind", "method"), CASES, ids=IDS)
def test_disable_adapter_gives_the_base_outputs(kind, method):
    _, reference, model, x = trained(kind, method)
    tuned = outputs(model, x)
    expected = outputs(reference, base_input(kind, x))
    if method != "frozen":
        assert not torch.allclose(tuned, expected, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(outputs(model, x), expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(outputs(model, x), tuned)  # and the tuned model comes back


@pytest.mark.parametrize(("kind", "method"), CASES, ids=IDS)
def test_unload_gives_back_the_base_module(kind, method):
    base, reference, model, x = trained(kind, method)
    restored = model.unload()
    assert restored is base
    assert [type(m) for m in restored.modules()] == [type(m) for m in reference.modules()]
    state, expected = restored.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    torch.testing.assert_close(
        outputs(restored, base_input(kind, x)), outputs(reference, base_input(kind, x)),
        atol=0, rtol=0,
    )  # fmt: skip
    if isinstance(restored, Encoder):
        assert not any(p.requires_grad for p in restored.parameters())


def saved_bytes_and_gradients(model: DeflectModel, x: torch.Tensor):
    """One training forward and backward: the bytes autograd stores for the backward (counted
    by a pack hook; a checkpointed region stores only its inputs), the outputs, the auxiliary
    losses and each trainable parameter's gradient."""
    model.train()
    stored = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal stored
        stored += tensor.numel() * tensor.element_size()
        return tensor

    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = flat(model(x))
    aux = model.auxiliary_losses()
    loss = (out - 0.3).square().mean() + sum(aux.values())
    if loss.requires_grad:  # not under `frozen`
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return stored, out.detach(), {k: v.detach() for k, v in aux.items()}, grads


@pytest.mark.parametrize(("kind", "method"), CASES, ids=IDS)
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(kind, method):
    """Recomputing every block in the backward pass changes what is stored, nothing else."""
    plain, recomputed = adapt(kind, method), adapt(kind, method)
    for model in (plain, recomputed):
        perturb_zero_inits(model)
    keys = recomputed.state_dict().keys()
    recomputed.set_activation_checkpointing(True)
    assert recomputed.state_dict().keys() == keys  # names, optimiser groups, checkpoints
    x = inputs(kind, method)
    stored_plain, out, aux, grads = saved_bytes_and_gradients(plain, x)
    stored, out_r, aux_r, grads_r = saved_bytes_and_gradients(recomputed, x)
    torch.testing.assert_close(out_r, out, atol=0, rtol=0)
    torch.testing.assert_close(aux_r, aux, atol=0, rtol=0)
    assert grads_r.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], atol=1e-7, rtol=1e-6, msg=name)
    if grads:  # what autograd keeps for the blocks is their inputs only
        assert stored < 0.5 * stored_plain, (stored, stored_plain)
    recomputed.set_activation_checkpointing(False)  # and off again: the very same modules
    assert [type(m) for m in recomputed.modules()] == [type(m) for m in plain.modules()]
    assert not any(getattr(m, "checkpoint_activations", False) for m in recomputed.modules())


# ---- the same methods under an image-classification head ----------------------------------------
METHODS = list(ROWS)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_under_a_classification_head(method):
    """The linear head on the pooled final tokens (``segmentors.classifier.ImageClassifier``):
    at initialisation the adapted encoder's head outputs equal the base's (the method's own
    identity pair), and after the adapter's zero-initialised parts are perturbed every trainable
    parameter of encoder and head gets a gradient from the classification loss."""
    from segmentors.classifier import ImageClassifier

    base = build_base("encoder")
    reference = copy.deepcopy(base)
    torch.manual_seed(11)
    reference_head = ImageClassifier(reference, 5, "cls_mean").eval()
    model = adapt("encoder", method, base)
    head = ImageClassifier(model, 5, "cls_mean").eval()
    head.load_state_dict(reference_head.state_dict(), strict=False)  # the same head weights
    torch.manual_seed(2)
    x = torch.randn(2, C, 32, 32)
    adapted_input, rgb_input = ROWS[method].init_pair
    with torch.no_grad():
        torch.testing.assert_close(head(adapted_input(x)),
                                   reference_head(as_base_input("encoder", rgb_input(x))),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    perturb_zero_inits(model)
    head.train()
    loss = torch.nn.functional.cross_entropy(head(x), torch.tensor([1, 3]))
    loss = loss + sum(head.auxiliary_losses().values())
    loss.backward()
    missing = [n for n, p in head.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


# ---- every method exported to ONNX (issue 30) -----------------------------------------------------
REGISTERED = [m for m in ROWS if m in registered_methods()]
EXPORT_CASES = [(m, task) for task in ("segmentation", "classification") for m in REGISTERED] + [
    (m, "segmentation") for m in ROWS if m not in REGISTERED
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "task"), EXPORT_CASES, ids=[f"{m}-{t}" for m, t in EXPORT_CASES]
)
def test_the_onnx_export_equals_pytorch_at_two_sizes_other_than_the_traced_one(
    method, task, tmp_path
):
    """The trained method under the task's head, exported with its band handling: ONNX
    Runtime's outputs on raw input equal PyTorch's within 1e-4 at the traced size (batch 3, two
    traced) and at two other sizes; the methods that allow it are merged (no adapter tensor in
    the file), DEFLECT keeps its modules. About 30 s per case on 2 cores."""
    pytest.importorskip("onnxruntime")
    import onnx

    from deflect.export import export_model
    from deflect.export.graph import allow_any_size
    from deflect.export.onnx import example_image
    from deflect.export.runtime import open_session
    from segmentors.classifier import ImageClassifier
    from segmentors.segmentor import Segmentor

    spec = s2_spec(nodata=-1.0, classes=("a", "b", "c"))
    model = adapt("encoder", method, tiny_encoder(data=spec))
    perturb_zero_inits(model)
    train(model, inputs("encoder", method))
    torch.manual_seed(4)
    if task == "segmentation":
        head = Segmentor(model, 3, channels=16).eval()
    else:
        head = ImageClassifier(model, 3, "cls_mean").eval()
    path = tmp_path / "model.onnx"
    result = export_model(head, spec, path, 32, task)
    reference = copy.deepcopy(head)
    assert allow_any_size(reference) and result.any_size
    session = open_session(path)
    worst = 0.0
    for i, (h, w) in enumerate(((32, 32), (48, 40), (16, 24))):
        raw = example_image(spec, 3, h, w, seed=20 + i)
        x = torch.where(torch.isfinite(raw) & (raw != -1.0), raw, torch.nan)
        x = (x - torch.tensor(spec.mean_list()).view(1, -1, 1, 1)) / torch.tensor(
            spec.std_list()
        ).view(1, -1, 1, 1)
        with torch.no_grad():
            expected = reference(x)
        got = session.run(None, {"image": raw.numpy()})
        logits = got[-1]  # segmentation: logits; classification: probabilities, logits
        assert logits.shape == tuple(expected.shape)
        worst = max(worst, float(np.abs(logits - expected.numpy()).max()))
        if task == "classification":
            np.testing.assert_allclose(got[0], torch.softmax(expected, 1).numpy(), atol=1e-5)
    print(f"\nEXPORT {method} {task}: max |ONNX - PyTorch| {worst:.2e}; {result.merged}")
    assert worst < 1e-4
    names = [i.name for i in onnx.load(str(path)).graph.initializer]
    if method.startswith("deflect"):
        assert "acts on activations" in result.merged
        assert any("deflect_" in n for n in names)
    else:
        assert "merged" in result.merged
        assert not [n for n in names if "lora_" in n], names
