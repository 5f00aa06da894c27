"""Row layouts of A1111's CFGDenoiser, as pure tensor functions (no WebUI import).

The WebUI's CFGDenoiser.forward (A1111 1.10) lays out one model call as the cond rows (image
i's AND-parts together, image by image) followed by one uncond row per image, pads cond and
uncond to a common token length, decides whether to skip the uncond, and batches or chunks
the call. An expert must be evaluated by exactly these rules, on its own rows, for its
pictures to equal those of that checkpoint as the main model. These functions restate them
so that the unit tests can exercise them with real tensors, without a WebUI.

A cond batch is a tensor (rows, tokens, width) or, for SDXL, a dict with "crossattn"
(rows, tokens, width) and "vector" (rows, width).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

CondsList = Sequence[Sequence[tuple[int, float]]]


def repeat_rows(x: torch.Tensor, conds_list: CondsList) -> torch.Tensor:
    """Per-image rows repeated once per AND-part, image by image: the cond half of a call."""
    return torch.cat([torch.stack([x[i] for _ in range(len(parts))]) for i, parts in enumerate(conds_list)])


def n_rows(conds_list: CondsList) -> int:
    return sum(len(parts) for parts in conds_list)


def token_len(cond) -> int:
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[1]


def catenate(conds):
    if isinstance(conds[0], dict):
        return type(conds[0])({key: torch.cat([c[key] for c in conds]) for key in conds[0]})
    return torch.cat(conds)


def subscript(cond, a: int, b: int):
    if isinstance(cond, dict):
        return type(cond)({key: value[a:b] for key, value in cond.items()})
    return cond[a:b]


def same_cond(a, b) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(same_cond(a[k], b[k]) for k in a)
    return a.shape == b.shape and torch.equal(a, b)


def same_layout(a: CondsList, b: CondsList) -> bool:
    return [[(i, float(w)) for i, w in parts] for parts in a] == [[(i, float(w)) for i, w in parts] for parts in b]


def skip_uncond(call: int, total_calls: int, sigma0: float, *, skip_early_cond: float, s_min_uncond: float,
                s_min_uncond_all: bool) -> bool:
    """Whether the WebUI drops the uncond rows of this denoiser call (A1111 1.10's rule, applied
    right after on_cfg_denoiser): early steps with "skip early cond", then NGMS."""
    if skip_early_cond != 0.0 and call / total_calls <= skip_early_cond:
        return True
    return bool((call % 2 or s_min_uncond_all) and s_min_uncond > 0 and sigma0 < s_min_uncond)


def _with_crossattn(cond, crossattn):
    if isinstance(cond, dict):
        out = type(cond)(cond)
        out["crossattn"] = crossattn
        return out
    return crossattn


def pad(cond, uncond, empty: torch.Tensor | None, *, v0: bool, pad_cond_uncond: bool):
    """Cond and uncond brought to one token length as the WebUI's options say: `v0` repeats the
    uncond's last token vector (or cuts it); `pad_cond_uncond` appends the model's empty-prompt
    chunk (`empty`, (1, 77, width)) to the shorter one. Otherwise both are returned unchanged."""
    c, u = token_len(cond), token_len(uncond)
    if c == u:
        return cond, uncond
    if v0:
        vec = uncond["crossattn"] if isinstance(uncond, dict) else uncond
        if vec.shape[1] < c:
            vec = torch.hstack([vec, vec[:, -1:].repeat([1, c - vec.shape[1], 1])])
        else:
            vec = vec[:, :c]
        return cond, _with_crossattn(uncond, vec)
    if pad_cond_uncond:
        repeats = (c - u) // empty.shape[1]

        def padded(t, n):
            vec = t["crossattn"] if isinstance(t, dict) else t
            return _with_crossattn(t, torch.cat([vec, empty.repeat((vec.shape[0], n, 1))], dim=1))

        if repeats < 0:
            return padded(cond, -repeats), uncond
        if repeats > 0:
            return cond, padded(uncond, repeats)
    return cond, uncond


@dataclass
class Outputs:
    cond: torch.Tensor              # (R, C, H, W)
    uncond: torch.Tensor | None  # (B, C, H, W), None when skipped


def evaluate(model: Callable, x: torch.Tensor, sigma: torch.Tensor, image_cond: torch.Tensor, cond, uncond,
             conds_list: CondsList, *, skip: bool, batch_cond_uncond: bool,
             make_condition: Callable) -> Outputs:
    """One model's cond and uncond rows for per-image x, sigma and image_cond (B rows each),
    called as CFGDenoiser.forward calls the main model (cond and uncond already padded):

    * one call of all rows when the token lengths agree (or the uncond is skipped) and
      `batch_cond_uncond` is on; chunks of B rows when it is off;
    * otherwise the cond rows in chunks (2B rows with batch_cond_uncond) and the uncond apart.

    `make_condition(cond, image_cond)` builds the model's condition dict."""
    batch = len(conds_list)
    x_in = torch.cat([repeat_rows(x, conds_list)] + ([] if skip else [x]))
    sigma_in = torch.cat([repeat_rows(sigma, conds_list)] + ([] if skip else [sigma]))
    image_in = torch.cat([repeat_rows(image_cond, conds_list)] + ([] if skip else [image_cond]))
    rows = n_rows(conds_list)
    if skip or token_len(cond) == token_len(uncond):
        cond_in = cond if skip else catenate([cond, uncond])
        if batch_cond_uncond:
            out = model(x_in, sigma_in, cond=make_condition(cond_in, image_in))
        else:
            out = torch.zeros_like(x_in)
            for a in range(0, out.shape[0], batch):
                b = a + batch
                out[a:b] = model(x_in[a:b], sigma_in[a:b], cond=make_condition(subscript(cond_in, a, b), image_in[a:b]))
    else:
        out = torch.zeros_like(x_in)
        step = batch * 2 if batch_cond_uncond else batch
        for a in range(0, rows, step):
            b = min(a + step, rows)
            out[a:b] = model(x_in[a:b], sigma_in[a:b], cond=make_condition(subscript(cond, a, b), image_in[a:b]))
        out[rows:] = model(x_in[rows:], sigma_in[rows:], cond=make_condition(uncond, image_in[rows:]))
    return Outputs(out[:rows], None if skip else out[rows:])
