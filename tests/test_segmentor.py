"""The decoder's faster paths compute the same function as UperNet written out: outputs and
gradients equal in float64 (exact algebra), and within float32 rounding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from segmentors.upernet import (
    UperNetHead,
    add_conv3x3_of_upsampled_,
    conv3x3_of_upsampled,
    interpolation_matrix,
    relu_keeping_mask,
)


@pytest.mark.parametrize(
    ("small", "big"), [((7, 5), (28, 20)), ((4, 4), (16, 16)), ((3, 6), (3, 12))]
)
def test_conv3x3_of_upsampled_equals_upsample_then_convolve(small, big):
    torch.manual_seed(0)
    x = torch.randn(2, 8, *small, dtype=torch.float64)
    w = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    expected = F.conv2d(
        F.interpolate(x, size=big, mode="bilinear", align_corners=False), w, padding=1
    )
    torch.testing.assert_close(conv3x3_of_upsampled(x, w, big), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_bytes", [1, 2 * 9 * 4 * 7 * 5 * 8, 2**30])  # 1, 2 or 5 samples
def test_chunked_in_place_fusion_equals_the_sum(chunk_bytes):
    """out + conv(upsample(x)) accumulated in place a few samples at a time (an uneven last
    chunk included): the same values and the same gradients for out, x and the weight."""
    torch.manual_seed(0)
    x = torch.randn(5, 8, 7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    base = torch.randn(5, 4, 28, 20, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(5, 4, 28, 20, dtype=torch.float64)

    def run(fn):
        for t in (x, w, base):
            t.grad = None
        out = fn()
        (out * probe).sum().backward()
        return out.detach(), x.grad.clone(), w.grad.clone(), base.grad.clone()

    expected = run(lambda: base * 2 + F.conv2d(
        F.interpolate(x, size=(28, 20), mode="bilinear", align_corners=False), w, padding=1
    ))  # fmt: skip
    got = run(lambda: add_conv3x3_of_upsampled_(base * 2, x, w, chunk_bytes=chunk_bytes))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_classifier_dropout_folded_into_weights_is_dropout_then_classifier():
    """In training the Dropout2d mask is folded into the classifier's weights: the same random
    draw (and what is drawn next), the same logits and gradients as classifier(dropout(z))."""
    torch.manual_seed(0)
    head = UperNetHead([6] * 4, 5, channels=8, dropout=0.5).double().train()
    z = torch.randn(4, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(4, 5, 6, 6, dtype=torch.float64)

    def run(fn):
        z.grad = None
        head.zero_grad()
        torch.manual_seed(1)
        out = fn(z)
        (out * probe).sum().backward()
        grads = [z.grad.clone(), head.classifier.weight.grad.clone(), head.classifier.bias.grad]
        return out.detach(), grads, torch.rand(3)

    out, grads, after = run(head.classify)
    out_ref, grads_ref, after_ref = run(lambda t: head.classifier(head.dropout(t)))
    assert not torch.allclose(out_ref, head.classifier(z).detach())  # the dropout did drop
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(after, after_ref)  # the same amount of randomness consumed
    head.eval()
    torch.testing.assert_close(head.classify(z), head.classifier(z))


def test_relu_keeping_mask_is_relu_and_keeps_only_a_boolean_mask():
    x = torch.tensor([[-2.0, -0.0, 0.0, 1e-30, 3.0], [5.0, -1e-30, 0.5, -7.0, 0.0]])
    grad = torch.tensor([[1.0, 2.0, float("nan"), 4.0, 5.0], [6.0, 7.0, 8.0, float("inf"), 9.0]])

    def run(fn):
        leaf = x.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(leaf * 1.0)
        out.backward(grad)
        return out.detach(), leaf.grad, saved

    (out_ref, grad_ref, _), (out, grad_got, saved) = run(torch.relu), run(relu_keeping_mask)
    assert torch.equal(out, out_ref)
    torch.testing.assert_close(grad_got, grad_ref, equal_nan=True, rtol=0, atol=0)
    assert [t.dtype for t in saved] == [torch.bool]  # a mask, not a float copy of the output


def test_interpolation_matrix_is_linear_upsampling_with_zero_padded_shifts():
    vector = torch.arange(5, dtype=torch.float64)
    up = F.interpolate(vector.view(1, 1, 5), size=10, mode="linear", align_corners=False).flatten()
    torch.testing.assert_close(interpolation_matrix(10, 5) @ vector, up)
    shifted = interpolation_matrix(10, 5, shift=1) @ vector  # output o reads input row o + 1
    torch.testing.assert_close(shifted[:-1], up[1:])
    assert shifted[-1] == 0  # beyond the border: the convolution's zero padding


def run(head: UperNetHead, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for f in feats:
        f.grad = None
    head.zero_grad()
    torch.manual_seed(1)  # the same dropout mask
    out = head(feats)
    (out.square().mean()).backward()
    return out.detach(), [f.grad.clone() for f in feats] + [
        p.grad.clone() for p in head.parameters()
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_fusion_is_the_same_head(dtype):
    torch.manual_seed(0)
    fast = UperNetHead([24] * 4, 5, channels=16).to(dtype).train()
    slow = copy.deepcopy(fast)
    slow.fast_fusion = False
    feats = [torch.randn(2, 24, s, s, dtype=dtype, requires_grad=True) for s in (16, 8, 4, 2)]
    out_fast, grads_fast = run(fast, feats)
    out_slow, grads_slow = run(slow, feats)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(out_fast, out_slow, **tol)
    if dtype == torch.float64:  # float32 gradients flip at ReLU kinks; float64 proves the algebra
        for a, b in zip(grads_fast, grads_slow):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("method", ["frozen", "full"])
def test_folded_laterals_and_fast_fusion_are_the_same_segmentor(method):
    """The whole segmentor with both faster paths against UperNet written out, in float64:
    outputs, the input gradient and every parameter's gradient (neck's transposed convolutions
    and the lateral 1x1 convolutions included)."""
    from deflect import FrozenConfig, FullConfig, get_deflect_model
    from segmentors import Segmentor
    from tests.conftest import tiny_encoder

    config = FrozenConfig() if method == "frozen" else FullConfig()
    encoder = get_deflect_model(tiny_encoder(), config)
    torch.manual_seed(3)
    fast = Segmentor(encoder, num_classes=3, channels=16).double().train()
    slow = copy.deepcopy(fast)
    slow.fold_laterals = False
    slow.decode_head.fast_fusion = False
    x = torch.randn(2, 11, 32, 32, dtype=torch.float64, requires_grad=True)

    def run(model):
        x.grad = None
        model.zero_grad()
        torch.manual_seed(1)
        out = model(x)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), x.grad.clone(), grads

    out_fast, dx_fast, grads_fast = run(fast)
    out_slow, dx_slow, grads_slow = run(slow)
    torch.testing.assert_close(out_fast, out_slow, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dx_fast, dx_slow, rtol=1e-9, atol=1e-12)
    assert grads_fast.keys() == grads_slow.keys()
    assert any("neck.ops.0.3" in n for n in grads_fast)  # the folded transposed convolution
    for name in grads_slow:
        torch.testing.assert_close(grads_fast[name], grads_slow[name], rtol=1e-9, atol=1e-12)
