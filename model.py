"""model.py: the network.

Read top to bottom:
  1. ModelConfig and its presets
  2. wav2vec2, written from scratch with Hugging Face's parameter names (loading is a key copy)
  3. loading real wav2vec2 checkpoints: Hugging Face folders/files and fairseq's wav2vec_small.pt

Shapes: B batch, S audio samples, T frames, D width. Lengths travel with tensors; padding masks
are True on padding (data.lengths_to_padding_mask).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data import lengths_to_padding_mask


# ----------------------------------------------------------------------------------------------
# 1. Configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class Wav2Vec2Config:
    """wav2vec2's shape, named as Hugging Face's `Wav2Vec2Config` so config.json maps 1:1."""
    conv_dim: tuple = (512,) * 7
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    layer_norm_eps: float = 1e-5
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    feat_proj_dropout: float = 0.1
    layerdrop: float = 0.05
    gradient_checkpointing: bool = False

    @classmethod
    def from_hf(cls, cfg: dict) -> "Wav2Vec2Config":
        """From a Hugging Face config.json dict; only the post-LN, group-norm base layout is supported."""
        if cfg.get("feat_extract_norm", "group") != "group" or cfg.get("do_stable_layer_norm", False):
            raise ValueError("only wav2vec2 'base'-style checkpoints (feat_extract_norm='group', "
                             "do_stable_layer_norm=False) are supported; this config is a 'large'-style model")
        if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("feat_extract_activation", "gelu") != "gelu":
            raise ValueError("only GELU activations are supported")
        kw = {f.name: cfg[f.name] for f in fields(cls) if f.name in cfg}
        for k in ("conv_dim", "conv_kernel", "conv_stride"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


# ----------------------------------------------------------------------------------------------
# 2. wav2vec2 (Baevski et al. 2020), base layout: 7 convs -> projection -> conv positions -> post-LN Transformer
# ----------------------------------------------------------------------------------------------
def conv_out_lengths(lens: torch.Tensor, kernels, strides) -> torch.Tensor:
    """Exact output lengths of unpadded strided convolutions: floor((L - k) / s) + 1 per layer."""
    for k, s in zip(kernels, strides):
        lens = torch.div(lens - k, s, rounding_mode="floor") + 1
    return lens


def masked_group_norm(x: torch.Tensor, norm: nn.GroupNorm, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """wav2vec2's first-layer GroupNorm (one group per channel: a norm over time), with the
    statistics taken over valid frames only. Without padding it equals nn.GroupNorm; with
    padding it makes a padded batch item equal to its unpadded run (HF and fairseq include the
    padding in the statistics, so their padded outputs depend on the batch). x (B, C, T)."""
    assert norm.num_groups == norm.num_channels, "wav2vec2 normalises each channel on its own"
    dtype = x.dtype
    x = x.float()                                  # statistics in fp32 under bf16 autocast
    valid = torch.ones_like(x[:, :1]) if pad_mask is None else (~pad_mask).unsqueeze(1).float()
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = (x * valid).sum(-1, keepdim=True) / n
    var = (((x - mean) * valid) ** 2).sum(-1, keepdim=True) / n
    x = (x - mean) * torch.rsqrt(var + norm.eps)
    return (x * norm.weight[:, None].float() + norm.bias[:, None].float()).to(dtype)


class Wav2Vec2ConvLayer(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config, i: int):
        super().__init__()
        c_in = cfg.conv_dim[i - 1] if i > 0 else 1
        self.conv = nn.Conv1d(c_in, cfg.conv_dim[i], cfg.conv_kernel[i], cfg.conv_stride[i], bias=cfg.conv_bias)
        if i == 0:
            self.layer_norm = nn.GroupNorm(cfg.conv_dim[0], cfg.conv_dim[0], affine=True)


class Wav2Vec2FeatureEncoder(nn.Module):
    """Raw waveform (B, S) -> (B, C, T) at 20 ms per frame for the base strides."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        self.conv_layers = nn.ModuleList(Wav2Vec2ConvLayer(cfg, i) for i in range(len(cfg.conv_dim)))

    def forward(self, audio: torch.Tensor, lens: torch.Tensor | None = None) -> torch.Tensor:
        x = audio[:, None]
        for i, layer in enumerate(self.conv_layers):
            x = layer.conv(x)
            if i == 0:
                mask = None
                if lens is not None:
                    mask = lengths_to_padding_mask(conv_out_lengths(lens, self.cfg.conv_kernel[:1],
                                                                    self.cfg.conv_stride[:1]), x.shape[-1])
                x = masked_group_norm(x, layer.layer_norm, mask)
            x = F.gelu(x)
        return x


class Wav2Vec2FeatureProjection(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.conv_dim[-1], cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.feat_proj_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.projection(self.layer_norm(x)))


class Wav2Vec2PositionalConvEmbedding(nn.Module):
    """Relative positions from a wide grouped convolution with weight norm over the kernel axis."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        k = cfg.num_conv_pos_embeddings
        conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, k, padding=k // 2, groups=cfg.num_conv_pos_embedding_groups)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.trim = 1 if k % 2 == 0 else 0        # an even kernel yields one frame too many

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, T, D) -> (B, T, D)
        y = self.conv(x.transpose(1, 2))
        if self.trim:
            y = y[:, :, :-self.trim]
        return F.gelu(y).transpose(1, 2)


class Wav2Vec2Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))        # (B, H, T, D/H)
        attn_mask = None if pad_mask is None else ~pad_mask[:, None, None, :]  # True = may attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class Wav2Vec2FeedForward(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.intermediate_dropout = nn.Dropout(cfg.activation_dropout)
        self.intermediate_dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output_dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.output_dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dropout(self.output_dense(self.intermediate_dropout(F.gelu(self.intermediate_dense(x)))))


class Wav2Vec2EncoderLayer(nn.Module):
    """Post-LN: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.attention = Wav2Vec2Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.attention_dropout)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = Wav2Vec2FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.layer_norm(x + self.dropout(self.attention(x, pad_mask)))
        return self.final_layer_norm(x + self.feed_forward(x))


class Wav2Vec2Encoder(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        self.pos_conv_embed = Wav2Vec2PositionalConvEmbedding(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(Wav2Vec2EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        if pad_mask is not None:
            x = x.masked_fill(pad_mask[..., None], 0.0)   # padding must not leak through the position conv
        x = self.dropout(self.layer_norm(x + self.pos_conv_embed(x)))
        for layer in self.layers:
            if self.training and self.cfg.layerdrop > 0 and torch.rand(()) < self.cfg.layerdrop:
                continue                                  # LayerDrop (Fan et al. 2019)
            if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, pad_mask, use_reentrant=False)
            else:
                x = layer(x, pad_mask)
        return x


class Wav2Vec2Model(nn.Module):
    """wav2vec2 with Hugging Face's module and parameter names.

    forward(audio (B, S), lens (B,) or None) -> (states (B, T, hidden), frame lengths (B,)).
    `masked_spec_embed` is kept for a lossless key copy; ST fine-tuning here uses no time masking
    (ConST calls wav2vec2 with mask=False, METHODS §1.3).
    """

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = Wav2Vec2FeatureEncoder(cfg)
        self.feature_projection = Wav2Vec2FeatureProjection(cfg)
        self.masked_spec_embed = nn.Parameter(torch.empty(cfg.hidden_size).uniform_())
        self.encoder = Wav2Vec2Encoder(cfg)

    def output_lengths(self, lens: torch.Tensor) -> torch.Tensor:
        return conv_out_lengths(lens, self.cfg.conv_kernel, self.cfg.conv_stride)

    def freeze_feature_encoder(self):
        """Fine-tuning practice: the conv feature encoder stays as pre-trained."""
        for p in self.feature_extractor.parameters():
            p.requires_grad_(False)

    def forward(self, audio: torch.Tensor, lens: torch.Tensor | None = None) -> tuple:
        if lens is None:
            lens = torch.full((audio.shape[0],), audio.shape[1], dtype=torch.long, device=audio.device)
        feats = self.feature_extractor(audio, lens).transpose(1, 2)     # (B, T, C)
        out_lens = self.output_lengths(lens)
        pad_mask = lengths_to_padding_mask(out_lens, feats.shape[1])
        x = self.feature_projection(feats)
        return self.encoder(x, pad_mask if pad_mask.any() else None), out_lens


# ----------------------------------------------------------------------------------------------
# 3. Loading real checkpoints (nothing is downloaded: pass a local path)
# ----------------------------------------------------------------------------------------------
# fairseq wav2vec2 key -> our (= Hugging Face) key. {i} is a layer index.
FAIRSEQ_TO_HF = {
    "feature_extractor.conv_layers.{i}.0.weight": "feature_extractor.conv_layers.{i}.conv.weight",
    "feature_extractor.conv_layers.{i}.0.bias": "feature_extractor.conv_layers.{i}.conv.bias",
    "feature_extractor.conv_layers.0.2.weight": "feature_extractor.conv_layers.0.layer_norm.weight",
    "feature_extractor.conv_layers.0.2.bias": "feature_extractor.conv_layers.0.layer_norm.bias",
    "layer_norm.weight": "feature_projection.layer_norm.weight",
    "layer_norm.bias": "feature_projection.layer_norm.bias",
    "post_extract_proj.weight": "feature_projection.projection.weight",
    "post_extract_proj.bias": "feature_projection.projection.bias",
    "mask_emb": "masked_spec_embed",
    "encoder.pos_conv.0.weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    "encoder.pos_conv.0.weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
    "encoder.pos_conv.0.bias": "encoder.pos_conv_embed.conv.bias",
    "encoder.layer_norm.weight": "encoder.layer_norm.weight",
    "encoder.layer_norm.bias": "encoder.layer_norm.bias",
    **{f"encoder.layers.{{i}}.self_attn.{p}.{w}": f"encoder.layers.{{i}}.attention.{p}.{w}"
       for p in ("q_proj", "k_proj", "v_proj", "out_proj") for w in ("weight", "bias")},
    **{f"encoder.layers.{{i}}.{a}.{w}": f"encoder.layers.{{i}}.{b}.{w}" for a, b in (
        ("self_attn_layer_norm", "layer_norm"), ("fc1", "feed_forward.intermediate_dense"),
        ("fc2", "feed_forward.output_dense"), ("final_layer_norm", "final_layer_norm")) for w in ("weight", "bias")},
}
# Hugging Face key -> our key, where they differ: older checkpoints store the weight norm as g/v.
HF_RENAMES = {
    "encoder.pos_conv_embed.conv.weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    "encoder.pos_conv_embed.conv.weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
}
# Pre-training heads that fine-tuning does not use: present in checkpoints, dropped on purpose.
PRETRAINING_ONLY = ("quantizer.", "project_q.", "final_proj.", "project_hid.", "label_embs_concat")


def _expand(table: dict, n_conv: int, n_layers: int) -> dict:
    out = {}
    for src, dst in table.items():
        n = n_conv if "conv_layers" in src else n_layers
        for i in (range(n) if "{i}" in src else [None]):
            out[src.format(i=i)] = dst.format(i=i)
    return out


def _copy_state(model: Wav2Vec2Model, state: dict, rename: dict, source: str) -> Wav2Vec2Model:
    """Copy `state` into `model` through `rename`; any missing, unexpected or mis-shaped key is an error."""
    ours = model.state_dict()
    mapped = {}
    for key, value in state.items():
        if key.startswith(PRETRAINING_ONLY):
            continue
        dst = rename.get(key, key)
        if dst not in ours:
            raise KeyError(f"{source}: unexpected key {key!r} (no wav2vec2 base parameter of that name)")
        if tuple(value.shape) != tuple(ours[dst].shape):
            raise ValueError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(ours[dst].shape)} for {dst!r}; the config does not match the weights")
        mapped[dst] = value
    if "masked_spec_embed" not in mapped:      # HF omits it when its config has no time masking
        mapped["masked_spec_embed"] = ours["masked_spec_embed"]
    missing = sorted(set(ours) - set(mapped))
    if missing:
        raise KeyError(f"{source}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(mapped, strict=True)
    return model


def _hf_state(folder: Path) -> dict:
    st, binf = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.exists():
        from safetensors.torch import load_file
        state = load_file(str(st))
    elif binf.exists():
        state = torch.load(binf, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    # a Wav2Vec2For* head model prefixes the backbone with 'wav2vec2.'; heads are not ours to load
    if any(k.startswith("wav2vec2.") for k in state):
        state = {k[len("wav2vec2."):]: v for k, v in state.items() if k.startswith("wav2vec2.")}
    return state


def _conv_layers_spec(src: str) -> list:
    """fairseq stores the conv stack as Python source ("[(512, 10, 5)] + [(512, 3, 2)] * 4 ...");
    evaluate only lists, tuples, numbers, + and *: never eval() what a checkpoint carries."""
    import ast

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, (ast.List, ast.Tuple)):
            return (list if isinstance(node, ast.List) else tuple)(ev(e) for e in node.elts)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"conv_feature_layers: unsupported expression {ast.dump(node)[:60]}")
    return ev(ast.parse(src, mode="eval"))


def _fairseq_config(ckpt: dict, path: Path) -> Wav2Vec2Config:
    args = ckpt.get("args")
    m = vars(args) if args is not None else (ckpt.get("cfg") or {}).get("model")
    if m is None:
        raise KeyError(f"{path}: a fairseq checkpoint needs 'args' or 'cfg.model' to describe the model")
    m = dict(m)
    if m.get("extractor_mode", "default") != "default" or m.get("layer_norm_first", False):
        raise ValueError(f"{path}: only wav2vec2 base layout (extractor_mode=default, layer_norm_first=False)")
    layers = _conv_layers_spec(m.get("conv_feature_layers", "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2"))
    return Wav2Vec2Config(
        conv_dim=tuple(c for c, _, _ in layers), conv_kernel=tuple(k for _, k, _ in layers),
        conv_stride=tuple(s for _, _, s in layers), conv_bias=m.get("conv_bias", False),
        hidden_size=m.get("encoder_embed_dim", 768), num_hidden_layers=m.get("encoder_layers", 12),
        num_attention_heads=m.get("encoder_attention_heads", 12),
        intermediate_size=m.get("encoder_ffn_embed_dim", 3072), num_conv_pos_embeddings=m.get("conv_pos", 128),
        num_conv_pos_embedding_groups=m.get("conv_pos_groups", 16), layerdrop=m.get("encoder_layerdrop", 0.05))


def load_wav2vec2(path: str | Path) -> Wav2Vec2Model:
    """A pretrained wav2vec2 from a local Hugging Face folder (config.json + model.safetensors or
    pytorch_model.bin), either weight-norm naming, or a fairseq checkpoint file (wav2vec_small.pt).
    Read with torch.load(weights_only=True); only argparse.Namespace is allowed beyond tensors."""
    path = Path(path)
    if path.is_dir() or path.name == "config.json" or path.suffix == ".safetensors":
        folder = path if path.is_dir() else path.parent
        cfg_file = folder / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{cfg_file} is missing; a Hugging Face model folder needs its config.json")
        cfg = Wav2Vec2Config.from_hf(json.loads(cfg_file.read_text()))
        state = _hf_state(folder)
        model = Wav2Vec2Model(cfg)
        return _copy_state(model, state, HF_RENAMES, str(folder))
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a Hugging Face folder or a fairseq .pt file")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "model" not in ckpt:
        raise KeyError(f"{path}: no 'model' state dict; is this a fairseq checkpoint?")
    cfg = _fairseq_config(ckpt, path)
    model = Wav2Vec2Model(cfg)
    return _copy_state(model, ckpt["model"], _expand(FAIRSEQ_TO_HF, len(cfg.conv_dim), cfg.num_hidden_layers),
                       str(path))
