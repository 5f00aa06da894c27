"""The A1111 row-layout rules (lib_magicfusion/webui/a1111/rows.py) with real tensors, no WebUI.

These are the rules an expert's call must follow for its pictures to equal those of that
checkpoint as the main model: rows per AND-part, padding to one token length, the uncond
skip, and batching or chunking of the model call.
"""

import pytest
import torch

from lib_magicfusion.webui.a1111 import rows


def conds(*parts):
    """conds_list for images with these AND-part counts (weights 1, rows numbered in order)."""
    out, row = [], 0
    for n in parts:
        out.append([(row + j, 1.0) for j in range(n)])
        row += n
    return out


def test_repeat_rows_follows_the_and_parts_image_by_image():
    x = torch.arange(3.0).reshape(3, 1)
    assert rows.repeat_rows(x, conds(2, 1, 3)).flatten().tolist() == [0, 0, 1, 2, 2, 2]
    assert rows.n_rows(conds(2, 1, 3)) == 6


@pytest.mark.parametrize("call, total, sigma, kw, expected", [
    (0, 10, 5.0, dict(skip_early_cond=0.2, s_min_uncond=0.0, s_min_uncond_all=False), True),
    (2, 10, 5.0, dict(skip_early_cond=0.2, s_min_uncond=0.0, s_min_uncond_all=False), True),
    (3, 10, 5.0, dict(skip_early_cond=0.2, s_min_uncond=0.0, s_min_uncond_all=False), False),
    (3, 10, 0.5, dict(skip_early_cond=0.0, s_min_uncond=1.0, s_min_uncond_all=False), True),    # NGMS: odd calls
    (4, 10, 0.5, dict(skip_early_cond=0.0, s_min_uncond=1.0, s_min_uncond_all=False), False),
    (4, 10, 0.5, dict(skip_early_cond=0.0, s_min_uncond=1.0, s_min_uncond_all=True), True),     # NGMS: every call
    (3, 10, 2.0, dict(skip_early_cond=0.0, s_min_uncond=1.0, s_min_uncond_all=True), False),    # sigma above the bound
])
def test_the_uncond_skip_rule(call, total, sigma, kw, expected):
    assert rows.skip_uncond(call, total, sigma, **kw) is expected


def test_padding_with_the_empty_prompt_and_v0():
    g = torch.Generator().manual_seed(0)
    cond, uncond, empty = torch.randn(2, 154, 8, generator=g), torch.randn(1, 77, 8, generator=g), torch.randn(1, 77, 8, generator=g)
    c, u = rows.pad(cond, uncond, empty, v0=False, pad_cond_uncond=True)
    assert c is cond and u.shape == (1, 154, 8) and torch.equal(u[:, 77:], empty) and torch.equal(u[:, :77], uncond)
    c, u = rows.pad(uncond, cond, empty, v0=False, pad_cond_uncond=True)  # the cond is the shorter one
    assert c.shape == (1, 154, 8) and torch.equal(c[:, 77:], empty)
    c, u = rows.pad(cond, uncond, empty, v0=True, pad_cond_uncond=True)  # v0 wins: the uncond's last vector repeated
    assert u.shape == (1, 154, 8) and torch.equal(u[:, 77:], uncond[:, -1:].expand(1, 77, 8))
    assert rows.pad(cond, uncond, empty, v0=False, pad_cond_uncond=False) == (cond, uncond)
    sdxl = {"crossattn": uncond, "vector": torch.ones(1, 4)}
    _, u = rows.pad({"crossattn": cond, "vector": torch.ones(2, 4)}, sdxl, empty, v0=False, pad_cond_uncond=True)
    assert u["crossattn"].shape == (1, 154, 8) and torch.equal(u["vector"], sdxl["vector"]) and sdxl["crossattn"] is uncond


class Model:
    """A real function of its inputs, recording every call's row count."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cond):
        self.calls.append(x.shape[0])
        c = cond["c_crossattn"][0]
        return x * sigma.reshape(-1, 1, 1, 1) + c.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def make_condition(c, img):
    return {"c_crossattn": [c], "c_concat": [img]}


def reference(x, sigma, cond, uncond, layout):
    """Each row on its own: what any correct batching must give."""
    xr, sr = rows.repeat_rows(x, layout), rows.repeat_rows(sigma, layout)
    c = xr * sr.reshape(-1, 1, 1, 1) + cond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    u = x * sigma.reshape(-1, 1, 1, 1) + uncond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    return c, u


@pytest.mark.parametrize("batch_cond_uncond, tokens, skip, calls", [
    (True, 77, False, [5]),            # one call: 3 cond rows + 2 uncond rows
    (False, 77, False, [2, 2, 1]),     # chunks of B = 2 rows
    (True, 154, False, [3, 2]),        # token lengths differ: cond rows in chunks of 2B, the uncond apart
    (False, 154, False, [2, 1, 2]),
    (True, 154, True, [3]),            # skipped uncond: only the cond rows, whatever their length
])
def test_evaluate_batches_like_the_webui(batch_cond_uncond, tokens, skip, calls):
    g = torch.Generator().manual_seed(1)
    layout = conds(2, 1)
    x, sigma = torch.randn(2, 4, 3, 3, generator=g), torch.tensor([2.0, 3.0])
    cond, uncond = torch.randn(3, tokens, 8, generator=g), torch.randn(2, 77, 8, generator=g)
    model = Model()
    out = rows.evaluate(model, x, sigma, torch.zeros(2, 5, 1, 1), cond, uncond, layout, skip=skip,
                        batch_cond_uncond=batch_cond_uncond, make_condition=make_condition)
    assert model.calls == calls
    want_c, want_u = reference(x, sigma, cond, uncond, layout)
    assert torch.allclose(out.cond, want_c, atol=1e-6)
    assert out.uncond is None if skip else torch.allclose(out.uncond, want_u, atol=1e-6)


def test_catenate_and_subscript_keep_sdxl_dicts():
    class Shaped(dict):
        pass

    a = Shaped(crossattn=torch.zeros(1, 77, 8), vector=torch.zeros(1, 4))
    b = Shaped(crossattn=torch.ones(2, 77, 8), vector=torch.ones(2, 4))
    joined = rows.catenate([a, b])
    assert type(joined) is Shaped and joined["crossattn"].shape == (3, 77, 8) and joined["vector"].shape == (3, 4)
    part = rows.subscript(joined, 1, 3)
    assert type(part) is Shaped and torch.equal(part["vector"], torch.ones(2, 4))
    assert rows.same_cond(part, b) and not rows.same_cond(part, a) and rows.token_len(joined) == 77
