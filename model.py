"""VideoMAE: a plain ViT over space-time cubes, pre-trained as a masked autoencoder.

Appendix Table 8 (ViT-B, 16 frames at 224x224), read top to bottom:
  cube embedding  Conv3d 3 -> 768, kernel = stride = 2x16x16     -> 8 x 14 x 14 = 1568 tokens
  tube mask       ratio rho (masking.py); the encoder sees only the ~10% visible tokens
  encoder         12 x [joint space-time MHA(768), MLP(3072)]     -> (B, N_vis, 768)
  projector       Linear 768 -> 384 (no bias), then learnable mask tokens for the hidden cubes
  decoder         4 x [MHA(384), MLP(1536)] over all 1568 tokens
  head            Linear 384 -> 1536 = 3 x 2 x 16 x 16 pixels per masked cube (see cube_targets)
Fine-tuning drops the decoder: all tokens through the encoder, mean-pool, LayerNorm, Linear.
Parameter names and shapes are the official release's (MCG-NJU/VideoMAE), so its .pth files load
strict. Positions are a fixed sine table (no parameter) recomputed for the input's token grid.
"""
import functools
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Sizes of the official release: decoder depth 4 for small/base (Table 8), 12 for large/huge (its
# scripts and checkpoints); huge has head dim 80. Giant is VideoMAE V2's ViT-g/14 (its
# vit_g_hybrid_pt.sh). The two largest checkpoint their activations by default (memory).
_SIZE_KEYS = 'embed_dim depth num_heads decoder_embed_dim decoder_num_heads decoder_depth'.split()
SIZES = {name: dict(zip(_SIZE_KEYS, row)) for name, row in {
    'small': (384, 12, 6, 192, 3, 4), 'base': (768, 12, 12, 384, 6, 4),
    'large': (1024, 24, 16, 512, 8, 12), 'huge': (1280, 32, 16, 640, 8, 12),
    'giant': (1408, 40, 16, 512, 8, 4)}.items()}
SIZES['giant'].update(patch_size=14, mlp_ratio=48 / 11, use_checkpoint=True)
SIZES['huge'].update(use_checkpoint=True)
# The options the stages set; use_mean_pooling=False and interpolate_pos are the AVA backbone's.
DEFAULTS = dict(patch_size=16, tubelet_size=2, img_size=224, num_frames=16, mlp_ratio=4.0,
                drop_path_rate=0.0, fc_drop_rate=0.0, init_scale=0.001, use_mean_pooling=True,
                use_checkpoint=False, interpolate_pos=False)


def _config(size, overrides):
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; valid sizes: {', '.join(SIZES)}")
    cfg = {**DEFAULTS, **SIZES[size]}
    if bad := sorted(set(overrides) - set(cfg)):
        raise ValueError(f"unknown model option(s) {', '.join(bad)}; "
                         f"valid options: {', '.join(sorted(cfg))}")
    cfg.update(overrides, size=size)
    for dim, heads in (('embed_dim', 'num_heads'), ('decoder_embed_dim', 'decoder_num_heads')):
        if cfg[dim] % cfg[heads]:
            raise ValueError(f"{dim}={cfg[dim]} is not divisible by {heads}={cfg[heads]}")
    return cfg


def grid_of(shape, patch_size, tubelet_size):
    """(B, C, T, H, W), (C, T, H, W) or (T, H, W) -> token grid (T', H', W')."""
    T, H, W = tuple(shape)[-3:]
    if T % tubelet_size or H % patch_size or W % patch_size:
        raise ValueError(f"video of {T} frames x {H}x{W} is not divisible into cubes of "
                         f"{tubelet_size}x{patch_size}x{patch_size} (frames x height x width)")
    return T // tubelet_size, H // patch_size, W // patch_size


def _cube_view(video, patch_size, tubelet_size):
    """(B, 3, T, H, W) -> view (B, T', H', W', 3, t, p, p): one entry per cube, no copy."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"expected a video (B, 3, T, H, W), got shape {tuple(video.shape)}")
    T_, H_, W_ = grid_of(video.shape, patch_size, tubelet_size)
    t, p = tubelet_size, patch_size
    x = video.reshape(video.shape[0], 3, T_, t, H_, p, W_, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7)


# ----------------------------------------------------------------------------- positions
@functools.cache
def sincos_table(n, dim, device):
    """Fixed (n, dim) table over the flat token index p (official formula): angle = p /
    10000^(2*floor(j/2)/dim), sin on even channels j, cos on odd ones. Cached per argument."""
    p, j = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(dim)
    angle = p / torch.pow(10000.0, (2 * (j // 2)).double() / dim)           # (n, dim)
    return torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle)).float().to(device)


def resize_pos_embed(pe, old_grid, new_grid):
    """Position table (1, T0*H0*W0, D) -> (1, T1*H1*W1, D): bicubic over space per time slice (as
    the official code does), linear over time if the frame count changed too."""
    (T0, H0, W0), (T1, H1, W1), D = old_grid, new_grid, pe.shape[-1]
    x = pe.reshape(T0, H0, W0, D).permute(0, 3, 1, 2)                      # (T0, D, H0, W0)
    x = F.interpolate(x.float(), size=(H1, W1), mode='bicubic', align_corners=False)
    if T1 != T0:                                                            # (H1*W1, D, T0) -> T1
        x = x.permute(2, 3, 1, 0).reshape(H1 * W1, D, T0)
        x = F.interpolate(x, size=T1, mode='linear', align_corners=False)
        x = x.reshape(H1, W1, D, T1).permute(3, 2, 0, 1)
    return x.permute(0, 2, 3, 1).reshape(1, T1 * H1 * W1, D).to(pe.dtype)


def _positions(owner, grid, dim, device):
    """(N, dim) positions: the sine table of this grid (official classification) or, with
    interpolate_pos, the training grid's table resized per time slice (official AVA code)."""
    if owner.config['interpolate_pos'] and tuple(grid) != tuple(owner.pos_grid):
        table = sincos_table(math.prod(owner.pos_grid), dim, device)[None]
        return resize_pos_embed(table, owner.pos_grid, grid)[0]
    return sincos_table(math.prod(grid), dim, device)


# ----------------------------------------------------------------------------- transformer block
class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch for a random subset of samples, rescale others."""
    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        # x itself divided, as the official code: torchvision's StochasticDepth multiplies by
        # 1 / (1 - p) made in x's dtype, which in bf16 rounds (the kept samples up to 0.4% off)
        return x * keep / (1.0 - self.p)


def explicit_attention(q, k, v):
    """softmax(q k^T / sqrt(hd)) v over (B, heads, N, hd), the N x N matrix materialised."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v


def attention(q, k, v):
    """SDPA, except on CPU in bf16: there its flash kernel is 1.3-1.5x slower than the three ops
    written out (`bench.py model`)."""
    if q.is_cpu and q.dtype == torch.bfloat16:
        return explicit_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Joint space-time multi-head self-attention over all tokens given. The official qkv has no
    bias of its own: q and v get learned biases, k none (it would cancel in the softmax)."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)                      # rows q | k | v
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                                   # (B, N, C)
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                      # each (B, heads, N, hd)
        x = attention(q, k, v)                                              # (B, heads, N, hd)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""
    def __init__(self, dim, num_heads, mlp_ratio, drop_path):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(),
                                             fc2=nn.Linear(hidden, dim)))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Blocks(nn.ModuleList):
    """depth Blocks in a row; the stochastic depth rate grows linearly from 0 to drop_path_rate."""
    def __init__(self, dim, depth, num_heads, cfg):
        rates = [cfg['drop_path_rate'] * i / max(depth - 1, 1) for i in range(depth)]
        super().__init__(Block(dim, num_heads, cfg['mlp_ratio'], r) for r in rates)
        self.use_checkpoint = cfg['use_checkpoint']

    def forward(self, x):      # checkpointing recomputes each block in backward (memory for large)
        ckpt = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for blk in self:
            x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
        return x


def _init_weights(module, linear_init):
    """Official init: linear_init on every Linear weight, biases 0, LayerNorm 1 and 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.LayerNorm)):
            (linear_init if isinstance(m, nn.Linear) else nn.init.ones_)(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- models
class VisionTransformer(nn.Module):
    """The ViT of both stages. Fine-tuning: all tokens through the blocks, mean-pool, fc_norm,
    dropout, head. Pre-training's encoder: no pooling or head (encoder.* names), visible cubes."""
    def __init__(self, cfg, num_classes):
        super().__init__()
        D, pool = cfg['embed_dim'], cfg['use_mean_pooling']
        p, t = cfg['patch_size'], cfg['tubelet_size']
        self.config = {**cfg, 'num_classes': num_classes}
        self.embed_dim = D
        self.patch_size, self.tubelet_size = p, t
        # cube embedding: Conv3d with kernel = stride = (t, p, p), i.e. one Linear per cube
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv3d(3, D, (t, p, p), (t, p, p))))
        self.pos_grid = self.grid((cfg['num_frames'], cfg['img_size'], cfg['img_size']))
        self.blocks = Blocks(D, cfg['depth'], cfg['num_heads'], cfg)
        # Official: no final norm under mean pooling; else norm, and forward takes the FIRST token
        # (the official "cls" path; AVA and pre-training take the normed tokens of forward_features)
        self.norm = nn.Identity() if pool else nn.LayerNorm(D, eps=1e-6)
        self.fc_norm = nn.LayerNorm(D, eps=1e-6) if pool else nn.Identity()
        self.fc_dropout = nn.Dropout(cfg['fc_drop_rate'])
        self.head = nn.Linear(D, num_classes) if num_classes > 0 else nn.Identity()

    def grid(self, shape):
        return grid_of(shape, self.patch_size, self.tubelet_size)

    def forward_features(self, video, visible=None):
        """(B, 3, T, H, W) -> tokens (B, N, D) in (t, h, w) order; given visible (B, N_vis), the
        indices of the visible cubes (pre-training), only those: (B, N_vis, D)."""
        grid, proj = self.grid(video.shape), self.patch_embed.proj
        cubes = _cube_view(video, self.patch_size, self.tubelet_size)  # (B, T', H', W', 3, t, p, p)
        if visible is None:
            x = proj(video).flatten(2).transpose(1, 2)                          # (B, N, D)
        else:
            # Only the visible cubes are embedded, a tenth of the work at ratio 0.9: their pixels
            # (B, N_vis, 3, t, p, p), gathered from the strided cube view, times the Conv3d weight.
            b = torch.arange(video.shape[0], device=video.device)[:, None]
            cubes = cubes[(b, *torch.unravel_index(visible, grid))]       # cube index -> t, h, w
            x = F.linear(cubes.flatten(2), proj.weight.flatten(1), proj.bias)    # (B, N_vis, D)
        pos = _positions(self, grid, self.embed_dim, x.device).to(x.dtype)      # (N, D)
        x = x + (pos if visible is None else pos[visible])
        return self.norm(self.blocks(x))

    def forward(self, video):                                 # -> (B, num_classes) logits
        x = self.forward_features(video)
        x = x.mean(1) if self.config['use_mean_pooling'] else x[:, 0]
        return self.head(self.fc_dropout(self.fc_norm(x)))


class PretrainVideoMAE(nn.Module):
    """The encoder over the visible cubes, then a narrow decoder over all tokens (mask tokens for
    the hidden cubes) that predicts the hidden cubes' pixels."""
    def __init__(self, cfg):
        super().__init__()
        Dd, p, t = cfg['decoder_embed_dim'], cfg['patch_size'], cfg['tubelet_size']
        self.config = cfg
        self.patch_size, self.tubelet_size = p, t
        self.encoder = VisionTransformer({**cfg, 'use_mean_pooling': False}, 0)
        self.decoder = nn.ModuleDict(dict(
            blocks=Blocks(Dd, cfg['decoder_depth'], cfg['decoder_num_heads'], cfg),
            norm=nn.LayerNorm(Dd, eps=1e-6), head=nn.Linear(Dd, 3 * t * p * p)))  # 3 x 2 x 16 x 16
        self.encoder_to_decoder = nn.Linear(cfg['embed_dim'], Dd, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))

    grid = VisionTransformer.grid                  # the same token grid: patch_size, tubelet_size

    def forward(self, video, mask, decoder_mask=None):
        """video (B, 3, T, H, W) ImageNet-normalised, mask (B, N) bool True = masked, the same count
        in every row -> predictions (B, N_masked, 3*t*p*p) of the masked cubes in index order.
        V2's dual masking: decoder_mask (B, N) True = not decoded; mask tokens then only for the
        cubes it keeps (visible ones too, as V2; the same count per row), predictions for those."""
        B, N = video.shape[0], math.prod(self.grid(video.shape))
        if mask.numel() != B * N:
            raise ValueError(f"mask must hold {B} x {N} entries for a video of shape "
                             f"{tuple(video.shape)}, got shape {tuple(mask.shape)}")
        mask = mask.reshape(B, N).to(device=video.device, dtype=torch.bool)  # official: float masks
        counts = mask.sum(1).tolist()                # the one host sync: the check and the split
        if len(set(counts)) > 1:
            raise ValueError(f"every sample must mask the same number of cubes, got counts "
                             f"{sorted(set(counts))}")
        n_vis = N - counts[0]
        # Cube indices, visible first then masked, each in index order (a stable sort puts the
        # 0s = visible first); the gathers index with them instead of boolean masks, which sync.
        order = torch.argsort(mask.byte(), dim=1, stable=True)                  # (B, N)
        visible, masked = order[:, :n_vis], order[:, n_vis:]
        if decoder_mask is not None:                 # the decoded cubes, index order
            drop = decoder_mask.reshape(B, N).to(device=video.device, dtype=torch.bool)
            masked = torch.argsort(drop.byte(), dim=1, stable=True)[:, :N - int(drop[0].sum())]
        x = self.encoder_to_decoder(self.encoder.forward_features(video, visible))  # (B, N_vis, Dd)
        pos = sincos_table(N, x.shape[-1], x.device).to(x.dtype)            # the decoder's (N, Dd)
        x = torch.cat([x + pos[visible],                                    # visible tokens, then
                       self.mask_token.to(x.dtype) + pos[masked]], dim=1)   # mask tokens (B, N, Dd)
        x = self.decoder.blocks(x)[:, n_vis:]                   # the head reads the mask tokens
        return self.decoder.head(self.decoder.norm(x))                      # (B, N_masked, 3*t*p*p)


def build_pretrain(size, **overrides):
    """Pre-training model of a size in SIZES, overrides = DEFAULTS/SIZES keys; rebuild it with
    build_pretrain(**model.config)."""
    model = PretrainVideoMAE(_config(size, overrides))
    # Official init: xavier-uniform Linear inside encoder and decoder; the Conv3d and
    # encoder_to_decoder keep PyTorch's default init; mask token N(0, .02) cut at +-.02.
    with torch.no_grad():
        _init_weights(model.encoder, nn.init.xavier_uniform_)
        _init_weights(model.decoder, nn.init.xavier_uniform_)
        nn.init.trunc_normal_(model.mask_token, std=0.02, a=-0.02, b=0.02)
    return model


def build_classifier(size, num_classes, **overrides):
    """Fine-tuning classifier (num_classes 0: features only); build_classifier(**model.config)."""
    model = VisionTransformer(cfg := _config(size, overrides), num_classes)
    with torch.no_grad():                        # official fine-tune init: Linear N(0, .02)
        _init_weights(model, lambda w: nn.init.trunc_normal_(w, std=0.02))
        if num_classes > 0:                      # a tiny head (bias 0): starts near uniform
            model.head.weight.mul_(cfg['init_scale'])
    return model


# ----------------------------------------------------------------------------- targets and loss
@torch.no_grad()
def cube_targets(video, patch_size=16, tubelet_size=2, normalize=True, rows=None):
    """Pixel targets of every cube: (B, 3, T, H, W) ImageNet-normalised -> (B, N, 3*t*p*p) fp32,
    cubes in token order, each flattened (time, row, column, channel), channel fastest; per cube and
    channel (x - mean) / (unbiased std + 1e-6), or with normalize=False the [0, 1] pixels. rows
    (B, N) bool, the same count per clip: only those cubes (B, n, 3*t*p*p), the only ones the loss
    reads (a quarter to a half of a pre-training step's cubes: 2x less work)."""
    B, t, p = video.shape[0], tubelet_size, patch_size
    mean, std = torch.tensor([[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]],  # ImageNet's, as in
                             device=video.device)                             # data.py
    with torch.autocast(video.device.type, enabled=False):
        # (B, T', H', W', t, p, p, 3), a view -> (B, N, t*p*p, 3), or (B, n, ...) of the rows only
        x = _cube_view(video.float(), p, t).permute(0, 1, 2, 3, 5, 6, 7, 4)
        x = x.reshape(B, -1, t * p * p, 3) if rows is None else \
            x[rows.view(B, *x.shape[1:4])].view(B, -1, t * p * p, 3)
        x = x * std + mean  # not in place: with one cube per frame the reshape is the video itself
        if normalize:
            s = x.std(-2, keepdim=True).add_(1e-6)
            x = x.sub_(x.mean(-2, keepdim=True)).div_(s)
        return x.flatten(2)


def pretrain_loss(pred, video, mask, patch_size=16, tubelet_size=2, normalize=True,
                  decoder_mask=None):
    """MSE between the predictions (B, N_masked, 3*t*p*p) and the targets of the MASKED cubes;
    with a decoder_mask, over the decoded cubes (B, N_kept, ...) that are masked (V2)."""
    B, N = mask.shape[0], mask[0].numel()
    mask = mask.reshape(B, N).to(video.device, torch.bool)
    rows = mask if decoder_mask is None else ~decoder_mask.reshape(B, N).to(mask.device, torch.bool)
    target = cube_targets(video, patch_size, tubelet_size, normalize, rows)  # the cubes pred has
    if pred.shape != target.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} do not match the decoded-cube targets "
                         f"{tuple(target.shape)}")
    if decoder_mask is None:
        return F.mse_loss(pred.float(), target)
    w = mask[rows].reshape(B, -1).float()                      # 1 = masked: counted in the loss
    return ((pred.float() - target) ** 2).mean(-1).mul(w).sum() / w.sum()


@torch.no_grad()
def reconstruct(video, mask, pred, patch_size=16, tubelet_size=2, normalize=True):
    """Picture (B, 3, T, H, W) in [0, 1]: the visible cubes' pixels, and the predictions for the
    masked ones de-normalised with the ORIGINAL cube's mean/std (as the official visualisation)."""
    B, t, p = video.shape[0], tubelet_size, patch_size
    cubes = cube_targets(video, p, t, normalize=False).view(B, -1, t * p * p, 3)   # [0, 1]
    mask = mask.reshape(B, -1).to(device=video.device, dtype=torch.bool)
    out = pred.float().reshape(-1, t * p * p, 3)                  # the masked cubes, in order
    if normalize:
        gt = cubes[mask]
        out = out * (gt.std(-2, keepdim=True) + 1e-6) + gt.mean(-2, keepdim=True)
    cubes[mask] = out
    x = cubes.view(B, *grid_of(video.shape, p, t), t, p, p, 3)                    # back to pixels
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(video.shape).clamp(0, 1)
