"""The toy models' text encoder and the A1111 SD1 conditioning, in plain torch.

The text encoder is the test bed's tiny random CLIP (``tests/webui/make_fixtures.py``:
``write_text_encoder``, a transformers ``CLIPTextModel`` with hidden size 32, 2 layers, 2
heads, quick-GELU, and the real 49408-token CLIP BPE tokenizer). Its weights are committed
in ``weights/clip.safetensors`` under transformers' key names.

``Conditioner`` computes what A1111 computes for an SD1 prompt with weight 1 and no special
syntax: the prompt's tokens (no BOS/EOS from the tokenizer), then ``[BOS] + tokens + [EOS]``
padded to 77 with the EOS id, through the text model; the result is the last hidden state,
final layer norm included (CLIP skip 1). The empty prompt "" is the unconditional prompt.

It needs neither transformers nor the BPE vocabulary: ``weights/clip-words.json`` maps every
word the toy world uses to its BPE ids (written from the real tokenizer by train.py). Other
words need the real tokenizer: pass ``tokenizer_dir`` (a folder with vocab.json/merges.txt,
e.g. the CLIP folder that assemble.py writes) and have transformers installed.
"""

from __future__ import annotations

import json
import os
import re

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights")
BOS, EOS = 49406, 49407
MAX_TOKENS = 77
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 32, 2, 2, 64
CLIP_CONFIG = {  # the transformers CLIPTextConfig of make_fixtures.write_text_encoder
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
    "vocab_size": 49408, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "max_position_embeddings": MAX_TOKENS,
    "hidden_act": "quick_gelu", "projection_dim": HIDDEN, "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
    "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": EOS, "torch_dtype": "float32",
}
# CLIP's pre-tokenizer on lower-cased ASCII text (the real one uses Unicode classes).
_WORDS = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


class Tokenizer:
    """Prompt -> BPE ids (no BOS/EOS), as ``CLIPTokenizer(text, add_special_tokens=False)``."""

    def __init__(self, words_path: str | None = None, tokenizer_dir: str | None = None):
        with open(words_path or os.path.join(WEIGHTS, "clip-words.json")) as f:
            self.table: dict[str, list[int]] = json.load(f)
        self.tokenizer_dir = tokenizer_dir
        self._real = None

    def __call__(self, text: str) -> list[int]:
        chunks = _WORDS.findall(" ".join(text.lower().split()))
        if all(c in self.table for c in chunks):
            return [i for c in chunks for i in self.table[c]]
        if self._real is None:
            missing = sorted({c for c in chunks if c not in self.table})
            if not self.tokenizer_dir:
                raise KeyError(f"words {missing} are not in clip-words.json; pass tokenizer_dir (needs transformers)")
            from transformers import CLIPTokenizer
            self._real = CLIPTokenizer.from_pretrained(self.tokenizer_dir)
        return list(self._real(text, add_special_tokens=False, truncation=False)["input_ids"])


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """A1111's SD1 chunk for prompts of at most 75 tokens: BOS, tokens, EOS, EOS padding."""
    rows = []
    for p in prompts:
        ids = tokenizer(p)
        if len(ids) > MAX_TOKENS - 2:
            raise ValueError(f"prompt longer than 75 tokens: {p!r}")
        rows.append([BOS] + ids + [EOS] * (MAX_TOKENS - 1 - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


class TinyCLIPText(torch.nn.Module):
    """The forward pass of transformers' CLIPTextModel (pre-LN, causal mask, quick-GELU),
    returning last_hidden_state (after the final layer norm)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self.w = {k.removeprefix("text_model."): v.float() for k, v in state.items() if k.startswith("text_model.")}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.w
        x = w["embeddings.token_embedding.weight"][ids] + w["embeddings.position_embedding.weight"][: ids.shape[1]]
        n, t, d = x.shape
        hd = d // HEADS
        mask = torch.full((t, t), float("-inf")).triu(1)
        ln = torch.nn.functional.layer_norm
        lin = torch.nn.functional.linear
        for i in range(LAYERS):
            p = f"encoder.layers.{i}."
            h = ln(x, (d,), w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], 1e-5)
            q, k, v = (lin(h, w[p + f"self_attn.{m}_proj.weight"], w[p + f"self_attn.{m}_proj.bias"])
                       .view(n, t, HEADS, hd).transpose(1, 2) for m in "qkv")
            att = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5 + mask, dim=-1)
            h = (att @ v).transpose(1, 2).reshape(n, t, d)
            x = x + lin(h, w[p + "self_attn.out_proj.weight"], w[p + "self_attn.out_proj.bias"])
            h = ln(x, (d,), w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], 1e-5)
            h = lin(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])
            h = h * torch.sigmoid(1.702 * h)
            x = x + lin(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        return ln(x, (d,), w["final_layer_norm.weight"], w["final_layer_norm.bias"], 1e-5)


class Conditioner:
    """prompts -> (N, 77, 32) conditioning, as A1111 computes it for these SD1 models."""

    def __init__(self, clip_path: str | None = None, words_path: str | None = None, tokenizer_dir: str | None = None):
        from safetensors.torch import load_file
        self.model = TinyCLIPText(load_file(clip_path or os.path.join(WEIGHTS, "clip.safetensors")))
        self.tokenizer = Tokenizer(words_path, tokenizer_dir)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        todo = sorted({p for p in prompts if p not in self._cache})
        if todo:
            out = self.model(token_ids(self.tokenizer, todo))
            self._cache.update({p: out[i] for i, p in enumerate(todo)})
        return torch.stack([self._cache[p] for p in prompts])
