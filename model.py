"""VideoMAE: a plain ViT over space-time cubes, pre-trained as a masked autoencoder.

Appendix Table 8 (ViT-B, 16 frames at 224x224), read top to bottom:
  cube embedding  Conv3d 3 -> 768, kernel = stride = 2x16x16          -> 8 x 14 x 14 = 1568 tokens
  tube mask       ratio rho (masking.py); the encoder sees only the ~10% visible tokens
  encoder         12 x [joint space-time MHA(768), MLP(3072)]          -> (B, N_vis, 768)
  projector       Linear 768 -> 384 (no bias), then learnable mask tokens for the hidden cubes
  decoder         4 x [MHA(384), MLP(1536)] over all 1568 tokens
  head            Linear 384 -> 1536 = 3 x 2 x 16 x 16 pixels per masked cube (normalised, see cube_targets)
Fine-tuning drops the decoder: all tokens through the encoder, mean-pool, LayerNorm, Linear.

Parameter names and shapes are the official release's (MCG-NJU/VideoMAE), so its .pth files load
strict. Positions are a fixed sine table (never in a state dict) recomputed for whatever grid the
input has, so any T, H, W divisible by tubelet/patch works.
Public: SIZES, build_pretrain, build_classifier, cube_targets, pretrain_loss, reconstruct, load_checkpoint.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Same values as data.py (model.py imports nothing of ours); the targets un-normalise with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Encoder / decoder sizes of the official release. Decoder depth: 4 for small/base (Table 8), 12 for
# large/huge (the official scripts and released checkpoints). Huge has head dim 80.
SIZES = {
    'small': dict(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=192, decoder_num_heads=3, decoder_depth=4),
    'base': dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=384, decoder_num_heads=6, decoder_depth=4),
    'large': dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_num_heads=8, decoder_depth=12),
    'huge': dict(embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=640, decoder_num_heads=8, decoder_depth=12),
}
DEFAULTS = dict(patch_size=16, tubelet_size=2, img_size=224, num_frames=16, mlp_ratio=4.0,
                drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, fc_drop_rate=0.0,
                init_values=0.0, init_scale=0.001, use_mean_pooling=True, use_checkpoint=False,
                use_learnable_pos_emb=False, interpolate_pos=False)


def _config(size, overrides):
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; valid sizes: {', '.join(SIZES)}")
    cfg = {**SIZES[size], **DEFAULTS}
    bad = sorted(set(overrides) - set(cfg))
    if bad:
        raise ValueError(f"unknown model option(s) {', '.join(bad)}; valid options: {', '.join(sorted(cfg))}")
    cfg.update(overrides, size=size)
    for enc, heads in (('embed_dim', 'num_heads'), ('decoder_embed_dim', 'decoder_num_heads')):
        if cfg[enc] % cfg[heads]:
            raise ValueError(f"{enc}={cfg[enc]} is not divisible by {heads}={cfg[heads]}")
    for k in ('drop_rate', 'attn_drop_rate', 'drop_path_rate', 'fc_drop_rate'):
        if not 0.0 <= cfg[k] < 1.0:
            raise ValueError(f"{k} must be in [0, 1), got {cfg[k]}")
    return cfg


def grid_of(shape, patch_size, tubelet_size):
    """(B, C, T, H, W), (C, T, H, W) or (T, H, W) -> token grid (T', H', W')."""
    T, H, W = tuple(shape)[-3:]
    if T % tubelet_size or H % patch_size or W % patch_size:
        raise ValueError(f"video of {T} frames x {H}x{W} is not divisible into cubes of "
                         f"{tubelet_size}x{patch_size}x{patch_size} (frames % tubelet, height and width % patch must be 0)")
    return T // tubelet_size, H // patch_size, W // patch_size


# ----------------------------------------------------------------------------- positions
_SINCOS = {}


def sincos_table(n, dim, device):
    """Fixed (n, dim) table over the flat token index p (official formula): angle = p / 10000^(2*floor(j/2)/dim),
    sin on even channels j, cos on odd ones (interleaved). Float64 on the CPU, cached per (n, dim, device)."""
    key = (n, dim, str(device))
    if key not in _SINCOS:
        p = torch.arange(n, dtype=torch.float64)[:, None]
        j = torch.arange(dim)
        angle = p / torch.pow(10000.0, (2 * (j // 2)).double() / dim)       # (n, dim)
        table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
        _SINCOS[key] = table.float().to(device)
    return _SINCOS[key]


def resize_pos_embed(pe, old_grid, new_grid):
    """Learned table (1, T0*H0*W0, D) -> (1, T1*H1*W1, D): bicubic over space per time slice (as the
    official fine-tuning does), linear over time if the frame count changed too."""
    if tuple(old_grid) == tuple(new_grid):
        return pe
    (T0, H0, W0), (T1, H1, W1), D = old_grid, new_grid, pe.shape[-1]
    x = pe.reshape(T0, H0, W0, D).permute(0, 3, 1, 2)                      # (T0, D, H0, W0)
    x = F.interpolate(x.float(), size=(H1, W1), mode='bicubic', align_corners=False)
    if T1 != T0:                                                            # (H1*W1, D, T0) -> T1
        x = x.permute(2, 3, 1, 0).reshape(H1 * W1, D, T0)
        x = F.interpolate(x, size=T1, mode='linear', align_corners=False)
        x = x.reshape(H1, W1, D, T1).permute(3, 2, 0, 1)
    return x.permute(0, 2, 3, 1).reshape(1, T1 * H1 * W1, D).to(pe.dtype)


def _positions(owner, grid, dim, device):
    """(N, dim) positions for this grid: the owner's learned table resized, or the sine table. The sine table
    is recomputed over the flat index of the new grid (official classification), or, with interpolate_pos,
    the training grid's table is resized bicubically per time slice (official AVA detection code, whose test
    frames are larger than the 224 training crops)."""
    if getattr(owner, 'pos_embed', None) is not None:
        return resize_pos_embed(owner.pos_embed, owner.pos_grid, grid)[0]
    if owner.config.get('interpolate_pos') and tuple(grid) != tuple(owner.pos_grid):
        table = sincos_table(math.prod(owner.pos_grid), dim, device)[None]
        return resize_pos_embed(table, owner.pos_grid, grid)[0]
    return sincos_table(math.prod(grid), dim, device)


# ----------------------------------------------------------------------------- transformer block
class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch for a random subset of samples, rescale the rest."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Attention(nn.Module):
    """Joint space-time multi-head self-attention over all tokens given. The official qkv has no bias
    tensor of its own: q and v get learned biases, k none (a k bias shifts every logit of a query
    equally and cancels in the softmax)."""

    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)                      # rows: q | k | v, heads inside
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):                                                   # (B, N, C)
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                      # each (B, heads, N, hd)
        # softmax(q k^T / sqrt(hd)) v, fused (flash / memory-efficient kernels on GPU)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1, self.act, self.fc2, self.drop = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm: x + DropPath(g1 * Attn(LN(x))), then x + DropPath(g2 * MLP(LN(x))). g = layer scale, only if init_values > 0."""

    def __init__(self, dim, num_heads, mlp_ratio, drop, attn_drop, drop_path, init_values):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim)) if init_values > 0 else None
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim)) if init_values > 0 else None

    def forward(self, x):
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


def make_blocks(dim, depth, num_heads, cfg):
    # stochastic depth rate grows linearly: 0 for the first block, drop_path_rate for the last
    rates = [cfg['drop_path_rate'] * i / max(depth - 1, 1) for i in range(depth)]
    return nn.ModuleList(Block(dim, num_heads, cfg['mlp_ratio'], cfg['drop_rate'], cfg['attn_drop_rate'],
                               r, cfg['init_values']) for r in rates)


def run_blocks(blocks, x, use_checkpoint):
    for blk in blocks:
        # gradient checkpointing: recompute activations in backward (memory for large/huge), same maths
        x = checkpoint(blk, x, use_reentrant=False) if use_checkpoint and torch.is_grad_enabled() else blk(x)
    return x


# ----------------------------------------------------------------------------- cubes
def _cube_view(video, patch_size, tubelet_size):
    """(B, C, T, H, W) -> view (B, T', H', W', C, t, p, p): one entry per cube, no copy."""
    B, C, T, H, W = video.shape
    t, p = tubelet_size, patch_size
    x = video.reshape(B, C, T // t, t, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7)


class PatchEmbed(nn.Module):
    """Cube embedding: Conv3d with kernel = stride = (tubelet, patch, patch), i.e. one Linear per cube."""

    def __init__(self, dim, patch_size, tubelet_size, in_chans=3):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, (tubelet_size, patch_size, patch_size), (tubelet_size, patch_size, patch_size))

    def forward(self, video):                                  # (B, 3, T, H, W) -> (B, N, D), tokens (t, h, w)
        return self.proj(video).flatten(2).transpose(1, 2)

    def embed_cubes(self, cubes):                              # (..., 3*t*p*p) flattened (c, t, row, col) -> (..., D)
        return F.linear(cubes, self.proj.weight.flatten(1), self.proj.bias)


def _check_video(video):
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"expected a video (B, 3, T, H, W), got shape {tuple(video.shape)}")


# ----------------------------------------------------------------------------- pre-training model
class PretrainEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, self.config = cfg['embed_dim'], cfg
        self.patch_size, self.tubelet_size, self.use_checkpoint = cfg['patch_size'], cfg['tubelet_size'], cfg['use_checkpoint']
        self.patch_embed = PatchEmbed(D, cfg['patch_size'], cfg['tubelet_size'])
        self.pos_grid = grid_of((cfg['num_frames'], cfg['img_size'], cfg['img_size']), cfg['patch_size'], cfg['tubelet_size'])
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.pos_grid), D)) if cfg['use_learnable_pos_emb'] else None
        self.blocks = make_blocks(D, cfg['depth'], cfg['num_heads'], cfg)
        self.norm = nn.LayerNorm(D, eps=1e-6)

    def forward(self, video, mask):                            # (B, 3, T, H, W), (B, N) True = masked
        B, grid = video.shape[0], grid_of(video.shape, self.patch_size, self.tubelet_size)
        vis = ~mask                                            # (B, N), the same count per row
        # Only visible cubes are embedded: gather their pixels (B*N_vis, 3, t, p, p), copying nothing else,
        # then the Conv3d as one matmul. At ratio 0.9 this is a tenth of the full convolution.
        cubes = _cube_view(video, self.patch_size, self.tubelet_size)[vis.view(B, *grid)]
        x = self.patch_embed.embed_cubes(cubes.reshape(B, -1, 3 * self.tubelet_size * self.patch_size ** 2))  # (B, N_vis, D)
        pos = _positions(self, grid, x.shape[-1], x.device).to(x.dtype)                  # (N, D)
        x = x + pos.expand(B, -1, -1)[vis].reshape(B, -1, x.shape[-1])
        return self.norm(run_blocks(self.blocks, x, self.use_checkpoint and self.training))


class PretrainDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        Dd, t, p = cfg['decoder_embed_dim'], cfg['tubelet_size'], cfg['patch_size']
        self.use_checkpoint = cfg['use_checkpoint']
        self.blocks = make_blocks(Dd, cfg['decoder_depth'], cfg['decoder_num_heads'], cfg)
        self.norm = nn.LayerNorm(Dd, eps=1e-6)
        self.head = nn.Linear(Dd, 3 * t * p * p)               # 1536 = 3 x 2 x 16 x 16

    def forward(self, x, n_masked):                            # (B, N, Dd) visible first, then masked
        x = run_blocks(self.blocks, x, self.use_checkpoint and self.training)
        return self.head(self.norm(x[:, x.shape[1] - n_masked:]))         # (B, N_masked, 1536)


class PretrainVideoMAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.patch_size, self.tubelet_size = cfg['patch_size'], cfg['tubelet_size']
        self.encoder = PretrainEncoder(cfg)
        self.decoder = PretrainDecoder(cfg)
        self.encoder_to_decoder = nn.Linear(cfg['embed_dim'], cfg['decoder_embed_dim'], bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg['decoder_embed_dim']))
        # Official init: xavier-uniform Linear (bias 0) and LayerNorm 1/0 inside encoder and decoder; the
        # Conv3d and encoder_to_decoder keep PyTorch's default init; mask token N(0, .02) cut at +-.02.
        with torch.no_grad():
            self.encoder.apply(_init_xavier)
            self.decoder.apply(_init_xavier)
            if self.encoder.pos_embed is not None:
                nn.init.trunc_normal_(self.encoder.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def grid(self, shape):
        return grid_of(shape, self.patch_size, self.tubelet_size)

    def forward(self, video, mask):
        """video (B, 3, T, H, W) ImageNet-normalised, mask (B, N) bool True = masked, the same count in
        every row -> predictions (B, N_masked, 3*t*p*p) of the masked cubes in index order."""
        _check_video(video)
        B, N = video.shape[0], math.prod(self.grid(video.shape))
        if mask.numel() != B * N:
            raise ValueError(f"mask must hold {B} x {N} entries for a video of shape {tuple(video.shape)}, "
                             f"got shape {tuple(mask.shape)}")
        mask = mask.reshape(B, N).to(device=video.device, dtype=torch.bool)      # official masks come as float
        counts = mask.sum(1).tolist()
        if len(set(counts)) > 1:
            raise ValueError(f"every sample must mask the same number of cubes, got counts {sorted(set(counts))}")
        x = self.encoder_to_decoder(self.encoder(video, mask))                 # (B, N_vis, Dd)
        Dd = x.shape[-1]
        pos = sincos_table(N, Dd, x.device).to(x.dtype).expand(B, -1, -1)      # decoder's own table
        x = torch.cat([x + pos[~mask].reshape(B, -1, Dd),                      # visible, index order
                       self.mask_token.to(x.dtype) + pos[mask].reshape(B, -1, Dd)], dim=1)  # masked, index order
        return self.decoder(x, counts[0])


def _init_xavier(m):
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- classifier
class VisionTransformer(nn.Module):
    """Fine-tuning model: every token through the encoder, mean-pool, fc_norm, dropout, head."""

    def __init__(self, cfg, num_classes):
        super().__init__()
        self.config, D = {**cfg, 'num_classes': num_classes}, cfg['embed_dim']
        self.embed_dim, self.patch_size, self.tubelet_size = D, cfg['patch_size'], cfg['tubelet_size']
        self.use_checkpoint, self.use_mean_pooling = cfg['use_checkpoint'], cfg['use_mean_pooling']
        self.patch_embed = PatchEmbed(D, cfg['patch_size'], cfg['tubelet_size'])
        self.pos_grid = self.grid((cfg['num_frames'], cfg['img_size'], cfg['img_size']))
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.pos_grid), D)) if cfg['use_learnable_pos_emb'] else None
        self.pos_drop = nn.Dropout(cfg['drop_rate'])
        self.blocks = make_blocks(D, cfg['depth'], cfg['num_heads'], cfg)
        # Official: no final norm under mean pooling (the pre-trained encoder.norm is dropped); otherwise
        # norm + the FIRST token (the official "cls" path, there is no cls token; never used by the paper).
        self.norm = nn.Identity() if self.use_mean_pooling else nn.LayerNorm(D, eps=1e-6)
        self.fc_norm = nn.LayerNorm(D, eps=1e-6) if self.use_mean_pooling else nn.Identity()
        self.fc_dropout = nn.Dropout(cfg['fc_drop_rate'])
        self.head = nn.Linear(D, num_classes) if num_classes > 0 else nn.Identity()
        with torch.no_grad():                                  # official fine-tune init: N(0, .02) Linear
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            if self.pos_embed is not None:
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
            if num_classes > 0:                                # tiny head: fine-tuning starts near uniform
                self.head.weight.mul_(cfg['init_scale'])
                self.head.bias.mul_(cfg['init_scale'])

    def grid(self, shape):
        return grid_of(shape, self.patch_size, self.tubelet_size)

    def forward_features(self, video):                        # (B, 3, T, H, W) -> (B, N, D)
        _check_video(video)
        x = self.patch_embed(video)
        x = self.pos_drop(x + _positions(self, self.grid(video.shape), self.embed_dim, x.device).to(x.dtype))
        return self.norm(run_blocks(self.blocks, x, self.use_checkpoint and self.training))

    def forward(self, video):                                 # -> (B, num_classes) logits
        x = self.forward_features(video)
        x = x.mean(1) if self.use_mean_pooling else x[:, 0]
        return self.head(self.fc_dropout(self.fc_norm(x)))


def build_pretrain(size, **overrides):
    """Pre-training model of an official size; overrides = any DEFAULTS/SIZES key (tiny models in tests).
    model.config holds everything incl. 'size', so build_pretrain(**model.config) rebuilds it."""
    return PretrainVideoMAE(_config(size, overrides))


def build_classifier(size, num_classes, **overrides):
    """Fine-tuning classifier; build_classifier(**model.config) rebuilds it (config has size, num_classes)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0 = no head, features only), got {num_classes!r}")
    return VisionTransformer(_config(size, overrides), num_classes)


# ----------------------------------------------------------------------------- targets, loss, pictures
def _to01(x):
    """ImageNet-normalised pixels (3, ...) on dim -4 -> [0, 1], fp32."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1, 1)
    return x.float() * std + mean


def _normalise_cubes(c):
    """(..., t*p*p, 3): per cube and colour channel, (x - mean) / (unbiased std + 1e-6), as the official target."""
    return (c - c.mean(-2, keepdim=True)) / (c.std(-2, keepdim=True) + 1e-6)


@torch.no_grad()
def cube_targets(video, patch_size=16, tubelet_size=2, normalize=True):
    """Pixel targets of every cube: (B, 3, T, H, W) normalised -> (B, N, 3*t*p*p) fp32, cubes in token
    order, each flattened (time, row, column, channel), channel fastest. normalize=False: [0, 1] pixels."""
    _check_video(video)
    B, t, p = video.shape[0], tubelet_size, patch_size
    grid_of(video.shape, p, t)
    with torch.autocast(video.device.type, enabled=False):
        x = _cube_view(_to01(video), p, t).permute(0, 1, 2, 3, 5, 6, 7, 4)     # (B, T', H', W', t, p, p, 3)
        x = x.reshape(B, -1, t * p * p, 3)
        x = _normalise_cubes(x) if normalize else x
        return x.reshape(B, x.shape[1], -1)


def pretrain_loss(pred, video, mask, patch_size=16, tubelet_size=2, normalize=True):
    """MSE between the predictions (B, N_masked, 3*t*p*p) of the model and the targets of the MASKED cubes
    only (visible cubes do not count). Targets are cut for the masked cubes alone, in fp32, no grad."""
    B, t, p = video.shape[0], tubelet_size, patch_size
    grid = grid_of(video.shape, p, t)
    with torch.no_grad(), torch.autocast(video.device.type, enabled=False):
        cubes = _cube_view(video, p, t)[mask.reshape(B, *grid).bool()]          # (M, 3, t, p, p)
        cubes = _to01(cubes).permute(0, 2, 3, 4, 1).reshape(B, -1, t * p * p, 3)
        target = (_normalise_cubes(cubes) if normalize else cubes).reshape(B, cubes.shape[1], -1)
    if pred.shape != target.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} do not match the masked-cube targets {tuple(target.shape)}")
    return F.mse_loss(pred.float(), target)


@torch.no_grad()
def reconstruct(video, mask, pred, patch_size=16, tubelet_size=2, normalize=True):
    """Reconstruction picture (B, 3, T, H, W) in [0, 1]: visible cubes are the original pixels; masked
    cubes are the predictions, de-normalised with the ORIGINAL cube's mean/std (as the official
    visualisation does, so their brightness is borrowed from the ground truth)."""
    B, t, p = video.shape[0], tubelet_size, patch_size
    (T_, H_, W_), (T, H, W) = grid_of(video.shape, p, t), video.shape[-3:]
    cubes = _cube_view(_to01(video), p, t).permute(0, 1, 2, 3, 5, 6, 7, 4).reshape(B, -1, t * p * p, 3)
    m = mask.reshape(B, -1).to(device=video.device, dtype=torch.bool)
    gt = cubes[m]                                                               # (M, t*p*p, 3)
    out = pred.float().reshape(-1, t * p * p, 3)
    cubes[m] = out * (gt.std(1, keepdim=True) + 1e-6) + gt.mean(1, keepdim=True) if normalize else out
    x = cubes.reshape(B, T_, H_, W_, t, p, p, 3).permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, 3, T', t, H', p, W', p)
    return x.reshape(B, 3, T, H, W).clamp(0, 1)


# ----------------------------------------------------------------------------- checkpoints
def _read_state_dict(path):
    """-> (state dict with 'module.'/'_orig_mod.'/'backbone.' prefixes stripped, is_ours, top-level object)."""
    import argparse                                            # official checkpoints pickle their args Namespace
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, 'mp_rank_00_model_states.pt')):
        path = os.path.join(path, 'mp_rank_00_model_states.pt')          # a DeepSpeed checkpoint folder
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path!r} with torch.load(weights_only=True) ({type(e).__name__}: "
                         f"{str(e)[:300]}). If you trust the file, load it with weights_only=False and save only "
                         f"its state dict.") from e
    sd = obj
    if isinstance(obj, dict):
        sd = next((obj[k] for k in ('model', 'module', 'state_dict') if isinstance(obj.get(k), dict)), obj)
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        top = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"checkpoint {path!r} holds no state dict (a dict of tensors, bare or under "
                         f"'model'/'module'); found {top}")
    clean = {}
    for k, v in sd.items():
        while k.startswith(('module.', '_orig_mod.', 'backbone.')):   # DDP, torch.compile, official 'backbone.'
            k = k.split('.', 1)[1]
        clean[k] = v
    return clean, isinstance(obj, dict) and 'config' in obj, obj


def load_checkpoint(model, path):
    """Load an official or our checkpoint into a PretrainVideoMAE or VisionTransformer. Prints nothing.
    Returns {'missing': model keys left at their init, 'unexpected': checkpoint keys not used,
             'source': '{official|ours}-{pretrain|classifier}', 'notes': [why, in words]}.
    Pre-training checkpoint -> classifier: encoder.* loads, the decoder side and encoder.norm are left out,
    fc_norm/head stay fresh. A head with another class count is left out. Anything else must match exactly,
    else ValueError naming the keys and shapes."""
    sd, ours, obj = _read_state_dict(path)
    is_pre = any(k.startswith(('encoder.', 'decoder.')) or k == 'mask_token' for k in sd)
    source = ('ours' if ours else 'official') + ('-pretrain' if is_pre else '-classifier')
    target = model.state_dict()
    may_miss, unexpected, notes = set(), [], []
    if isinstance(model, VisionTransformer) and is_pre:
        kept = {}
        for k, v in sd.items():
            if k.startswith(('decoder.', 'encoder_to_decoder.', 'encoder.head.')) or k == 'mask_token' or \
                    (k.startswith('encoder.norm.') and k[8:] not in target):
                unexpected.append(k)                           # pre-training only; fine-tuning starts fc_norm fresh
            else:
                kept[k[8:] if k.startswith('encoder.') else k] = v
        sd = kept
        may_miss |= {k for k in target if k.startswith(('fc_norm.', 'head.'))}
        notes.append('pre-training checkpoint: encoder loaded; decoder, encoder_to_decoder, mask_token and '
                     'encoder.norm left out; fc_norm and head keep their fresh init')
    if isinstance(model, VisionTransformer) and not is_pre and 'fc_norm.weight' in sd and 'fc_norm.weight' not in target:
        # a mean-pooling classifier (e.g. Kinetics-fine-tuned) into a token-norm model (AVA detection backbone):
        # as the official detection code, fc_norm is left out and the token LayerNorm starts at 1/0
        unexpected += [k for k in ('fc_norm.weight', 'fc_norm.bias') if k in sd]
        sd = {k: v for k, v in sd.items() if not k.startswith('fc_norm.')}
        may_miss |= {k for k in target if k.startswith('norm.')}
        notes.append('classifier checkpoint into a token-norm model: fc_norm left out, norm starts at 1/0')
    if isinstance(model, VisionTransformer) and 'head.weight' in sd and 'head.weight' in target \
            and sd['head.weight'].shape != target['head.weight'].shape:
        notes.append(f"head: checkpoint has {sd['head.weight'].shape[0]} classes, model {target['head.weight'].shape[0]}; "
                     f"head left out and kept at its init")
        unexpected += [k for k in ('head.weight', 'head.bias') if k in sd]
        sd = {k: v for k, v in sd.items() if k not in ('head.weight', 'head.bias')}
        may_miss |= {'head.weight', 'head.bias'}
    # learned position table (third-party checkpoints): resize to this model's grid; the sine table has no key
    pos_key = 'encoder.pos_embed' if isinstance(model, PretrainVideoMAE) else 'pos_embed'
    if pos_key in sd:
        if pos_key not in target:
            raise ValueError(f"checkpoint {path!r} has a learned {pos_key} {tuple(sd[pos_key].shape)} but this model "
                             f"uses the fixed sine table; build it with use_learnable_pos_emb=True")
        owner = model.encoder if isinstance(model, PretrainVideoMAE) else model
        pe, (T_, _, _) = sd[pos_key], owner.pos_grid
        s = math.isqrt(pe.shape[1] // T_)
        if pe.shape[1] != T_ * s * s:
            raise ValueError(f"cannot tell the grid of {pos_key} {tuple(pe.shape)} in {path!r}: expected "
                             f"{T_} time slices of a square grid")
        if (T_, s, s) != owner.pos_grid:
            notes.append(f"{pos_key} resized from grid {(T_, s, s)} to {owner.pos_grid}")
        sd[pos_key] = resize_pos_embed(pe, (T_, s, s), owner.pos_grid)
    missing = [k for k in target if k not in sd]
    problems = []
    if [k for k in missing if k not in may_miss]:
        problems.append('missing from checkpoint: ' + _few([k for k in missing if k not in may_miss]))
    if [k for k in sd if k not in target]:
        problems.append('not in model: ' + _few([k for k in sd if k not in target]))
    shapes = [f"{k} {tuple(v.shape)} vs model {tuple(target[k].shape)}" for k, v in sd.items()
              if k in target and v.shape != target[k].shape]
    if shapes:
        problems.append('shape mismatch: ' + _few(shapes))
    if problems:
        hint = ' (a classifier checkpoint cannot load into a pre-training model)' \
            if isinstance(model, PretrainVideoMAE) and not is_pre else ''
        raise ValueError(f"checkpoint {path!r} ({source}) does not fit {type(model).__name__}{hint}: " + '; '.join(problems))
    model.load_state_dict(sd, strict=not missing)
    return {'missing': missing, 'unexpected': unexpected, 'source': source, 'notes': notes}


def _few(items, n=5):
    return ', '.join(items[:n]) + (f' (+{len(items) - n} more)' if len(items) > n else '')
