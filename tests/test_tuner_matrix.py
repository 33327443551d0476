"""The invariant matrix: every registered tuner, on the framework's encoder and on a bare timm ViT.

A new method adds one row to ``ROWS`` (its config and a hand count of what it trains); a
registered method without a row fails ``test_every_registered_method_has_a_row``.

For every row: only the intended parameters train and each gets a gradient; frozen weights stay
bit-identical after optimiser steps; the outputs equal the base model's at initialisation;
save -> load onto a fresh base gives identical outputs; ``disable_adapter()`` gives the base
outputs; ``unload()`` gives back the base module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from deflect import (
    BitFitConfig,
    DeflectConfig,
    DeflectModel,
    FrozenConfig,
    FullConfig,
    NormTuningConfig,
    TunerConfig,
    get_deflect_model,
    registered_methods,
)
from deflect.encoders import Encoder
from tests.conftest import S2_BANDS, s2_spec, tiny_encoder, tiny_timm_vit

D, DEPTH, HEADS = 32, 4, 4  # the tiny ViT


@dataclass(frozen=True)
class Row:
    """One method: its config, the trainable count by hand, which names may train."""

    config: Callable[[], TunerConfig]
    count: Callable[[bool], int]  # final_norm -> number of trainable parameters
    owns: Callable[[str], bool]  # parameter name -> whether the method trains it


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


ROWS: dict[str, Row] = {
    "frozen": Row(FrozenConfig, lambda norm: 0, lambda n: False),
    "full": Row(FullConfig, lambda norm: -1, lambda n: True),  # -1: every parameter
    "bitfit": Row(BitFitConfig, bitfit_count, lambda n: n.endswith("bias")),
    "norm_tuning": Row(NormTuningConfig, norm_count, lambda n: n.split(".")[-2].startswith("norm")),
    "deflect": Row(DeflectConfig, deflect_count, lambda n: ".deflect_" in n),
    "deflect_soft": Row(
        lambda: DeflectConfig(deflection="soft", cls_token="learned"),
        lambda norm: deflect_count(norm) + D,
        lambda n: ".deflect_" in n,
    ),  # fmt: skip
    "deflect_none": Row(
        lambda: DeflectConfig(deflection="none", target_blocks=[1, 3]),
        lambda norm: deflect_count(norm) - 4 * D * 8,
        lambda n: ".deflect_" in n,
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
    if kind == "timm" and not method.startswith("deflect"):  # a bare ViT takes its RGB only
        x = x[:, [S2_BANDS.index(b) for b in ("B4", "B3", "B2")]]
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
        return x[:, [S2_BANDS.index(b) for b in ("B4", "B3", "B2")]]
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
            if name.endswith("deflect_uatt.default.U.weight"):
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
    if expected == -1:
        expected = sum(p.numel() for p in build_base(kind).parameters())
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
    x = inputs(kind, method)
    torch.testing.assert_close(
        outputs(model, x), outputs(reference, base_input(kind, x)), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(("kind", "method"), CASES, ids=IDS)
def test_save_load_onto_a_fresh_base_gives_identical_outputs(kind, method, tmp_path):
    _, _, model, x = trained(kind, method)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "default" / "deflect_model.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == model.num_adapter_parameters()
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
