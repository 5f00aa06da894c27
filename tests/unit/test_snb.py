"""Property and golden tests of the SNB operators."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_magicfusion import snb

shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 12), st.integers(1, 12))


def tensor(shape, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def valid_blur(shape, blur):
    return blur if blur <= 1 or min(shape[-2:]) + 3 > blur else 0


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 6), st.floats(0, 20), st.integers(0, 2**31 - 1))
def test_saliency_is_a_distribution_over_pixels(shape, blur, k, seed):
    blur = valid_blur(shape, blur)
    s = snb.saliency(tensor(shape, seed), k, blur)
    assert s.shape == (shape[0], 1, *shape[2:])
    assert s.dtype == torch.float32
    assert torch.all(s >= 0)
    torch.testing.assert_close(s.sum(dim=(1, 2, 3)), torch.ones(shape[0]), rtol=0, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(2, 4), st.integers(0, 5), st.lists(st.floats(0, 10), min_size=4, max_size=4), st.integers(0, 2**31 - 1))
def test_mask_indices_are_valid_and_blend_picks_exactly(shape, n, blur, ks, seed):
    blur = valid_blur(shape, blur)
    deltas = [tensor(shape, seed + i) for i in range(n)]
    mask = snb.fusion_mask(deltas, ks[:n], blur)
    assert mask.dtype == torch.int64 and mask.shape == (shape[0], 1, *shape[2:])
    assert int(mask.min()) >= 0 and int(mask.max()) < n
    preds = [tensor(shape, 1000 + seed + i) for i in range(n)]
    out = snb.blend(preds, mask)
    for i in range(n):
        chosen = (mask == i).expand(shape)
        assert torch.equal(out[chosen], preds[i][chosen])


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(2, 4), st.integers(0, 5), st.floats(0, 10), st.integers(0, 2**31 - 1))
def test_ties_go_to_the_general_model(shape, n, blur, k, seed):
    blur = valid_blur(shape, blur)
    delta = tensor(shape, seed)
    mask = snb.fusion_mask([delta] * n, [k] * n, blur)
    assert torch.all(mask == 0)
    # A flat map everywhere (k = 0) ties every pixel too.
    mask = snb.fusion_mask([tensor(shape, seed + i) for i in range(n)], [0.0] * n, blur)
    assert torch.all(mask == 0)


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(0, 5), st.floats(0.1, 5), st.integers(0, 2**31 - 1))
def test_each_sample_is_independent_of_the_batch(shape, blur, k, seed):
    blur = valid_blur(shape, blur)
    a, b = tensor(shape, seed), tensor(shape, seed + 1)
    mask = snb.fusion_mask([a, b], [1.0, k], blur)
    for i in range(shape[0]):
        alone = snb.fusion_mask([a[i:i + 1], b[i:i + 1]], [1.0, k], blur)
        assert torch.equal(alone, mask[i:i + 1])


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 5), st.lists(st.floats(0.1, 10), min_size=2, max_size=2), st.integers(0, 2**31 - 1))
def test_a_scale_folded_into_the_temperature_equals_scaling_the_delta(shape, blur, ks, seed):
    """What the fusion step relies on: saliency(c * delta, k) == saliency(delta, k * c), c >= 0
    per model and per sample (the guidance scale and 1/sigma)."""
    blur = valid_blur(shape, blur)
    f64 = torch.float64  # an identity of real numbers: checked where rounding stays far below the tolerance
    deltas = torch.stack([tensor(shape, seed, dtype=f64), tensor(shape, seed + 1, dtype=f64)])
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(2, shape[0], generator=g, dtype=f64) * 20 + 0.01
    temperatures = torch.tensor(ks, dtype=f64).reshape(2, 1, 1) * scales.reshape(2, -1, 1)
    folded = snb.stacked_saliency(deltas, temperatures, blur)
    for m in range(2):
        scaled = deltas[m] * scales[m].reshape(-1, 1, 1, 1)
        torch.testing.assert_close(folded[m], snb.saliency(scaled, ks[m], blur), rtol=1e-10, atol=1e-12)


def test_golden_official_operators():
    """The official chain, written out with torch's modules as the official code builds it."""
    delta = tensor((2, 4, 64, 64), 7) * 3
    pool = torch.nn.AvgPool2d(kernel_size=4, stride=1, padding=1)
    expected = F.interpolate(pool(delta.abs()), size=(64, 64), mode="bilinear", align_corners=False)
    expected = expected.mean(dim=1, keepdim=True)
    expected = torch.softmax(expected.reshape(2, -1) * 1.5, dim=1).reshape(2, 1, 64, 64)
    assert torch.equal(snb.saliency(delta, 1.5, 4), expected)


def test_golden_hand_computed_border_counts_zero_padding():
    """A constant map of ones: the 4x4 box with padding 1 divides border sums by 16."""
    ones = torch.ones(1, 1, 5, 5, dtype=torch.float64)
    pooled = F.avg_pool2d(ones, 4, 1, 1)  # 4x4 output
    assert pooled[0, 0, 0, 0].item() == 9 / 16 and pooled[0, 0, 1, 1].item() == 1.0
    s = snb.saliency(ones, 0.0, 4)
    assert torch.allclose(s, torch.full_like(s, 1 / 25))
    # With k > 0 the brighter interior outweighs the darker border.
    s = snb.saliency(ones, 10.0, 4)
    assert s[0, 0, 2, 2] > s[0, 0, 0, 0]


def test_no_blur_means_plain_channel_mean():
    delta = tensor((1, 4, 6, 6), 3)
    for blur in (0, 1):
        expected = torch.softmax(delta.abs().mean(1).reshape(1, -1) * 2.0, dim=1).reshape(1, 1, 6, 6)
        assert torch.equal(snb.saliency(delta, 2.0, blur), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_measured_in_float32(dtype):
    a, b = tensor((2, 4, 32, 32), 1, dtype=dtype), tensor((2, 4, 32, 32), 2, dtype=dtype)
    mask = snb.fusion_mask([a, b], [1.0, 1.0], 4)
    reference = snb.fusion_mask([a.float(), b.float()], [1.0, 1.0], 4)
    assert torch.equal(mask, reference)
    assert snb.saliency(a, 1.0).dtype == torch.float32


def test_expert_share_follows_the_temperature():
    """k is a focus, not a strength: a larger k_e makes the expert claim fewer pixels."""
    a, b = tensor((4, 4, 64, 64), 11), tensor((4, 4, 64, 64), 12)
    shares = [float(snb.fusion_mask([a, b], [1.0, k], 0).float().mean()) for k in (0.0, 1.0, 2.0, 5.0)]
    assert shares == sorted(shares, reverse=True)
    assert shares[0] > 0.5 > shares[-1]


def test_bad_inputs_name_magicfusion():
    with pytest.raises(ValueError, match="MagicFusion"):
        snb.saliency(torch.zeros(4, 8, 8), 1.0)
    with pytest.raises(ValueError, match="MagicFusion: blur"):
        snb.saliency(torch.zeros(1, 4, 2, 2), 1.0, blur=9)
    with pytest.raises(ValueError, match="at least two"):
        snb.fusion_mask([torch.zeros(1, 4, 8, 8)], [1.0])
    with pytest.raises(ValueError, match="differ in shape"):
        snb.fusion_mask([torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 9)], [1.0, 1.0])
    assert not math.isnan(float(snb.saliency(torch.zeros(1, 4, 8, 8), 1.0).sum()))


def test_a_region_confines_the_decision_to_the_area_being_generated():
    """Inpainting: who wins inside the region depends only on the guidance terms inside it (the
    saliency outside counts as zero, and the softmax runs over the region); outside it the
    general model wins; no region is exactly the official decision."""
    g = torch.Generator().manual_seed(3)
    deltas = torch.randn(2, 2, 4, 16, 16, generator=g, dtype=torch.float64)
    temps = snb.k_column((1.0, 1.3), torch.float64, deltas.device)
    region = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    region[..., 4:12, 3:11] = 1.0
    inside = region.bool().expand(2, 1, 16, 16)
    mask = torch.argmax(snb.stacked_saliency(deltas, temps, 4, region), dim=0)
    changed = deltas.clone()
    changed[..., :, :3] = torch.randn(2, 2, 4, 16, 3, generator=g, dtype=torch.float64) * 50  # the kept area only
    again = torch.argmax(snb.stacked_saliency(changed, temps, 4, region), dim=0)
    assert torch.equal(mask[inside], again[inside])
    assert not mask[~inside].any()  # ties outside: the general model
    assert mask[inside].any() and not mask[inside].all()
    without = torch.argmax(snb.stacked_saliency(changed, temps, 4), dim=0)
    assert not torch.equal(without[inside], mask[inside])  # without the region the kept area pulls on the decision
    assert torch.equal(snb.stacked_saliency(deltas, temps, 4, torch.zeros(2, 1, 16, 16)), snb.stacked_saliency(deltas, temps, 4))
