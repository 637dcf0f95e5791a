"""model.py: the network.

Read top to bottom:
  1. ModelConfig and its presets (`base`: the papers' 150M model; `tiny`: the CPU demo)
  2. wav2vec2, written from scratch with Hugging Face's parameter names (loading is a key copy)
  3. loading real wav2vec2 checkpoints: Hugging Face folders/files and fairseq's wav2vec_small.pt
  4. the log-mel front end, a switch for CPU runs
  5. the ConST encoder-decoder (METHODS §1.3): length adaptor, word embeddings, shared encoder,
     decoder, and `SpeechTranslator` with the pieces the losses use
  6. generation: greedy and batched beam search with a KV cache
  7. our checkpoints: `load_checkpoint` (clear errors, weights only) and `SpeechTranslator.from_checkpoint`

Shapes: B batch, S audio samples, T frames, D width. Lengths travel with tensors; padding masks
are True on padding (data.lengths_to_padding_mask).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data import EOS_ID, PAD_ID, BadInput, Missing, lengths_to_padding_mask

# MKL picks its sgemm kernel by thread count for some shapes (a (10, 10) @ (10, 256) product rounds
# differently on 1 and 2 threads); its strict reproducible mode does not. Read at MKL's first call, so
# here, before any matrix product. See CPU_THREAD_INVARIANT below.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


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
    # fairseq's, not in HF's config: the gradient into the convolutional feature encoder is scaled by this (0:
    # the encoder is frozen). ConST builds wav2vec2 from wav2vec_small.pt's own args, which carry the base
    # pre-training value 0.1 (METHODS §1.3); load_wav2vec2 reads it from a fairseq checkpoint's args.
    feature_grad_mult: float = 1.0
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


@dataclass
class ModelConfig:
    """The ConST model (METHODS §1.3). Defaults are the `base` preset: the papers' model."""
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
    import copy
    cfg = copy.deepcopy(PRESETS[preset])
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise KeyError(f"ModelConfig has no field {k!r}")
        setattr(cfg, k, v)
    return cfg


# Dropout with its mask drawn from 16-bit random integers on a CPU: torch's bernoulli_ (behind nn.Dropout and
# SDPA's dropout_p) costs 4x as much per element as torch.rand, and torch.rand 2.5x as much as four 16-bit
# lanes of one random 64-bit word; the mask and its scale as one tensor make forward and backward one pass
# each. Dropout went from 9 % of a tiny training step to ~2 % (bench.py --only train_step). The drop
# probability is p rounded to a multiple of 2^-16 (0.1 -> 0.100006), the scale 1 / (1 - that): unbiased.
CPU_RAND_DROPOUT = True        # bench.py flips it to time torch's own dropout


def keep_mask(shape, p: float, device=None) -> tuple:
    """(bool mask, True with probability 1 - p', scale 1 / (1 - p')), p' = round(p * 2^16) / 2^16: a 16-bit
    lane of a full-range random 64-bit word is uniform over the int16 values; drop the lowest p' of them."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    dropped = round(p * 65536)
    return (words.view(torch.int16)[:n] >= dropped - 32768).view(shape), 65536 / (65536 - dropped)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not CPU_RAND_DROPOUT or p >= 1.0:
        return F.dropout(x, p, True)
    keep, scale = keep_mask(x.shape, p, x.device)
    if x.dtype == torch.float32:
        return x * (keep * scale)                      # one mask tensor: one pass forward, one backward
    return x * keep.to(x.dtype) * scale              # in bf16, scale in fp32 arithmetic (not rounded to bf16)


class Dropout(nn.Dropout):
    """nn.Dropout (same attribute p, no parameters) through dropout() above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(q, k, v, mask=None, causal: bool = False, p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with dropout p on the weights; q (B, H, L, d), k, v (B, H, T, d),
    mask (B, 1, 1, T) True where a key may be attended. On a CPU the math is spelled out when training
    (p > 0: so that its dropout is the cheap one above) and in bf16 (below); otherwise
    scaled_dot_product_attention."""
    cpu = q.device.type == "cpu"
    if not (cpu and ((p > 0.0 and CPU_RAND_DROPOUT) or (q.dtype == torch.bfloat16 and BF16_CPU_MATH_ATTENTION))):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))       # in place: the product is not needed for its backward
    if causal:
        L, T = scores.shape[-2:]
        scores.masked_fill_(torch.ones(L, T, dtype=torch.bool, device=q.device).triu(T - L + 1), float("-inf"))
    fp32 = scores.dtype == torch.float32 and CPU_THREAD_INVARIANT
    weights = _InvariantSoftmax.apply(scores) if fp32 else scores.softmax(-1)
    return dropout(weights, p, True) @ v


class _InvariantSoftmax(torch.autograd.Function):
    """softmax over the last axis; its backward on one thread (fp32's differs between 1 and 2 threads, below)."""

    @staticmethod
    def forward(ctx, x):
        y = x.softmax(-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        y, = ctx.saved_tensors
        with one_thread():
            return torch._softmax_backward_data(g, y, -1, y.dtype)


# torch 2.13's CPU flash kernel is slow in bf16: its backward 2-6x slower than the math path at the tiny model's
# shapes (bench.py --only attention), and its forward 1.5x (wav2vec2 base, 4 x 150 frames: 4.3 vs 2.9 ms a
# layer) to 2x (one beam-search query over 12 cached keys: 168 vs 87 us). So bf16 on a CPU spells the math out
# (the same values to rounding); fp32 keeps the flash kernel, which is the faster one there (3.9 vs 5.0 ms).
BF16_CPU_MATH_ATTENTION = True


# Thread-count invariance on a CPU: the weight gradients of torch's LayerNorm and oneDNN's convolution
# split their sums over positions among the threads, and fp32 softmax's backward takes another path on
# one thread, so one and two threads round differently and, over the main job's 1600 steps, train apart
# (ST BLEU 44.31 on one core, 43.66 on two). So on a CPU these three run on ONE thread whatever the
# thread count (everything else already rounds the same on any number: matrix products, with MKL in
# strict mode above, and the per-row kernels): the same weights after training on 1 or 2 threads
# (tests/test_train.py), at no cost on one thread and 7 % of a step on two (bench.py --only train_step).
CPU_THREAD_INVARIANT = True        # bench.py flips it to time torch's own kernels


@contextmanager
def one_thread():
    """Run the block on one intra-op thread (no-op where there is only one)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _split_grads(grads) -> tuple:
    """grads(mask) -> (d_input, d_weight, d_bias) of a fused backward kernel: the input gradient on every
    thread (per row: invariant), the weight and bias gradients (sums over rows) on one."""
    if torch.get_num_threads() == 1:
        return grads([True, True, True])
    dx = grads([True, False, False])[0]
    with one_thread():
        _, dw, db = grads([False, True, True])
    return dx, dw, db


class _InvariantLayerNorm(torch.autograd.Function):
    """torch's layer norm; the weight and bias gradients (sums over rows) on one thread."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = torch.native_layer_norm(x, weight.shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        return *_split_grads(lambda mask: torch.ops.aten.native_layer_norm_backward(
            g, x, weight.shape, mean, rstd, weight, bias, mask)), None


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, names and values); on a CPU, _InvariantLayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not CPU_THREAD_INVARIANT or not torch.is_grad_enabled():
            return super().forward(x)
        return _InvariantLayerNorm.apply(x, self.weight, self.bias, self.eps)


# A CPU's matrix products of activations and weights run in oneDNN (torch's mkldnn ops), not MKL. In fp32, MKL
# reaches 112 GFLOP/s on this machine's AMD core (MKL is known to take slower paths on non-Intel processors),
# oneDNN 248 for the same (800, 768) @ (768, 3072) product, and as much again for each of the backward's two
# products: a fp32 step of ours ~2x faster in its linear layers (bench.py --only linear). bf16 products with
# gradients already reach oneDNN through torch. Without gradients (decoding), a kept copy of the weight in the
# compute dtype, packed into oneDNN's blocked layout: with few rows (a beam-search step: 20) reading the weight
# costs as much as multiplying, and the packed copy reads faster: 131 -> 95 us for (20, 512) @ (512, 2048) in
# bf16, 249 -> 178 in fp32; in bf16 the kept copy also spares autocast's cast of every weight in every autocast
# region (~25 ms of a base beam search). The copy is keyed on the weight's data pointer and version (like the
# positional convolution's spectrum below): an optimiser step makes a new one. fp32 keeps copies for products
# of at most PACKED_ROWS rows only (the decoder's steps): an encoder's hundreds of rows gain 2-6 % from packing,
# not worth a second fp32 copy of its weights. Memory: a bf16 copy of the linear weights (~190 MB at base) while
# the model decodes; a weight that is trained again lets its copy go.
CPU_ONEDNN_LINEAR = True
PACKED_ROWS = 64
_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
           and platform.machine().lower() in ("x86_64", "amd64"))    # measured on x86 only
_PACKED = torch.utils.weak.WeakIdKeyDictionary()     # weight -> (key, packed weight, bias in its dtype)


def weights_key(*tensors) -> tuple:
    """What identifies the values of these tensors (None skipped) for a cache kept while they stay: storage,
    version (bumped by every in-place update: an optimiser step, load_state_dict), device and dtype."""
    return tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors if t is not None)


def _onednn_mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T + b (N,) in oneDNN; w plain or packed."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """F.linear in fp32 with its three products in oneDNN: y = x W^T + b, dx = g W, dW = g^T x, db = sum g."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _onednn_mm(g2, w.t()).view(*g.shape[:-1], w.shape[1])
        if ctx.needs_input_grad[1]:
            gw = _onednn_mm(g2.t(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); on a CPU through oneDNN (above), the same values to rounding."""
    if x.device.type != "cpu" or not CPU_ONEDNN_LINEAR or not _ONEDNN or x.numel() == 0:
        return F.linear(x, weight, bias)
    dt = cpu_compute_dtype(x)
    if dt not in (torch.float32, torch.bfloat16):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        if _PACKED:
            _PACKED.pop(weight, None)        # trained from here on: a kept copy would only hold memory
        return F.linear(x, weight, bias) if dt == torch.bfloat16 else _OneDNNLinear.apply(x, weight, bias)
    if dt == torch.bfloat16 or x.numel() <= PACKED_ROWS * x.shape[-1]:
        key = (weights_key(weight, bias), dt)
        kept = _PACKED.get(weight)
        if kept is None or kept[0] != key:
            kept = _PACKED[weight] = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dt)),
                                      None if bias is None else bias.detach().to(dt))
        return _onednn_mm(x.to(dt), kept[1], kept[2])
    return _onednn_mm(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and values) through linear() above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class _InvariantConv1d(torch.autograd.Function):
    """torch's convolution (cast as autocast would); the weight and bias gradients on one thread."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        if torch.is_autocast_enabled("cpu"):
            dt = torch.get_autocast_dtype("cpu")
            x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt)
        with torch.autocast("cpu", enabled=False):
            y = F.conv1d(x, weight, bias, stride, padding)
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        return *_split_grads(lambda mask: torch.ops.aten.convolution_backward(
            g, x, weight, [weight.shape[0]], ctx.stride, ctx.padding, [1], False, [0], 1, mask)), None, None


class Conv1d(nn.Conv1d):
    """nn.Conv1d (same parameters, names and values); on a CPU, _InvariantConv1d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or not CPU_THREAD_INVARIANT or not torch.is_grad_enabled() or self.groups != 1
                or self.dilation != (1,) or self.bias is None or isinstance(self.padding, str)):
            return super().forward(x)
        return _InvariantConv1d.apply(x, self.weight, self.bias, self.stride, self.padding)


class Packed:
    """The valid rows of a padded batch (B, T, ...) as one matrix (N, ...), N = the number of valid frames.
    Token-wise layers (projections, feed-forward, layer norm, dropout) then do no work on padding (a
    quarter of the frames of a batch of 1.6-3 s utterances); attention, which needs the (B, T) layout,
    unpacks its queries, keys and values and packs its output. pad_mask (B, T) True on padding; None (or
    no True): no padding, and pack / unpack are reshapes."""

    def __init__(self, pad_mask: torch.Tensor | None, B: int, T: int):
        pad_mask = pad_mask if pad_mask is not None and bool(pad_mask.any()) else None
        self.pad_mask, self.B, self.T = pad_mask, B, T
        self.index = None if pad_mask is None else (~pad_mask).flatten().nonzero().squeeze(1)

    @functools.cached_property
    def lengths(self) -> list:                                  # rows of each sequence (read on demand: a sync)
        return [self.T] * self.B if self.pad_mask is None else (~self.pad_mask).sum(1).tolist()

    def pack(self, x: torch.Tensor) -> torch.Tensor:          # (B, T, ...) -> (N, ...)
        x = x.flatten(0, 1)
        return x if self.index is None else x.index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:        # (N, ...) -> (B, T, ...), 0 on padding
        if self.index is not None:
            x = x.new_zeros(self.B * self.T, *x.shape[1:]).index_copy(0, self.index, x)
        return x.unflatten(0, (self.B, self.T))


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
    if pad_mask is None or not pad_mask.any():
        return norm(x)                             # the fused kernel (fp32 under autocast)
    # Each utterance through the fused kernel on its valid frames (one pass; a masked mean and variance
    # spelled out took ten over the batch, 35 % of a tiny wav2vec2 step). Padded frames become 0: no
    # valid output of the next conv reads them (its windows lie inside the valid frames, conv_out_lengths).
    T = x.shape[-1]
    with torch.autocast(x.device.type, enabled=False):
        parts = [F.pad(F.group_norm(xb[..., :n].float(), norm.num_groups, norm.weight, norm.bias, norm.eps), (0, T - n))
                 for xb, n in zip(x.split(1), (~pad_mask).sum(-1).tolist())]      # split: one gradient copy back
    return torch.cat(parts).to(x.dtype)


class Wav2Vec2ConvLayer(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config, i: int):
        super().__init__()
        c_in = cfg.conv_dim[i - 1] if i > 0 else 1
        self.conv = nn.Conv1d(c_in, cfg.conv_dim[i], cfg.conv_kernel[i], cfg.conv_stride[i], bias=cfg.conv_bias)
        if i == 0:
            self.layer_norm = nn.GroupNorm(cfg.conv_dim[0], cfg.conv_dim[0], affine=True)


# In bf16 on a CPU the feature encoder runs the batch as ONE sequence: the utterances one after another, each at
# its own length rounded up to a multiple of the strides' product (320 samples, 20 ms, at base). Every layer's
# stride then divides every utterance's length, so utterance b's frames stay a contiguous block at each layer,
# and only its block's last frame reads into the next utterance (a padding frame: past its conv_out_lengths).
# No work goes to the batch's padding (a quarter of a batch of 2-4 s utterances), and the convolutions
# (kernel K, stride s, s <= K <= 2s) run as matrix products on channels-last frames. With x (N, Ci), N = s n,
#   y[t] = b + sum_k W_k x[s t + k] = x.view(n, s Ci)[t] @ W_{0..s-1} + x.view(n, s Ci)[t + 1, :(K - s) Ci] @ W_{s..K-1}
# (the second a strided view of the same memory: no copy, no im2col); oneDNN's bf16 convolution reaches
# 300-375 GFLOP/s on one core at these shapes (forward + backward), the products 425-505. In fp32 oneDNN's
# convolution, per utterance, beats both MKL's products here (base 4 x 2-4 s: 1.27 vs 1.83 s) and itself over
# one long sequence (4x slower at 64 channels x 195k frames than over 26 pieces of 7.5k), so fp32 keeps it.
# `bench.py --only feature_conv` times the bf16 path against F.conv1d.
CPU_MATMUL_CONV = True          # False: F.conv1d in bf16 too
CPU_PER_UTTERANCE_CONV = True   # False: F.conv1d over the batch on a CPU too (what a GPU runs)


def cpu_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a CPU matrix product on x runs in: autocast's when it is on, else x's own."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


class StridedConv1dMatmul(torch.autograd.Function):
    """x (N, Ci), N a multiple of s; weight (Co, Ci, K); bias (Co,) or None -> y (N / s, Co):
    F.conv1d(x.T, weight, bias, stride=s, padding=(0, K - s)).T (zeros after the end), in the autocast
    dtype when autocast is on."""

    @staticmethod
    def forward(ctx, x, weight, bias, s):
        Co, Ci, K = weight.shape
        assert s <= K <= 2 * s and x.shape[0] % s == 0, "a window spans its row of s frames and at most the next"
        dt = cpu_compute_dtype(x)
        rows = x.to(dt).contiguous().view(-1, s * Ci)                       # (N / s, s Ci)
        w = weight.to(dt).permute(2, 1, 0).reshape(K * Ci, Co)              # row k Ci + i = W[:, i, k]
        with torch.autocast("cpu", enabled=False):
            y = rows @ w[:s * Ci] if bias is None else torch.addmm(bias.to(dt), rows, w[:s * Ci])
            if K > s:
                y[:-1].addmm_(rows[1:, :(K - s) * Ci], w[s * Ci:])
        ctx.save_for_backward(rows, w)
        ctx.s, ctx.K, ctx.has_bias, ctx.w_dtype = s, K, bias is not None, weight.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        rows, w = ctx.saved_tensors
        s, K = ctx.s, ctx.K
        Ci, Co, d = rows.shape[1] // s, w.shape[1], (K - s) * rows.shape[1] // s
        g = g.to(rows.dtype)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g @ w[:s * Ci].t()
            if K > s:   # the next row's first K - s frames were read by this row's window too: add
                gx[1:, :d] += g[:-1] @ w[s * Ci:].t()
            gx = gx.view(-1, Ci)
        if ctx.needs_input_grad[1]:
            gw = rows.t() @ g if K == s else torch.cat([rows.t() @ g, rows[1:, :d].t() @ g[:-1]])
            gw = gw.view(K, Ci, Co).permute(2, 1, 0).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0).to(ctx.w_dtype)
        return gx, gw, gb, None


class Wav2Vec2FeatureEncoder(nn.Module):
    """Raw waveform (B, S) -> (B, C, T) at 20 ms per frame for the base strides."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        self.conv_layers = nn.ModuleList(Wav2Vec2ConvLayer(cfg, i) for i in range(len(cfg.conv_dim)))

    def forward(self, audio: torch.Tensor, lens: torch.Tensor | None = None) -> torch.Tensor:
        if audio.device.type == "cpu" and CPU_MATMUL_CONV and torch.is_autocast_enabled("cpu"):
            return self._one_sequence(audio, lens)
        return self._convolutions(audio, lens)

    def _convolutions(self, audio: torch.Tensor, lens: torch.Tensor | None) -> torch.Tensor:
        """F.conv1d: on a CPU in fp32, the long early layers one utterance at a time; on a GPU every layer
        over the batch, as Hugging Face runs them."""
        # On a CPU, one utterance at a time: oneDNN runs these convolutions (forward and backward) 1.7x faster
        # over one padded utterance than over the batch at the tiny shapes in fp32, 1.1-1.2x at the others
        # (measured in the closing note of issue 11). Every utterance keeps the batch's padded length, so no new
        # kernels are built per utterance (with own lengths, 26 utterances overflow oneDNN's primitive cache and
        # the tiny step runs 2x slower).
        mask = None
        if lens is not None and bool((lens < audio.shape[1]).any()):
            mask = lengths_to_padding_mask(conv_out_lengths(lens, self.cfg.conv_kernel[:1], self.cfg.conv_stride[:1]),
                                           conv_out_lengths(torch.tensor(audio.shape[1]), self.cfg.conv_kernel[:1],
                                                            self.cfg.conv_stride[:1]).item())
        # The short late layers run better over the whole batch (oneDNN on one utterance of a few hundred
        # frames is mostly overhead): from the first layer whose batch output is at most 2M numbers on.
        B, S, cfg = audio.shape[0], torch.tensor(audio.shape[1]), self.cfg
        outputs = [B * cfg.conv_dim[i] * conv_out_lengths(S, cfg.conv_kernel[:i + 1], cfg.conv_stride[:i + 1]).item()
                   for i in range(len(cfg.conv_dim))]
        n_apart = next((i for i in range(1, len(outputs)) if outputs[i] <= 2_000_000), len(outputs))
        n_apart = n_apart if audio.device.type == "cpu" and CPU_PER_UTTERANCE_CONV else 0
        x = audio[:, None]
        if n_apart:
            parts, first = [], self.conv_layers[0]
            K, s = first.conv.kernel_size[0], first.conv.stride[0]
            valid = conv_out_lengths(torch.full((B,), audio.shape[1]) if lens is None else lens.cpu(), (K,), (s,))
            dt = cpu_compute_dtype(audio)
            for b, a in enumerate(audio):
                win = a.unfold(0, K, s)                                   # (T, K): F.conv1d's windows
                bias, w = fold_first_layer(first, win, int(valid[b]))     # layer 0 and its norm as one product
                with torch.autocast("cpu", enabled=False):
                    x = F.gelu(torch.addmm(bias.to(dt)[:, None], w.t().to(dt), win.t().to(dt)))[None]  # (1, C, T)
                for layer in self.conv_layers[1:n_apart]:
                    x = F.gelu(layer.conv(x))
                parts.append(x)
            x = torch.cat(parts)
        for i, layer in enumerate(self.conv_layers[n_apart:], n_apart):
            x = layer.conv(x)
            if i == 0:
                x = masked_group_norm(x, layer.layer_norm, mask)
            x = F.gelu(x)
        return x

    def _one_sequence(self, audio: torch.Tensor, lens: torch.Tensor | None) -> torch.Tensor:
        """The CPU path in bf16 (above): the batch as one sequence of channels-last frames through
        StridedConv1dMatmul. Returns (B, C, T), a transposed view, T = conv_out_lengths(S) as F.conv1d on
        the batch gives; frames past an utterance's own conv_out_lengths hold anything (they are padding)."""
        B, S = audio.shape
        cfg, first = self.cfg, self.conv_layers[0]
        hop = math.prod(cfg.conv_stride)
        lens = torch.full((B,), S) if lens is None else lens.cpu()
        own = ((lens + hop - 1) // hop * hop).tolist()                   # samples per utterance, hop-aligned
        audio = F.pad(audio, (0, max(own) - S)) if max(own) > S else audio
        valid = conv_out_lengths(lens, cfg.conv_kernel[:1], cfg.conv_stride[:1]).tolist()
        x = first_layer_folded(first, audio, own, valid)                  # (N / 5, C)
        grad = torch.is_grad_enabled()
        for layer in self.conv_layers[1:]:
            x = StridedConv1dMatmul.apply(x, layer.conv.weight, layer.conv.bias, layer.conv.stride[0])
            x = F.gelu(x) if grad else torch.ops.aten.gelu_(x)            # decoding: no new 10-35 MB tensor
        T = conv_out_lengths(torch.tensor(S), cfg.conv_kernel, cfg.conv_stride).item()
        parts = x.split([n // hop for n in own])
        return torch.stack([F.pad(p[:T], (0, 0, 0, T - min(len(p), T))) for p in parts]).transpose(1, 2)


def fold_first_layer(layer: "Wav2Vec2ConvLayer", win: torch.Tensor, valid: int) -> tuple:
    """wav2vec2's first layer, GroupNorm(conv(x)) (one input channel, one group per channel: a norm over each
    utterance's time), as ONE affine map of the sample windows: the norm folded into the weights. With x_t the
    window (K samples) of frame t, mu and Sigma their mean and covariance over the valid frames, a channel's
    output w.x_t + b has mean w.mu + b and variance w' Sigma w, so
        gamma (w.x_t + b - mean) / sqrt(var + eps) + beta = (s w).x_t + (beta - s w.mu),  s = gamma / sqrt(var + eps)
    (the conv bias cancels). The statistics come from the audio (K x K, in float64), not from passes over the
    (frames x 512) output and back through them: forward and backward, those were a third of the layer's time.
    win (T, K) one utterance's windows, the first `valid` of them its valid frames -> (bias (C,), weight (K, C)),
    float64: GroupNorm(conv(x))[:, t] = bias + win[t] @ weight."""
    norm, w = layer.layer_norm, layer.conv.weight[:, 0].t().double()    # w (K, C)
    with torch.autocast(win.device.type, enabled=False):
        xs = win[:valid].double()
        mu = xs.mean(0)
        cov = (xs - mu).t() @ (xs - mu) / valid                             # (K, K)
        w_folded = w * (norm.weight.double() / torch.sqrt(((cov @ w) * w).sum(0) + norm.eps))
        return norm.bias.double() - mu @ w_folded, w_folded


def first_layer_folded(layer: "Wav2Vec2ConvLayer", audio: torch.Tensor, own: list, valid: list) -> torch.Tensor:
    """GELU of the first layer (fold_first_layer) for the one-sequence path: one matrix product per utterance.
    audio (B, S) with S >= max(own); own[b] samples of utterance b (a multiple of the stride); valid[b] its
    conv_out_lengths -> (sum(own) / stride, C) in the autocast dtype; frames past valid[b] are padding
    (normalised like the rest; no valid frame of the next layer reads them)."""
    K, s = layer.conv.kernel_size[0], layer.conv.stride[0]
    dt = cpu_compute_dtype(audio)
    parts = []
    for a, n, v in zip(audio, own, valid):
        win = F.pad(a[:n], (0, K - s)).unfold(0, K, s)                 # (n / s, K): frame t reads s t .. s t + K - 1
        parts.append((win, *fold_first_layer(layer, win, v)))
    with torch.autocast("cpu", enabled=False):
        if torch.is_grad_enabled():
            return F.gelu(torch.cat([torch.addmm(b.to(dt), x.to(dt), m.to(dt)) for x, b, m in parts]))
        y = torch.empty(sum(len(x) for x, _, _ in parts), parts[0][2].shape[1], dtype=dt, device=audio.device)
        start = 0
        for x, b, m in parts:                 # decoding: written in place, no 35 MB concatenation
            torch.addmm(b.to(dt), x.to(dt), m.to(dt), out=y[start:start + len(x)])
            start += len(x)
        return torch.ops.aten.gelu_(y)


class Wav2Vec2FeatureProjection(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.layer_norm = LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.projection = Linear(cfg.conv_dim[-1], cfg.hidden_size)
        self.dropout = Dropout(cfg.feat_proj_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.projection(self.layer_norm(x)))


# wav2vec2's positional convolution (kernel 128, 16 groups) is oneDNN's slowest convolution: 50-120 GFLOP/s
# in bf16 on one core, where a matrix product reaches 510. By the convolution theorem the same product is, per
# frequency of a real FFT, a (C/G x C/G) matrix times the spectra of the batch: ~TK/4n times fewer
# multiplications, but the kernel's spectrum (C x C/G x n/2 complex numbers) is a fixed cost. `bench.py --only
# pos_conv` (forward + backward, bf16 convolution against the fp32 FFT path, one core): 2.8-3.5x faster for the
# tiny preset's 26 x 3 s, 1.3-1.8x and 2.6-3.0x for base's 8 x 3 s and 16 x 8 s, 0.84-0.88x (slower) for
# base's 4 x 4 s. fft_pays is that cost model, fitted to those shapes.
CPU_FFT_POS_CONV = True        # False: always F.conv1d (what Hugging Face runs)


def fft_length(m: int) -> int:
    """The smallest 2^a 3^b 5^c >= m: a length the real FFT does fast without padding to a power of two."""
    n = m
    while True:
        r = n
        for f in (2, 3, 5):
            while r % f == 0:
                r //= f
        if r == 1:
            return n
        n += 1


def kernel_spectrum(w: torch.Tensor, groups: int, n: int) -> torch.Tensor:
    """w (C, C/G, K) -> W (G, n/2 + 1, C/G, C/G) complex64: per group and frequency, the matrix that multiplies
    the input's spectrum (the kernel flipped: a correlation is a convolution with the kernel reversed)."""
    C, Ci, _ = w.shape
    with torch.autocast(w.device.type, enabled=False):
        return torch.fft.rfft(w.float().flip(-1), n).view(groups, C // groups, Ci, -1).permute(0, 3, 1, 2)


def spectral_conv(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor, n: int, K: int) -> tuple:
    """F.conv1d(x, w, bias, padding=K//2, groups=G)[..., :T] from the kernel's spectrum W (kernel_spectrum):
    Y(f) = W(f) X(f) per group and frequency, in fp32. x (B, C, T) -> (y (B, C, T) in x's dtype, X)."""
    (B, C, T), G = x.shape, W.shape[0]
    s = K - 1 - K // 2                                       # n >= T + K - 1: no wrap-around; output t sits at s + t
    with torch.autocast(x.device.type, enabled=False):     # the complex products stay in fp32
        X = torch.fft.rfft(x.float(), n).view(B, G, C // G, -1).permute(1, 3, 2, 0)      # (G, F, Ci, B)
        Y = (W @ X).permute(3, 0, 2, 1).reshape(B, C, -1)                                # (B, C, F)
        y = torch.fft.irfft(Y, n)[..., s:s + T] + bias.float()[:, None]
    return y.to(x.dtype), X


class GroupedConv1dFFT(torch.autograd.Function):
    """y[b, o, t] = bias[o] + sum_{i,k} w[o, i, k] x[b, g(o) Ci + i, t + k - K//2], t < T: F.conv1d(x, w, bias,
    padding=K//2, groups=G)[..., :T] computed in fp32 as Y(f) = W(f) X(f) per group and frequency (above).
    The gradients are the adjoint products: gX(f) = W(f)^H gY(f), gW(f) = gY(f) X(f)^H (summed over the batch).
    x (B, C, T), w (C, C/G, K), bias (C,) -> (B, C, T) in x's dtype."""

    @staticmethod
    def forward(ctx, x, w, bias, groups: int):
        (B, C, T), K = x.shape, w.shape[-1]
        n = fft_length(T + K - 1)
        W = kernel_spectrum(w, groups, n)
        y, X = spectral_conv(x, W, bias, n, K)
        ctx.save_for_backward(X, W)
        ctx.dims = (B, C, T, K, groups, n, K - 1 - K // 2, x.dtype)
        return y

    @staticmethod
    def backward(ctx, gy):
        X, W = ctx.saved_tensors
        B, C, T, K, G, n, s, dtype = ctx.dims
        GY = torch.fft.rfft(F.pad(gy.float(), (s, 0)), n).view(B, G, C // G, -1).permute(1, 3, 2, 0)  # (G, F, Co, B)
        gx = torch.fft.irfft((W.mT.conj() @ GY).permute(3, 0, 2, 1).reshape(B, C, -1), n)[..., :T]
        GW = (GY @ X.mT.conj()).permute(0, 2, 3, 1).reshape(C, C // G, -1)                  # (C, Ci, F)
        gw = torch.fft.irfft(GW, n)[..., :K].flip(-1)
        return gx.to(dtype), gw, gy.float().sum((0, 2)), None


def fft_pays(x: torch.Tensor, w: torch.Tensor, spectrum_known: bool = False) -> bool:
    """Does the FFT path beat F.conv1d for x (B, C, T) and w (C, C/G, K)? The cost model, per channel pair:
    direct ~ B T K / speed, FFT ~ n (B + 20) (20: the kernel's spectrum; 0 when it is known, as in inference).
    15: the bf16 convolution's speed with 48 channels per group over the FFT path's, per element; with 16
    channels per group (tiny) oneDNN runs at 40 % of that (bench.py --only pos_conv); in fp32 at 70 % (forward
    + backward at base's 4 x 194 frames: 275 ms fp32, 187 bf16; the FFT path 228 in both)."""
    (B, C, T), K = x.shape, w.shape[-1]
    speed = 15 if w.shape[1] > 16 else 15 * 0.4
    if not (torch.is_autocast_enabled("cpu") or x.dtype == torch.bfloat16):
        speed *= 0.7                                         # an fp32 convolution
    fixed = 0 if spectrum_known else 20
    return CPU_FFT_POS_CONV and x.device.type == "cpu" and B * T * K > speed * fft_length(T + K - 1) * (B + fixed)


def positional_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, T) -> (B, C, T): the grouped 'same' convolution, by FFT on a CPU where that is cheaper."""
    if fft_pays(x, w):
        return GroupedConv1dFFT.apply(x, w, bias, groups)
    K, T = w.shape[-1], x.shape[-1]
    return F.conv1d(x, w, bias, padding=K // 2, groups=groups)[..., :T]   # an even K yields one frame too many


def spectrum_length(m: int) -> int:
    """The smallest c 2^a >= m with c in 4..7: few distinct lengths (at most 25 % padding), so that inference
    on batches of every length reuses a handful of cached kernel spectra."""
    a = max(0, (m - 1).bit_length() - 3)
    return min(c << a for c in (4, 5, 6, 7, 8) if c << a >= m)


class Wav2Vec2PositionalConvEmbedding(nn.Module):
    """Relative positions from a wide grouped convolution with weight norm over the kernel axis.

    When no gradient is wanted (decoding, or a frozen wav2vec2), a CPU keeps the kernel's spectrum between
    calls (until the weights change; one per FFT length, the last two lengths): the FFT path is then 5x
    faster than oneDNN's convolution at base's 4 x 2-3 s (7.7 vs 36 ms in bf16, 7.3 vs 49 in fp32), where
    computing the spectrum afresh (63 ms) made it slower."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        k = cfg.num_conv_pos_embeddings
        conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, k, padding=k // 2, groups=cfg.num_conv_pos_embedding_groups)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self._spectra = {}            # n -> the kernel's spectrum; "key" -> the weights it was computed from

    def _spectrum(self, n: int) -> torch.Tensor:
        key = weights_key(*self.conv.parameters())
        if self._spectra.get("key") != key:
            self._spectra = {"key": key}
        if n not in self._spectra:
            if len(self._spectra) > 2:
                del self._spectra[next(k for k in self._spectra if k != "key")]    # the oldest length
            self._spectra[n] = kernel_spectrum(self.conv.weight.detach(), self.conv.groups, n).contiguous()
        return self._spectra[n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, T, D) -> (B, T, D)
        x = x.transpose(1, 2)
        v = self.conv.parametrizations.weight.original1     # the weight's direction: the weight's shape
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.conv.parameters()))
        if not grad and fft_pays(x, v, spectrum_known=True):
            K = v.shape[-1]
            n = spectrum_length(x.shape[-1] + K - 1)
            y = spectral_conv(x, self._spectrum(n), self.conv.bias, n, K)[0]
        else:
            y = positional_conv(x, self.conv.weight, self.conv.bias, self.conv.groups)
        return F.gelu(y).transpose(1, 2)


# wav2vec2's self-attention per sequence on a CPU (attention_per_sequence below) against the padded batch, one layer
# forward + backward in bf16 (/tmp microbench, interleaved): base width (768, 12 heads) 45 -> 35 ms at 4 x 100-200
# frames, 178 -> 135 at 16, 203 -> 181 at 26 x 80-150; tiny width (256, 4 heads) 5.0 -> 4.7 ms at 4, 10.2 -> 10.1 at
# 8, but 34 -> 43 at 26 (each sequence's few small operations then cost more than the padding they skip). Hence:
# per sequence when there is padding to skip, at the base width or for at most 8 sequences.
CPU_PER_SEQUENCE_ATTENTION = True     # False: wav2vec2 attends over the padded batch on a CPU too (as on a GPU)


def per_sequence_pays(x: torch.Tensor, packed: Packed) -> bool:
    return (CPU_PER_SEQUENCE_ATTENTION and x.device.type == "cpu" and packed.pad_mask is not None
            and (packed.B <= 8 or x.shape[-1] >= 512))


def attention_per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Packed, heads: int,
                           p: float = 0.0) -> torch.Tensor:
    """Self-attention of packed rows (N, D) -> (N, D), each sequence over its own rows only (dropout p on its
    weights): no padded keys to mask, no (B, T) layout to unpack to and pack from. Decoding wav2vec2 base over
    4 utterances of 2-3 s: 2.7 -> 1.9 ms a layer in bf16 (a quarter of the padded batch's scores are padding)."""
    outs, start = [], 0
    for n in filter(None, packed.lengths):
        qb, kb, vb = (t[start:start + n].view(n, heads, -1).transpose(0, 1) for t in (q, k, v))   # (H, n, D/H)
        outs.append(attention(qb, kb, vb, p=p).transpose(0, 1).reshape(n, -1))
        start += n
    return torch.cat(outs)


class Wav2Vec2Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj = Linear(dim, dim), Linear(dim, dim)
        self.v_proj, self.out_proj = Linear(dim, dim), Linear(dim, dim)

    def forward(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:   # (N, D) valid frames -> (N, D)
        if per_sequence_pays(x, packed):                   # a GPU runs the padded batch
            return self.out_proj(attention_per_sequence(self.q_proj(x), self.k_proj(x), self.v_proj(x), packed,
                                                        self.heads, self.dropout if self.training else 0.0))
        B, T, D = packed.B, packed.T, x.shape[-1]
        q, k, v = (packed.unpack(p(x)).view(B, T, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))        # (B, H, T, D/H)
        mask = None if packed.pad_mask is None else ~packed.pad_mask[:, None, None, :]  # True = may attend
        y = attention(q, k, v, mask, p=self.dropout if self.training else 0.0)
        return self.out_proj(packed.pack(y.transpose(1, 2).reshape(B, T, D)))


class Wav2Vec2FeedForward(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.intermediate_dropout = Dropout(cfg.activation_dropout)
        self.intermediate_dense = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output_dense = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.output_dropout = Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dropout(self.output_dense(self.intermediate_dropout(F.gelu(self.intermediate_dense(x)))))


class Wav2Vec2EncoderLayer(nn.Module):
    """Post-LN: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.attention = Wav2Vec2Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.attention_dropout)
        self.dropout = Dropout(cfg.hidden_dropout)
        self.layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = Wav2Vec2FeedForward(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:   # (N, D) valid frames -> (N, D)
        x = self.layer_norm(x + self.dropout(self.attention(x, packed)))
        return self.final_layer_norm(x + self.feed_forward(x))


class Wav2Vec2Encoder(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        self.pos_conv_embed = Wav2Vec2PositionalConvEmbedding(cfg)
        self.layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(Wav2Vec2EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D), pad_mask (B, T) True on padding or None -> (B, T, D), 0 on padding."""
        if pad_mask is not None:
            x = x.masked_fill(pad_mask[..., None], 0.0)   # padding must not leak through the position conv
        packed = Packed(pad_mask, *x.shape[:2])          # the layers see valid frames only
        x = self.dropout(self.layer_norm(packed.pack(x + self.pos_conv_embed(x))))
        for layer in self.layers:
            if self.training and self.cfg.layerdrop > 0 and torch.rand(()) < self.cfg.layerdrop:
                continue                                  # LayerDrop (Fan et al. 2019)
            if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, packed, use_reentrant=False)
            else:
                x = layer(x, packed)
        return packed.unpack(x)


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
        if self.cfg.feature_grad_mult > 0:
            feats = self.feature_extractor(audio, lens)
            if self.cfg.feature_grad_mult != 1.0:
                feats = GradMultiply.apply(feats, self.cfg.feature_grad_mult)
        else:
            with torch.no_grad():
                feats = self.feature_extractor(audio, lens)
        feats = feats.transpose(1, 2)                                    # (B, T, C)
        out_lens = self.output_lengths(lens)
        pad_mask = lengths_to_padding_mask(out_lens, feats.shape[1])
        pad_mask = pad_mask if pad_mask.any() else None
        packed = Packed(pad_mask, *feats.shape[:2])                      # no work on padded frames
        x = packed.unpack(self.feature_projection(packed.pack(feats)))
        return self.encoder(x, pad_mask), out_lens


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


# ----------------------------------------------------------------------------------------------
# 4. The log-mel front end: a CPU switch with wav2vec2's frame rate (20 ms) and interface
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
        self.conv = Conv1d(cfg.n_mels, cfg.logmel_dim, 3, stride=2, padding=1)

    def output_lengths(self, lens: torch.Tensor) -> torch.Tensor:
        frames = torch.div(lens - self.n_fft, self.hop, rounding_mode="floor") + 1
        return torch.div(frames.clamp(min=1) - 1, 2, rounding_mode="floor") + 1

    def forward(self, audio: torch.Tensor, lens: torch.Tensor) -> tuple:
        with torch.autocast(audio.device.type, enabled=False):   # spectra in fp32
            spec = torch.stft(audio.float(), self.n_fft, self.hop, window=self.window, center=False,
                              return_complex=True).abs().pow(2)  # (B, F, T)
            x = torch.log(torch.einsum("bft,fm->bmt", spec, self.fbank) + 1e-6)
            frames = (torch.div(lens - self.n_fft, self.hop, rounding_mode="floor") + 1).clamp(min=1)
            valid = (~lengths_to_padding_mask(frames, x.shape[-1]))[:, None].float()
            n = valid.sum(-1, keepdim=True)
            mean = (x * valid).sum(-1, keepdim=True) / n
            std = ((((x - mean) * valid) ** 2).sum(-1, keepdim=True) / n + 1e-5).sqrt()
            x = (x - mean) / std * valid
        return F.gelu(self.conv(x)).transpose(1, 2), self.output_lengths(lens)


# ----------------------------------------------------------------------------------------------
# 5. The ConST encoder-decoder
# ----------------------------------------------------------------------------------------------
class LengthAdaptor(nn.Module):
    """fairseq's Conv1dSubsampler: per layer Conv1d(k 5, s 2, p 2) to 2*out channels, then GLU.
    (B, T, in) -> (B, T', d_model), T' = f(f(T)), f(L) = floor((L - 1) / 2) + 1 (METHODS §1.13.1)."""

    def __init__(self, in_dim: int, channels: int, out_dim: int, layers: int = 2, kernel: int = 5):
        super().__init__()
        dims = [in_dim] + [channels // 2] * (layers - 1) + [out_dim]
        self.conv_layers = nn.ModuleList(Conv1d(dims[i], 2 * dims[i + 1] if i == layers - 1 else channels,
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
    """(B, T, D) states, (B,) lengths -> (B, D) mean over the valid positions only (METHODS §1.5)."""
    valid = (~lengths_to_padding_mask(lens, x.shape[1]))[..., None].to(x.dtype)
    return (x * valid).sum(1) / lens[:, None].to(x.dtype)


def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
    """(n, d) fixed positions: sin on the first half of the channels, cos on the second (fairseq layout)."""
    half = d // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000.0) / (half - 1)))
    angle = torch.arange(n, dtype=torch.float)[:, None] * freq[None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


class MultiheadAttention(nn.Module):
    """Attention through scaled_dot_product_attention, with an optional KV cache.

    x (B, L, D) queries; kv (B, T, D) keys/values (None: self-attention); key_pad_mask (B, T)
    True on padding; cache: a dict this layer fills (self-attention appends each step's key and
    value, cross-attention computes them once). Beam search passes G = B'/B rows of queries per row
    of kv (x (B', L, D)): the beams of one sentence, which attend to its encoder states as G·L queries
    (no copy of the keys and values per beam)."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(d, d) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:           # (B, L, D) -> (B, H, L, D/H)
        B, L, D = x.shape
        return x.view(B, L, self.heads, D // self.heads).transpose(1, 2)

    def forward(self, x, kv=None, key_pad_mask=None, causal: bool = False, cache: dict | None = None):
        q = self._split(self.q_proj(x))
        if kv is not None and cache is not None and "k" in cache:      # cross-attention: computed once
            k, v = cache["k"], cache["v"]
        else:
            src = x if kv is None else kv
            k, v = self._split(self.k_proj(src)), self._split(self.v_proj(src))
            if cache is not None and kv is None and "k" in cache:      # self-attention: append this step
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            if cache is not None and kv is not None:                  # kept for every step: laid out as
                k, v = k.contiguous(), v.contiguous()                  # (B, H, T, d), so q k^T copies nothing
            if cache is not None:
                cache["k"], cache["v"] = k, v
        mask = None if key_pad_mask is None else ~key_pad_mask[:, None, None, :]
        causal = causal and q.shape[2] > 1                              # one new query sees the whole past
        B, H, L, Dh = q.shape
        G = B // k.shape[0]                                             # beams per sentence (1: no beams)
        if G > 1:
            assert not causal, "beams share keys and values in cross-attention only"
            q = q.view(B // G, G, H, L, Dh).transpose(1, 2).reshape(B // G, H, G * L, Dh)
        y = attention(q, k, v, mask, causal, self.dropout if self.training else 0.0)
        if G > 1:
            y = y.view(B // G, H, G, L, Dh).transpose(1, 2)
        return self.out_proj(y.reshape(B, H, L, Dh).transpose(1, 2).reshape(B, L, H * Dh))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1, self.fc2 = Linear(cfg.d_model, cfg.ffn_dim), Linear(cfg.ffn_dim, cfg.d_model)
        self.activation_dropout = Dropout(cfg.activation_dropout)

    def forward(self, x):
        return self.fc2(self.activation_dropout(F.relu(self.fc1(x))))


class EncoderLayer(nn.Module):
    """Pre-LN: x += Attn(LN(x)); x += FFN(LN(x)). x (N, D): the valid positions of a batch (`Packed`);
    the attention runs on the padded (B, T) layout, everything else on the valid rows only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = MultiheadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.self_attn_layer_norm, self.final_layer_norm = LayerNorm(cfg.d_model), LayerNorm(cfg.d_model)
        self.ffn, self.dropout = FeedForward(cfg), Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        h = packed.unpack(self.self_attn_layer_norm(x))
        x = x + self.dropout(packed.pack(self.self_attn(h, key_pad_mask=packed.pad_mask)))
        return x + self.dropout(self.ffn(self.final_layer_norm(x)))


class DecoderLayer(nn.Module):
    """Pre-LN: causal self-attention, cross-attention to the encoder, FFN."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = MultiheadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.encoder_attn = MultiheadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = LayerNorm(cfg.d_model)
        self.encoder_attn_layer_norm = LayerNorm(cfg.d_model)
        self.final_layer_norm = LayerNorm(cfg.d_model)
        self.ffn, self.dropout = FeedForward(cfg), Dropout(cfg.dropout)

    def forward(self, x, enc, enc_pad_mask, cache: dict | None = None):
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.setdefault("self", {}), cache.setdefault("cross", {})
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), causal=True, cache=self_cache))
        x = x + self.dropout(self.encoder_attn(self.encoder_attn_layer_norm(x), enc, enc_pad_mask, cache=cross_cache))
        return x + self.dropout(self.ffn(self.final_layer_norm(x)))


@dataclass
class Outputs:
    """Everything a loss may need from one forward pass. Shapes: low-level (B, T, D) states are
    the shared encoder's inputs, high-level ones its outputs; logits[task] (B, L, V) predict
    targets[task] (B, L), whose position 0 is the language tag. speech_subsampled (B, T, D) is the
    length adaptor's output before sqrt(d), positions and dropout: the CTC head's input (`ctc_states`)."""
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
        self.dropout = Dropout(cfg.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.encoder_layer_norm = LayerNorm(cfg.d_model)
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.decoder_layer_norm = LayerNorm(cfg.d_model)

    @classmethod
    def from_checkpoint(cls, ckpt: "str | Path | dict") -> "SpeechTranslator":
        """The architecture and weights of one of train.py's checkpoints: a path, or the dict that
        `load_checkpoint` (section 7) returned."""
        ckpt = ckpt if isinstance(ckpt, dict) else load_checkpoint(ckpt)
        model = cls(model_config_from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        return model

    def freeze_wav2vec2(self, frozen: bool = True):
        """Fine-tuning recipes keep all of wav2vec2 fixed for the first N updates (train.py calls
        this at step 0 and N); the conv feature encoder can stay frozen for good
        (`self.wav2vec2.freeze_feature_encoder()`)."""
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
        """The input of ConST's `ctc_cnn` head (METHODS §1.7): the length adaptor's output x sqrt(d) with
        its own dropout and no positions, as the released code's `compute_ctc_logit_and_logprob`
        (positions would add a per-frame bias to every token's logit). (B, T, D) -> (B, T, D)."""
        return self.dropout(subsampled * self.embed_scale)

    def encode_text(self, tokens: torch.Tensor, lens: torch.Tensor) -> tuple:
        """tokens (B, L) `<lang:en> x </s>` -> low-level text states (B, L, D) and lengths."""
        return self._embed(self.embed_tokens(tokens)), lens

    def encode(self, states: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """The shared encoder: (B, T, D) low-level states -> (B, T, D) high-level states (0 on padding)."""
        pad_mask = lengths_to_padding_mask(lens, states.shape[1])
        packed = Packed(pad_mask, *states.shape[:2])
        x = packed.pack(states)
        for layer in self.encoder_layers:
            x = layer(x, packed)
        return packed.unpack(self.encoder_layer_norm(x))

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
        return linear(self.decoder_layer_norm(x), self.embed_tokens.weight)

    def forward(self, batch, tasks=("st", "asr", "mt"), reencode_asr: bool = True) -> Outputs:
        """Run the tasks on one batch (data.Batch). ASR encodes the speech a second time, with
        fresh dropout, as ConST does (METHODS §1.4); `reencode_asr=False` reuses the ST pass.
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
        in ONE decoder pass over the rows of every task stacked: on a CPU, one pass over 3B rows costs
        less than three over B (bench.py --only decoder_passes). Right-padding changes no valid
        position: self-attention is causal and cross-attention masks the padded encoder states."""
        if len(jobs) <= 1:
            return {task: self.decode(*job) for task, job in jobs.items()}
        L = max(prev.shape[1] for prev, _, _ in jobs.values())
        T = max(enc.shape[1] for _, enc, _ in jobs.values())
        prev = torch.cat([F.pad(p, (0, L - p.shape[1]), value=PAD_ID) for p, _, _ in jobs.values()])
        enc = torch.cat([F.pad(e, (0, 0, 0, T - e.shape[1])) for _, e, _ in jobs.values()])
        logits = self.decode(prev, enc, torch.cat([lens for _, _, lens in jobs.values()]))
        out, start = {}, 0
        for task, (p, _, _) in jobs.items():
            out[task] = logits[start:start + p.shape[0], :p.shape[1]]
            start += p.shape[0]
        return out

    # ------------------------------------------------------------------------------------------
    # 6. Generation
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _reorder(cache: list, order: torch.Tensor):
        """Follow the surviving beams: `order` picks rows of the same sentence only, and all beams of a
        sentence share its encoder states, so the cross-attention keys and values stay as they are (copying
        them was a quarter of a tiny beam search)."""
        for layer in cache:
            for k in layer["self"]:
                layer["self"][k] = layer["self"][k].index_select(0, order)

    def _max_lens(self, enc_lens, max_len_a, max_len_b):
        return (max_len_a * enc_lens.float() + max_len_b).long().clamp(max=self.cfg.max_positions - 2)

    @torch.no_grad()
    def greedy(self, enc: torch.Tensor, enc_lens: torch.Tensor, lang_id: int, max_len_a: float = 1.2,
               max_len_b: int = 10) -> list:
        """Greedy search with the KV cache: the most likely token at every step (see `generate`)."""
        B, device = enc.shape[0], enc.device
        max_lens = self._max_lens(enc_lens, max_len_a, max_len_b)
        tokens = torch.tensor([EOS_ID, lang_id], device=device).repeat(B, 1)
        cache, out, alive = [], [[] for _ in range(B)], [True] * B
        logits = self.decode(tokens, enc, enc_lens, cache)[:, -1]
        for step in range(int(max_lens.max()) + 1):
            logits[:, PAD_ID] = float("-inf")
            nxt = logits.argmax(-1)
            nxt[step + 1 >= max_lens] = EOS_ID
            for b in range(B):
                if alive[b] and nxt[b] == EOS_ID:
                    alive[b] = False
                elif alive[b]:
                    out[b].append(int(nxt[b]))
            if not any(alive):
                break
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            logits = self.decode(nxt[:, None], enc, enc_lens, cache, offset=tokens.shape[1] - 1)[:, -1]
        return out

    @torch.no_grad()
    def generate(self, enc: torch.Tensor, enc_lens: torch.Tensor, lang_id: int, beam: int = 5,
                 max_len_a: float = 1.2, max_len_b: int = 10, len_penalty: float = 1.0,
                 use_cache: bool = True) -> list:
        """Translate encoder states (B, T, D) into token lists (tag and </s> stripped).

        The decoder starts from `</s> <lang:xx>` (the tag is forced), and stops at `</s>` or at
        `max_len_a * T_i + max_len_b` tokens. Hypotheses are ranked by log-probability divided
        by length ** len_penalty. beam=1 is greedy search."""
        B, device = enc.shape[0], enc.device
        max_lens = self._max_lens(enc_lens, max_len_a, max_len_b)
        K = beam
        max_lens = max_lens.repeat_interleave(K, 0)  # enc stays (B, T, D): the K beams of a sentence share it
        tokens = torch.tensor([EOS_ID, lang_id], device=device).repeat(B, 1)       # (B, 2)
        scores = torch.zeros(B, K, device=device)
        scores[:, 1:] = float("-inf")             # all beams start identical: keep one
        finished = [[] for _ in range(B)]
        done = [False] * B
        cache = [] if use_cache else None
        first = torch.arange(B, device=device).repeat_interleave(K)                 # identical beams: decode one
        logits = self.decode(tokens, enc, enc_lens, cache).index_select(0, first) if use_cache else None
        if use_cache:
            self._reorder(cache, first)           # ... and give its keys and values to all K
        tokens = tokens.index_select(0, first)                                       # (B*K, 2)
        for step in range(int(max_lens.max()) + 1):
            n_out = tokens.shape[1] - 1                                         # tokens after </s>, tag included
            force_eos = (n_out >= max_lens)                                     # out of length: must end
            if use_cache and step > 0 and bool(force_eos.all()):
                last = torch.zeros(B * K, self.cfg.vocab_size, device=device)  # every beam must end: no logits needed
            elif use_cache:
                last = logits[:, -1] if step == 0 else self.decode(tokens[:, -1:], enc, enc_lens, cache,
                                                                    offset=tokens.shape[1] - 1)[:, -1]
            else:
                last = self.decode(tokens, enc, enc_lens)[:, -1]
            logp = F.log_softmax(last.float(), dim=-1)                          # (B*K, V)
            logp[force_eos] = torch.where(torch.arange(logp.shape[1], device=device) == EOS_ID, 0.0, float("-inf"))
            logp[:, PAD_ID] = float("-inf")
            V = logp.shape[1]
            cand = (scores.view(B * K, 1) + logp).view(B, K * V)
            top_scores, top_idx = cand.topk(2 * K, dim=1)                      # (B, 2K)
            beam_idx, tok = top_idx // V, top_idx % V
            # the bookkeeping in Python lists: one copy of the candidates per step, not one .item() per number
            new_scores = [[float("-inf")] * K for _ in range(B)]
            new_src, new_tok = [[0] * K for _ in range(B)], [[PAD_ID] * K for _ in range(B)]
            cands = zip(top_scores.tolist(), beam_idx.tolist(), tok.tolist())
            for b, (s_b, bi_b, t_b) in enumerate(cands):
                if done[b]:
                    new_src[b] = [b * K] * K      # keep shapes; the sentence is finished
                    continue
                kept = 0
                for s, bi, t in zip(s_b, bi_b, t_b):
                    if s == float("-inf"):
                        break
                    if t == EOS_ID:
                        hyp = tokens[b * K + bi, 2:].tolist()
                        finished[b].append((s / (len(hyp) + 1) ** len_penalty, hyp))
                    else:
                        new_scores[b][kept], new_src[b][kept], new_tok[b][kept] = s, b * K + bi, t
                        kept += 1
                    if kept == K:
                        break
                if len(finished[b]) >= K or kept == 0:
                    done[b] = True
            if all(done):
                break
            order = torch.tensor(new_src, device=device).view(-1)
            tokens = torch.cat([tokens.index_select(0, order), torch.tensor(new_tok, device=device).view(-1, 1)], dim=1)
            scores = torch.tensor(new_scores, device=device)
            if use_cache:
                self._reorder(cache, order)
        return [max(f)[1] if f else [] for f in finished]


# ----------------------------------------------------------------------------------------------
# 7. Our own checkpoints: train.py writes them (atomically), this reads them and rebuilds the model
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
