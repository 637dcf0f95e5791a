"""model.py: the network, in plain PyTorch: the same code on every device.

Read top to bottom:
  1. ModelConfig and its presets (`base`: the papers' 150M model; `tiny`: the CPU demo)
  2. multi-head attention through scaled_dot_product_attention, with a KV cache (used by all three stacks)
  3. wav2vec2, written from scratch with Hugging Face's parameter names (loading is a key copy)
  4. loading real wav2vec2 checkpoints: Hugging Face folders/files and fairseq's wav2vec_small.pt
  5. the log-mel front end, a switch for CPU runs
  6. the ConST encoder-decoder (docs/methods.md, "the model"): length adaptor, word embeddings,
     shared encoder, decoder, and `SpeechTranslator` with the pieces the losses use
  7. generation: greedy and batched beam search with a KV cache
  8. our checkpoints: `load_checkpoint` (clear errors, weights only) and `SpeechTranslator.from_checkpoint`

Shapes: B batch, S audio samples, T frames, L tokens, D width, H heads. Tensors stay (B, T, D) with a
padding mask beside them (True on padding, data.lengths_to_padding_mask); lengths travel with tensors.
New tensors are made on the device of the tensors they meet: nothing here asks which device it runs on.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from data import EOS_ID, PAD_ID, BadInput, Missing, lengths_to_padding_mask



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
    # fairseq's, not in HF's config: the gradient into the conv feature encoder is scaled by this (0: frozen).
    # ConST builds wav2vec2 from wav2vec_small.pt's own args (0.1); load_wav2vec2 reads it from there.
    feature_grad_mult: float = 1.0
    gradient_checkpointing: bool = False

    @classmethod
    def from_hf(cls, cfg: dict) -> "Wav2Vec2Config":
        """From a Hugging Face config.json dict; only the post-LN, group-norm base layout is supported."""
        if cfg.get("feat_extract_norm", "group") != "group" or cfg.get("do_stable_layer_norm", False):
            raise BadInput("only wav2vec2 'base'-style checkpoints (feat_extract_norm='group', do_stable_layer_norm="
                           "False) are supported; this config is a 'large'-style model: use wav2vec_small.pt")
        if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("feat_extract_activation", "gelu") != "gelu":
            raise BadInput("only GELU activations are supported")
        return cls(**{f.name: tuple(cfg[f.name]) if isinstance(cfg[f.name], list) else cfg[f.name]
                      for f in fields(cls) if f.name in cfg})


@dataclass
class ModelConfig:
    """The ConST model (docs/methods.md, "The model"). Defaults are the `base` preset: the papers' model."""
    vocab_size: int = 10_000
    frontend: str = "wav2vec2"      # wav2vec2 | logmel (a CPU switch; the papers use wav2vec2)
    w2v: Wav2Vec2Config = field(default_factory=Wav2Vec2Config)
    w2v_path: str = ""              # a pretrained wav2vec2 to load (HF folder or fairseq .pt); "" = random init
    n_mels: int = 80                # log-mel front end: mel bins ...
    logmel_dim: int = 256           # ... and width after its stride-2 conv
    adaptor_channels: int = 1024    # length adaptor: Conv1d(k 5, s 2) to 2 x d_model, then GLU, twice
    adaptor_layers: int = 2
    d_model: int = 512
    n_heads: int = 8
    ffn_dim: int = 2048
    encoder_layers: int = 6         # the shared (speech and text) encoder, pre-LN
    decoder_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    max_positions: int = 4096


PRESETS = {
    "base": ModelConfig(),
    # narrowed and shallowed for a CPU: same layout, about 1/30 of the compute per utterance
    "tiny": ModelConfig(
        vocab_size=1000,
        w2v=Wav2Vec2Config(conv_dim=(64,) * 7, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=1024, num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=16,
                           layerdrop=0.0),
        adaptor_channels=512, d_model=256, n_heads=4, ffn_dim=1024, encoder_layers=4, decoder_layers=3),
}




def model_config(preset: str, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise KeyError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[preset])
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise KeyError(f"ModelConfig has no field {k!r}")
        setattr(cfg, k, v)
    return cfg


# ----------------------------------------------------------------------------------------------
# 2. Attention
# ----------------------------------------------------------------------------------------------
class MultiheadAttention(nn.Module):
    """softmax(q k^T / sqrt(d_h) + mask) v per head (Vaswani et al. 2017), through
    scaled_dot_product_attention, with Hugging Face's / fairseq's projection names.

    x (B, L, D) queries; kv (B, T, D) keys/values (None: self-attention); key_pad_mask (B, T) True on padding;
    causal: each query sees itself and the past. cache: a dict filled while decoding (self-attention appends
    each step's key and value, cross-attention computes them once). Beam search passes G = B'/B rows of
    queries per row of kv (x (B', L, D)): a sentence's beams attend to its states as G*L queries (no copies)."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, kv=None, key_pad_mask=None, causal: bool = False, cache: dict | None = None):
        heads = lambda t: rearrange(t, "b l (h d) -> b h l d", h=self.heads)
        q = heads(self.q_proj(x))
        if kv is not None and cache is not None and "k" in cache:      # cross-attention: computed once
            k, v = cache["k"], cache["v"]
        else:
            src = x if kv is None else kv
            k, v = heads(self.k_proj(src)), heads(self.v_proj(src))
            if cache is not None and kv is None and "k" in cache:      # self-attention: append this step
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            if cache is not None:
                cache["k"], cache["v"] = k, v
        mask = None if key_pad_mask is None else ~key_pad_mask[:, None, None, :]   # (B, 1, 1, T) True = may attend
        G = q.shape[0] // k.shape[0]                                    # beams per sentence (1: no beams)
        q = rearrange(q, "(b g) h l d -> b h (g l) d", g=G)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=causal and q.shape[2] > 1)   # one new query sees the whole past
        return self.out_proj(rearrange(y, "b h (g l) d -> (b g) l (h d)", g=G))


# ----------------------------------------------------------------------------------------------
# 3. wav2vec2 (Baevski et al. 2020), base layout: 7 convs -> projection -> conv positions -> post-LN Transformer
# ----------------------------------------------------------------------------------------------
def conv_out_lengths(lens: torch.Tensor, kernels, strides) -> torch.Tensor:
    """Exact output lengths of unpadded strided convolutions: floor((L - k) / s) + 1 per layer."""
    for k, s in zip(kernels, strides):
        lens = torch.div(lens - k, s, rounding_mode="floor") + 1
    return lens


def centre_over_time(x: torch.Tensor, pad_mask: torch.Tensor) -> tuple:
    """(x - mu, sigma^2), per utterance and channel over its valid frames only, in fp32 (sums over time as
    products with the valid-frame indicator). x (B, C, T), pad_mask (B, T) True on padding -> (B, C, T), (B, C, 1)."""
    with torch.autocast(x.device.type, enabled=False):
        valid = (~pad_mask)[:, :, None].float()                         # (B, T, 1)
        n = valid.sum(1, keepdim=True)
        centred = x.float() - (x.float() @ valid) / n
        return centred, (centred.square() @ valid) / n


def masked_group_norm(x: torch.Tensor, norm: nn.GroupNorm, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """wav2vec2's first-layer GroupNorm (one group per channel: a norm over time),
        y = gamma (x - mu) / sqrt(sigma^2 + eps) + beta,
    with mu and sigma^2 over each utterance's valid frames only (centre_over_time). Without padding this is
    nn.GroupNorm; with padding, a padded batch item equals its unpadded run (Hugging Face and fairseq
    include the padding in the statistics, so their outputs depend on what else is in the batch).
    x (B, C, T), pad_mask (B, T) -> (B, C, T) fp32 (as nn.GroupNorm under autocast); padded frames hold
    anything: no valid frame of the next convolution reads them."""
    assert norm.num_groups == norm.num_channels, "wav2vec2 normalises each channel on its own"
    if pad_mask is None:
        return norm(x)
    centred, var = centre_over_time(x, pad_mask)
    return torch.addcmul(norm.bias[:, None], centred, norm.weight[:, None] * torch.rsqrt(var + norm.eps))


class Wav2Vec2ConvLayer(nn.Module):
    """Conv1d (+ the valid-frame group norm in layer 0) + GELU."""

    def __init__(self, cfg: Wav2Vec2Config, i: int):
        super().__init__()
        self.conv = nn.Conv1d(cfg.conv_dim[i - 1] if i else 1, cfg.conv_dim[i], cfg.conv_kernel[i], cfg.conv_stride[i],
                              bias=cfg.conv_bias)
        if i == 0:
            self.layer_norm = nn.GroupNorm(cfg.conv_dim[0], cfg.conv_dim[0], affine=True)

    def forward(self, x: torch.Tensor, lens: torch.Tensor | None) -> torch.Tensor:   # (B, C, T) -> (B, C', T')
        x = self.conv(x)
        if hasattr(self, "layer_norm"):
            pad_mask = None if lens is None else lengths_to_padding_mask(
                conv_out_lengths(lens, self.conv.kernel_size, self.conv.stride), x.shape[-1])
            x = masked_group_norm(x, self.layer_norm, pad_mask)
        return F.gelu(x)


class Wav2Vec2FeatureEncoder(nn.Module):
    """Raw waveform (B, S) -> (B, C, T) at 20 ms per frame for the base strides. Each valid output frame
    reads valid samples only (conv_out_lengths), so padding changes no valid frame."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.conv_layers = nn.ModuleList(Wav2Vec2ConvLayer(cfg, i) for i in range(len(cfg.conv_dim)))

    def forward(self, audio: torch.Tensor, lens: torch.Tensor | None = None) -> torch.Tensor:
        x = audio[:, None]
        for layer in self.conv_layers:
            x = layer(x, lens)
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
    """Relative positions from a wide grouped convolution (kernel 128, 16 groups) with weight norm over the
    kernel axis, then GELU. (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        k = cfg.num_conv_pos_embeddings
        conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, k, padding=k // 2, groups=cfg.num_conv_pos_embedding_groups)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # an even kernel yields one frame too many: dropped
        return F.gelu(self.conv(x.transpose(1, 2))[..., :x.shape[1]]).transpose(1, 2)


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
    """Post-LN: x = LN(x + Attn(x)); x = LN(x + FFN(x)). x (B, T, D), pad_mask (B, T)."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.attention = MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.attention_dropout)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = Wav2Vec2FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(x + self.dropout(self.attention(x, key_pad_mask=pad_mask)))
        return self.final_layer_norm(x + self.feed_forward(x))


class Wav2Vec2Encoder(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        self.pos_conv_embed = Wav2Vec2PositionalConvEmbedding(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(Wav2Vec2EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), pad_mask (B, T) True on padding -> (B, T, D), 0 on padding."""
        x = x.masked_fill(pad_mask[..., None], 0.0)      # padding must not leak through the position conv
        x = self.dropout(self.layer_norm(x + self.pos_conv_embed(x)))
        for layer in self.layers:
            # LayerDrop (Fan et al. 2019); the draw stays on the host: no device round trip per layer
            if self.training and self.cfg.layerdrop > 0 and float(torch.rand(1, device="cpu")) < self.cfg.layerdrop:
                continue
            if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, pad_mask, use_reentrant=False)
            else:
                x = layer(x, pad_mask)
        return x.masked_fill(pad_mask[..., None], 0.0)


class GradMultiply(torch.autograd.Function):
    """The identity forward; the gradient times `scale` backward (fairseq's GradMultiply)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class Wav2Vec2Model(nn.Module):
    """wav2vec2 with Hugging Face's module and parameter names.

    forward(audio (B, S), lens (B,) or None) -> (states (B, T, hidden), frame lengths (B,)).
    `masked_spec_embed` is kept for a lossless key copy; ST fine-tuning here uses no time masking
    (ConST calls wav2vec2 with mask=False).
    """

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = Wav2Vec2FeatureEncoder(cfg)
        self.feature_projection = Wav2Vec2FeatureProjection(cfg)
        self.masked_spec_embed = nn.Parameter(torch.empty(cfg.hidden_size).uniform_())
        self.encoder = Wav2Vec2Encoder(cfg)

    def freeze_feature_encoder(self):
        """Fine-tuning practice: the conv feature encoder stays as pre-trained."""
        for p in self.feature_extractor.parameters():
            p.requires_grad_(False)

    def forward(self, audio: torch.Tensor, lens: torch.Tensor | None = None) -> tuple:
        lens = torch.full((len(audio),), audio.shape[1], device=audio.device) if lens is None else lens
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.feature_grad_mult > 0):   # 0: frozen
            feats = self.feature_extractor(audio, lens)
        if self.cfg.feature_grad_mult not in (0.0, 1.0):
            feats = GradMultiply.apply(feats, self.cfg.feature_grad_mult)
        feats = feats.transpose(1, 2)                                    # (B, T, C)
        out_lens = conv_out_lengths(lens, self.cfg.conv_kernel, self.cfg.conv_stride)
        pad_mask = lengths_to_padding_mask(out_lens, feats.shape[1])
        return self.encoder(self.feature_projection(feats), pad_mask), out_lens



# ----------------------------------------------------------------------------------------------
# 4. Loading real checkpoints (nothing is downloaded: pass a local path)
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
    """The table with {i} replaced by every conv layer's or Transformer layer's index."""
    return {src.format(i=i): dst.format(i=i) for src, dst in table.items()
            for i in (range(n_conv if "conv_layers" in src else n_layers) if "{i}" in src else [None])}


def _copy_state(model: Wav2Vec2Model, state: dict, rename: dict, source: str) -> Wav2Vec2Model:
    """Copy `state` into `model` through `rename`; any missing, unexpected or mis-shaped key is an error."""
    ours = model.state_dict()
    mapped = {}
    for key, value in state.items():
        if key.startswith(PRETRAINING_ONLY):
            continue
        dst = rename.get(key, key)
        if dst not in ours:
            raise BadInput(f"{source}: unexpected key {key!r} (no wav2vec2 base parameter of that name)")
        if tuple(value.shape) != tuple(ours[dst].shape):
            raise BadInput(f"{source}: key {key!r} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(ours[dst].shape)} for {dst!r}; the config does not match the weights")
        mapped[dst] = value
    if "masked_spec_embed" not in mapped:      # HF omits it when its config has no time masking
        mapped["masked_spec_embed"] = ours["masked_spec_embed"]
    missing = sorted(set(ours) - set(mapped))
    if missing:
        raise BadInput(f"{source}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(mapped, strict=True)
    return model


def _hf_state(folder: Path) -> dict:
    if (st := folder / "model.safetensors").exists():
        from safetensors.torch import load_file
        state = load_file(str(st))
    elif (binf := folder / "pytorch_model.bin").exists():
        state = torch.load(binf, map_location="cpu", weights_only=True)
    else:
        raise Missing(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    # a Wav2Vec2For* head model prefixes the backbone with 'wav2vec2.'; heads are not ours to load
    if any(k.startswith("wav2vec2.") for k in state):
        state = {k[len("wav2vec2."):]: v for k, v in state.items() if k.startswith("wav2vec2.")}
    return state


def _conv_layers_spec(src: str) -> list:
    """fairseq stores the conv stack as Python source ("[(512, 10, 5)] + [(512, 3, 2)] * 4 ..."): read each
    term as a literal list times a count; never eval() what a checkpoint carries."""
    import ast
    try:
        return [layer for term in src.split("+") for layer in
                ast.literal_eval(term.partition("*")[0].strip()) * int(term.partition("*")[2] or 1)]
    except (ValueError, SyntaxError, TypeError):
        raise BadInput(f"conv_feature_layers: unsupported expression {src[:60]!r}") from None


def _fairseq_config(ckpt: dict, path: Path) -> Wav2Vec2Config:
    args = ckpt.get("args")
    m = vars(args) if args is not None else (ckpt.get("cfg") or {}).get("model")
    if m is None:
        raise BadInput(f"{path}: a fairseq checkpoint needs 'args' or 'cfg.model' to describe the model")
    m = dict(m)
    if m.get("extractor_mode", "default") != "default" or m.get("layer_norm_first", False):
        raise BadInput(f"{path}: only wav2vec2 base layout (extractor_mode=default, layer_norm_first=False)")
    layers = _conv_layers_spec(m.get("conv_feature_layers", "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2"))
    return Wav2Vec2Config(
        conv_dim=tuple(c for c, _, _ in layers), conv_kernel=tuple(k for _, k, _ in layers),
        conv_stride=tuple(s for _, _, s in layers), conv_bias=m.get("conv_bias", False),
        hidden_size=m.get("encoder_embed_dim", 768), num_hidden_layers=m.get("encoder_layers", 12),
        num_attention_heads=m.get("encoder_attention_heads", 12),
        intermediate_size=m.get("encoder_ffn_embed_dim", 3072), num_conv_pos_embeddings=m.get("conv_pos", 128),
        num_conv_pos_embedding_groups=m.get("conv_pos_groups", 16), layerdrop=m.get("encoder_layerdrop", 0.05),
        feature_grad_mult=m.get("feature_grad_mult", 1.0))


def load_wav2vec2(path: str | Path) -> Wav2Vec2Model:
    """A pretrained wav2vec2 from a local Hugging Face folder (config.json + model.safetensors or
    pytorch_model.bin), either weight-norm naming, or a fairseq checkpoint file (wav2vec_small.pt).
    Read with torch.load(weights_only=True); only argparse.Namespace is allowed beyond tensors."""
    path = Path(path)
    if path.is_dir() or path.name in ("config.json", "pytorch_model.bin") or path.suffix == ".safetensors":
        folder = path if path.is_dir() else path.parent
        cfg_file = folder / "config.json"
        if not cfg_file.exists():
            raise Missing(f"{cfg_file} is missing; a Hugging Face model folder needs its config.json")
        model = Wav2Vec2Model(Wav2Vec2Config.from_hf(json.loads(cfg_file.read_text())))
        return _copy_state(model, _hf_state(folder), HF_RENAMES, str(folder))
    if not path.exists():
        raise Missing(f"{path} does not exist; pass a Hugging Face folder or a fairseq .pt file")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "model" not in ckpt:
        raise BadInput(f"{path}: no 'model' state dict; is this a fairseq checkpoint?")
    model = Wav2Vec2Model(cfg := _fairseq_config(ckpt, path))
    return _copy_state(model, ckpt["model"], _expand(FAIRSEQ_TO_HF, len(cfg.conv_dim), cfg.num_hidden_layers), str(path))


# ----------------------------------------------------------------------------------------------
# 5. The log-mel front end: a CPU switch with wav2vec2's frame rate (20 ms) and interface
# ----------------------------------------------------------------------------------------------
def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int = 16_000) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular filters, evenly spaced on the HTK mel scale."""
    mel = lambda f: 2595 * math.log10(1 + f / 700)
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)
    edges = torch.tensor([hz(m) for m in torch.linspace(mel(0), mel(sample_rate / 2), n_mels + 2).tolist()])
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (freqs[:, None] - lo) / (mid - lo)
    down = (hi - freqs[:, None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0)


class LogMelFrontend(nn.Module):
    """audio (B, S) -> (B, T, logmel_dim): 25 ms / 10 ms log-mel, per-utterance mean and variance
    normalisation over valid frames, one Conv1d(k 3, s 2) + GELU to 20 ms frames."""

    def __init__(self, cfg: ModelConfig, n_fft: int = 400, hop: int = 160):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("fbank", mel_filterbank(n_fft, cfg.n_mels), persistent=False)
        self.conv = nn.Conv1d(cfg.n_mels, cfg.logmel_dim, 3, stride=2, padding=1)

    def output_lengths(self, lens: torch.Tensor) -> torch.Tensor:
        frames = torch.div(lens - self.n_fft, self.hop, rounding_mode="floor") + 1
        return torch.div(frames.clamp(min=1) - 1, 2, rounding_mode="floor") + 1

    def forward(self, audio: torch.Tensor, lens: torch.Tensor) -> tuple:
        with torch.autocast(audio.device.type, enabled=False):   # spectra in fp32
            spec = torch.stft(audio.float(), self.n_fft, self.hop, window=self.window, center=False,
                              return_complex=True).abs().pow(2)  # (B, F, T)
            x = torch.log(torch.einsum("bft,fm->bmt", spec, self.fbank) + 1e-6)
            frames = (torch.div(lens - self.n_fft, self.hop, rounding_mode="floor") + 1).clamp(min=1)
            pad_mask = lengths_to_padding_mask(frames, x.shape[-1])
            centred, var = centre_over_time(x, pad_mask)
            x = (centred * torch.rsqrt(var + 1e-5)).masked_fill(pad_mask[:, None], 0.0)
        return F.gelu(self.conv(x)).transpose(1, 2), self.output_lengths(lens)


# ----------------------------------------------------------------------------------------------
# 6. The ConST encoder-decoder
# ----------------------------------------------------------------------------------------------
class LengthAdaptor(nn.Module):
    """fairseq's Conv1dSubsampler: per layer Conv1d(k 5, s 2, p 2) to 2*out channels, then GLU.
    (B, T, in) -> (B, T', d_model), T' = f(f(T)), f(L) = floor((L - 1) / 2) + 1 (stride 2: ConST §4.1)."""

    def __init__(self, in_dim: int, channels: int, out_dim: int, layers: int = 2, kernel: int = 5):
        super().__init__()
        dims = [in_dim] + [channels // 2] * (layers - 1) + [out_dim]
        self.conv_layers = nn.ModuleList(nn.Conv1d(dims[i], 2 * dims[i + 1] if i == layers - 1 else channels,
                                                   kernel, stride=2, padding=kernel // 2) for i in range(layers))

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple:
        x = x.transpose(1, 2)
        for conv in self.conv_layers:
            # zero the padding first: then a padded batch item equals its unpadded run
            x = x.masked_fill(lengths_to_padding_mask(lens, x.shape[-1])[:, None], 0.0)
            x = F.glu(conv(x), dim=1)
            lens = torch.div(lens - 1, 2, rounding_mode="floor") + 1
        return x.transpose(1, 2), lens


def masked_mean(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(B, T, D) states, (B,) lengths -> (B, D) mean over the valid positions only (ConST's pooling)."""
    valid = (~lengths_to_padding_mask(lens, x.shape[1]))[..., None].to(x.dtype)
    return (x * valid).sum(1) / lens[:, None].to(x.dtype)


def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
    """(n, d) fixed positions: sin on the first half of the channels, cos on the second (fairseq layout)."""
    half = d // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000.0) / (half - 1)))
    angle = torch.arange(n, dtype=torch.float)[:, None] * freq[None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.d_model, cfg.ffn_dim), nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)

    def forward(self, x):
        return self.fc2(self.activation_dropout(F.relu(self.fc1(x))))


class EncoderLayer(nn.Module):
    """Pre-LN: x += Attn(LN(x)); x += FFN(LN(x)). x (B, T, D), pad_mask (B, T) True on padding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = MultiheadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.self_attn_layer_norm, self.final_layer_norm = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.ffn, self.dropout = FeedForward(cfg), nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), key_pad_mask=pad_mask))
        return x + self.dropout(self.ffn(self.final_layer_norm(x)))


class DecoderLayer(nn.Module):
    """Pre-LN: causal self-attention, cross-attention to the encoder, FFN."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = MultiheadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.encoder_attn = MultiheadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.encoder_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.ffn, self.dropout = FeedForward(cfg), nn.Dropout(cfg.dropout)

    def forward(self, x, enc, enc_pad_mask, cache: dict | None = None):
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.setdefault("self", {}), cache.setdefault("cross", {})
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), causal=True, cache=self_cache))
        x = x + self.dropout(self.encoder_attn(self.encoder_attn_layer_norm(x), enc, enc_pad_mask, cache=cross_cache))
        return x + self.dropout(self.ffn(self.final_layer_norm(x)))


@dataclass
class Outputs:
    """Everything a loss may need from one forward pass. Low-level (B, T, D) states are the shared encoder's
    inputs, high-level ones its outputs; logits[task] (B, L, V) predict targets[task] (B, L) (position 0: the
    language tag); speech_subsampled (B, T, D): the length adaptor's output, the CTC head's (`ctc_states`)."""
    speech_subsampled: torch.Tensor | None = None
    speech_low: torch.Tensor | None = None
    speech_high: torch.Tensor | None = None
    speech_lens: torch.Tensor | None = None
    text_low: torch.Tensor | None = None
    text_high: torch.Tensor | None = None
    text_lens: torch.Tensor | None = None
    logits: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)


def shift_right(tokens: torch.Tensor) -> torch.Tensor:
    """Decoder input for `<lang:xx> y </s>`: `</s> <lang:xx> y` (fairseq puts </s> first)."""
    prev = torch.cat([torch.full_like(tokens[:, :1], EOS_ID), tokens[:, :-1]], dim=1)
    return prev.masked_fill(tokens == PAD_ID, PAD_ID)


class SpeechTranslator(nn.Module):
    """wav2vec2 (or log-mel) -> length adaptor -> shared encoder <- word embeddings; one decoder
    for ST, ASR and MT; one embedding matrix tied three ways (text input, decoder input, output)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.frontend == "wav2vec2":
            self.wav2vec2 = load_wav2vec2(cfg.w2v_path) if cfg.w2v_path else Wav2Vec2Model(cfg.w2v)
            self.cfg = cfg = replace(cfg, w2v=self.wav2vec2.cfg)      # checkpoints record what was loaded
            front_dim = self.wav2vec2.cfg.hidden_size
        elif cfg.frontend == "logmel":
            self.logmel = LogMelFrontend(cfg)
            front_dim = cfg.logmel_dim
        else:
            raise ValueError(f"frontend must be 'wav2vec2' or 'logmel', not {cfg.frontend!r}")
        self.subsample = LengthAdaptor(front_dim, cfg.adaptor_channels, cfg.d_model, cfg.adaptor_layers)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=PAD_ID)
        nn.init.normal_(self.embed_tokens.weight, 0, cfg.d_model ** -0.5)
        with torch.no_grad():
            self.embed_tokens.weight[PAD_ID].zero_()
        self.register_buffer("positions", sinusoidal_positions(cfg.max_positions, cfg.d_model), persistent=False)
        self.embed_scale = math.sqrt(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.encoder_layer_norm = nn.LayerNorm(cfg.d_model)
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.decoder_layer_norm = nn.LayerNorm(cfg.d_model)

    @classmethod
    def from_checkpoint(cls, ckpt: "str | Path | dict") -> "SpeechTranslator":
        """The architecture and weights of one of train.py's checkpoints: a path, or the dict that
        `load_checkpoint` (section 8) returned."""
        ckpt = ckpt if isinstance(ckpt, dict) else load_checkpoint(ckpt)
        model = cls(model_config_from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        return model

    def freeze_wav2vec2(self, frozen: bool = True):
        """Fine-tuning recipes keep all of wav2vec2 fixed for the first N updates (train.py calls this at step
        0 and N); the conv feature encoder can stay frozen for good (`wav2vec2.freeze_feature_encoder()`)."""
        for p in self.wav2vec2.parameters():
            p.requires_grad_(not frozen)

    def _embed(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x * sqrt(d) + sinusoidal positions + dropout: ConST's low-level representation."""
        return self.dropout(x * self.embed_scale + self.positions[offset:offset + x.shape[1]].to(x.dtype))

    def subsample_speech(self, audio: torch.Tensor, lens: torch.Tensor) -> tuple:
        """audio (B, S), lens (B,) -> the length adaptor's output (B, T, D) and its lengths (B,)."""
        if self.cfg.frontend == "wav2vec2":
            x, lens = self.wav2vec2(audio, lens)
        else:
            x, lens = self.logmel(audio, lens)
        return self.subsample(x, lens)

    def encode_speech(self, audio: torch.Tensor, lens: torch.Tensor) -> tuple:
        """audio (B, S), lens (B,) -> low-level speech states (B, T, D) and their lengths (B,)."""
        x, lens = self.subsample_speech(audio, lens)
        return self._embed(x), lens

    def ctc_states(self, subsampled: torch.Tensor) -> torch.Tensor:
        """The input of ConST's `ctc_cnn` head (docs/methods.md): the length adaptor's output x sqrt(d) with
        its own dropout and no positions, as the released code's `compute_ctc_logit_and_logprob`
        (positions would add a per-frame bias to every token's logit). (B, T, D) -> (B, T, D)."""
        return self.dropout(subsampled * self.embed_scale)

    def encode_text(self, tokens: torch.Tensor, lens: torch.Tensor) -> tuple:
        """tokens (B, L) `<lang:en> x </s>` -> low-level text states (B, L, D) and lengths."""
        return self._embed(self.embed_tokens(tokens)), lens

    def encode(self, states: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """The shared encoder: (B, T, D) low-level states -> (B, T, D) high-level states (0 on padding)."""
        pad_mask, x = lengths_to_padding_mask(lens, states.shape[1]), states
        for layer in self.encoder_layers:
            x = layer(x, pad_mask)
        return self.encoder_layer_norm(x).masked_fill(pad_mask[..., None], 0.0)

    def decode(self, prev_tokens: torch.Tensor, enc: torch.Tensor, enc_lens: torch.Tensor,
               cache: list | None = None, offset: int = 0) -> torch.Tensor:
        """prev_tokens (B, L) -> logits (B, L, V). With `cache` (a list, one dict per layer, filled
        here), pass only the new tokens and their position `offset`."""
        pad_mask = lengths_to_padding_mask(enc_lens, enc.shape[1])
        x = self._embed(self.embed_tokens(prev_tokens), offset)
        for i, layer in enumerate(self.decoder_layers):
            if cache is not None and len(cache) <= i:
                cache.append({})
            x = layer(x, enc, pad_mask, None if cache is None else cache[i])
        return F.linear(self.decoder_layer_norm(x), self.embed_tokens.weight)   # tied output projection

    def forward(self, batch, tasks=("st", "asr", "mt"), reencode_asr: bool = True) -> Outputs:
        """Run the tasks on one batch (data.Batch). ASR encodes the speech a second time, with
        fresh dropout, as ConST does (docs/methods.md); `reencode_asr=False` reuses the ST pass.
        The tasks' decoder passes run as one pass over their rows stacked (`decode_stacked`)."""
        out, jobs = Outputs(), {}
        if "st" in tasks or "asr" in tasks:
            out.speech_subsampled, out.speech_lens = self.subsample_speech(batch.audio, batch.audio_lens)
            out.speech_low = self._embed(out.speech_subsampled)
            out.speech_high = self.encode(out.speech_low, out.speech_lens)
        if "st" in tasks:
            jobs["st"] = (batch.tgt, out.speech_high, out.speech_lens)
        if "asr" in tasks:
            enc = out.speech_high
            if reencode_asr and "st" in tasks:
                enc = self.encode(*self.encode_speech(batch.audio, batch.audio_lens))
            jobs["asr"] = (batch.src, enc, out.speech_lens)
        if "mt" in tasks:
            out.text_low, out.text_lens = self.encode_text(batch.src, batch.src_lens)
            out.text_high = self.encode(out.text_low, out.text_lens)
            jobs["mt"] = (batch.tgt, out.text_high, out.text_lens)
        out.logits = self.decode_stacked({task: (shift_right(y), enc, lens) for task, (y, enc, lens) in jobs.items()})
        out.targets = {task: y for task, (y, _, _) in jobs.items()}
        return out

    def decode_stacked(self, jobs: dict) -> dict:
        """{task: (prev_tokens (B_i, L_i), enc (B_i, T_i, D), enc_lens (B_i,))} -> {task: logits (B_i, L_i, V)},
        in ONE decoder pass over the rows of every task stacked: fewer, larger products than three passes.
        Right-padding changes no valid position: self-attention is causal and cross-attention masks the
        padded encoder states."""
        L, T = max(p.shape[1] for p, _, _ in jobs.values()), max(e.shape[1] for _, e, _ in jobs.values())
        logits = self.decode(torch.cat([F.pad(p, (0, L - p.shape[1]), value=PAD_ID) for p, _, _ in jobs.values()]),
                             torch.cat([F.pad(e, (0, 0, 0, T - e.shape[1])) for _, e, _ in jobs.values()]),
                             torch.cat([lens for _, _, lens in jobs.values()]))
        rows = logits.split([p.shape[0] for p, _, _ in jobs.values()])
        return {task: r[:, :p.shape[1]] for (task, (p, _, _)), r in zip(jobs.items(), rows)}

    # ------------------------------------------------------------------------------------------
    # 7. Generation
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _reorder(cache: list, order: torch.Tensor):
        """Follow the surviving beams: `order` picks rows of the same sentence only, and a sentence's beams
        share its encoder states, so the cross-attention keys and values stay as they are (no copies)."""
        for layer in cache:
            for k in layer["self"]:
                layer["self"][k] = layer["self"][k].index_select(0, order)

    def greedy(self, enc: torch.Tensor, enc_lens: torch.Tensor, lang_id: int, max_len_a: float = 1.2,
               max_len_b: int = 10) -> list:
        """Greedy search: the most likely token at every step, which is beam search with one beam."""
        return self.generate(enc, enc_lens, lang_id, beam=1, max_len_a=max_len_a, max_len_b=max_len_b)

    @torch.no_grad()
    def generate(self, enc: torch.Tensor, enc_lens: torch.Tensor, lang_id: int, beam: int = 5,
                 max_len_a: float = 1.2, max_len_b: int = 10, len_penalty: float = 1.0,
                 use_cache: bool = True) -> list:
        """Translate encoder states (B, T, D) into token lists (tag and </s> stripped).

        The decoder starts from `</s> <lang:xx>` (the tag is forced), and stops at `</s>` or at
        `max_len_a * T_i + max_len_b` tokens. Hypotheses are ranked by log-probability divided
        by length ** len_penalty. beam=1 is greedy search."""
        B, K, device = enc.shape[0], beam, enc.device      # enc stays (B, T, D): the K beams of a sentence share it
        max_lens = (max_len_a * enc_lens.float() + max_len_b).long().clamp(max=self.cfg.max_positions - 2)
        force_at = max_lens.repeat_interleave(K)                                     # (B*K,)
        tokens = torch.tensor([EOS_ID, lang_id], device=device).repeat(B * K, 1)   # (B*K, 2)
        scores = torch.full((B, K), float("-inf"), device=device)
        scores[:, 0] = 0.0                                 # all beams start identical: keep one
        eos_only = torch.full((self.cfg.vocab_size,), float("-inf"), device=device)
        eos_only[EOS_ID] = 0.0
        cache, finished, done = [] if use_cache else None, [[] for _ in range(B)], [False] * B
        for step in range(int(max_lens.max()) + 1):
            new = tokens[:, -1:] if use_cache and step > 0 else tokens        # with the cache: the new token only
            logits = self.decode(new, enc, enc_lens, cache, offset=tokens.shape[1] - new.shape[1])[:, -1]
            logp = F.log_softmax(logits.float(), dim=-1)                      # (B*K, V)
            logp[tokens.shape[1] - 1 >= force_at] = eos_only                  # out of length: must end
            logp[:, PAD_ID] = float("-inf")
            V = logp.shape[1]
            top_scores, top_idx = (scores.view(B * K, 1) + logp).view(B, K * V).topk(2 * K, dim=1)   # (B, 2K)
            # the bookkeeping in Python lists: one copy of the candidates per step, not one .item() per number
            new_scores = [[float("-inf")] * K for _ in range(B)]
            new_src, new_tok = [[b * K] * K for b in range(B)], [[PAD_ID] * K for _ in range(B)]
            for b, (s_b, i_b) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
                kept = 0
                for s, i in zip(s_b, i_b):
                    if done[b] or kept == K or s == float("-inf"):
                        break
                    if i % V == EOS_ID:                    # a finished hypothesis, scored with its </s>
                        hyp = tokens[b * K + i // V, 2:].tolist()
                        finished[b].append((s / (len(hyp) + 1) ** len_penalty, hyp))
                    else:
                        new_scores[b][kept], new_src[b][kept], new_tok[b][kept] = s, b * K + i // V, i % V
                        kept += 1
                done[b] = done[b] or len(finished[b]) >= K or kept == 0
            if all(done):
                break
            order = torch.tensor(new_src, device=device).view(-1)
            tokens = torch.cat([tokens.index_select(0, order), torch.tensor(new_tok, device=device).view(-1, 1)], 1)
            scores = torch.tensor(new_scores, device=device)
            if use_cache:
                self._reorder(cache, order)
        return [max(f)[1] if f else [] for f in finished]


# ----------------------------------------------------------------------------------------------
# 8. Our own checkpoints: train.py writes them (atomically), this reads them and rebuilds the model
# ----------------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path) -> dict:
    """One of train.py's checkpoints as a dict, read with `weights_only=True`: a file that needs
    arbitrary Python objects to unpickle is refused, never executed. Every failure a user can cause
    (missing, truncated, corrupt, unsafe, foreign) is a `UserError` that names the file and what to do."""
    path = Path(path)
    siblings = ", ".join(sorted(p.name for p in path.parent.glob("*.pt") if p != path)) if path.parent.is_dir() else ""
    elsewhere = f"; other checkpoints in {path.parent}: {siblings}" if siblings else ""
    if not path.is_file():
        raise Missing(f"checkpoint {path} does not exist{elsewhere}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every unreadable file gets the same one-line answer
        text = str(err)
        if "Unsupported global" in text or "GLOBAL " in text:   # a pickle that names Python callables
            raise BadInput(f"{path}: refused: it is not a plain tensor checkpoint (unpickling it would run Python "
                           f"code it names, an unsafe pickle); only train.py's checkpoints are read here") from None
        raise BadInput(f"{path}: truncated or corrupt ({type(err).__name__}: {text.splitlines()[0][:80] if text else ''})"
                       f"{elsewhere or '; no other checkpoint is in its folder'}") from None
    missing = [k for k in ("model", "config", "model_config", "vocab", "step") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise BadInput(f"{path}: not a checkpoint of train.py (no {missing[0]!r})")
    return ckpt


def model_config_from_dict(mcfg: dict) -> ModelConfig:
    w2v = Wav2Vec2Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in mcfg["w2v"].items()})
    return ModelConfig(**{**mcfg, "w2v": w2v, "w2v_path": ""})   # the weights come from the checkpoint
