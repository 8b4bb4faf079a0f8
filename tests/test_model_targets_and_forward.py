"""Targets, loss, reconstruction and the pre-training forward against independent computations:
the encoder embeds only the visible cubes, the loss sees only the masked ones."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from masking import random_masking, running_cell_masking, tube_masking
from model import (build_classifier, build_pretrain, cube_targets, pretrain_loss, reconstruct,
                   sincos_table)

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
TINY = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2, patch_size=8, img_size=32, num_frames=4)


def loop_targets(video, p, t, normalize):
    """Straightforward numpy: every cube in (t, h, w) order, per-channel stats,
    (time, row, col, chan)."""
    v = video.double().numpy() * STD[:, None, None, None] + MEAN[:, None, None, None]
    B, _, T, H, W = v.shape
    out = []
    for b in range(B):
        rows = []
        for ti in range(T // t):
            for hi in range(H // p):
                for wi in range(W // p):
                    # (3, t, p, p)
                    cube = v[b, :, ti * t:(ti + 1) * t, hi * p:(hi + 1) * p, wi * p:(wi + 1) * p]
                    chans = [(c - c.mean()) / (c.std(ddof=1) + 1e-6) if normalize else c
                             for c in cube]
                    rows.append(np.stack(chans, axis=-1).reshape(-1))  # channel fastest
        out.append(rows)
    return torch.tensor(np.array(out))


def sine_reference(n, d):
    pos = np.arange(n)[:, None] / np.power(10000, 2 * (np.arange(d) // 2) / d)[None]
    pos[:, 0::2], pos[:, 1::2] = np.sin(pos[:, 0::2]), np.cos(pos[:, 1::2])
    return torch.tensor(pos, dtype=torch.float32)


@pytest.mark.parametrize('normalize', [True, False])
def test_cube_targets_match_a_loop(normalize):
    torch.manual_seed(0)
    video = torch.randn(2, 3, 4, 16, 24)
    got = cube_targets(video, patch_size=8, tubelet_size=2, normalize=normalize)
    assert got.shape == (2, 2 * 2 * 3, 3 * 2 * 8 * 8) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), loop_targets(video, 8, 2, normalize),
                               rtol=1e-5, atol=1e-5)
    rows = random_masking(2, (2, 2, 3), 0.5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cube_targets(video, 8, 2, normalize, rows),  # the loss's cubes
                               got[rows].reshape(2, 6, 384))


def test_cube_targets_leave_the_video_unchanged_also_with_one_cube_per_frame():
    video = torch.randn(2, 3, 2, 8, 8)                  # the (t, p, p) reshape is then a view
    before = video.clone()
    cube_targets(video, 8, 2)
    assert torch.equal(video, before)


def test_sine_table_is_the_official_interleaved_formula():
    torch.testing.assert_close(sincos_table(1568, 384, 'cpu'), sine_reference(1568, 384))
    assert sincos_table(10, 8, 'cpu') is sincos_table(10, 8, 'cpu')  # cached


def test_loss_is_mse_over_masked_cubes_only():
    torch.manual_seed(0)
    video = torch.randn(2, 3, 4, 16, 16)
    mask = random_masking(2, (2, 2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    pred = torch.randn(2, 4, 384, requires_grad=True)
    loss = pretrain_loss(pred, video, mask, patch_size=8, tubelet_size=2)
    ref = F.mse_loss(pred, cube_targets(video, 8, 2)[mask].reshape(2, 4, 384))
    torch.testing.assert_close(loss, ref)
    # pixels of visible cubes do not enter the loss
    # cube view (B,T',H',W',...)
    other = video.clone().view(2, 3, 2, 2, 2, 8, 2, 8).permute(0, 2, 4, 6, 1, 3, 5, 7)
    other[~mask.view(2, 2, 2, 2)] = torch.randn(8, 3, 2, 8, 8)
    video2 = other.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(video.shape)
    assert not torch.equal(video2, video)
    assert torch.equal(pretrain_loss(pred, video2, mask, 8, 2), loss)
    with pytest.raises(ValueError, match='do not match'):
        pretrain_loss(pred[:, :3], video, mask, 8, 2)


def test_reconstruct_keeps_visible_cubes_and_inverts_perfect_predictions():
    torch.manual_seed(0)
    video = torch.randn(2, 3, 4, 16, 16)
    video01 = (video * torch.tensor(STD).float().view(3, 1, 1, 1)
               + torch.tensor(MEAN).float().view(3, 1, 1, 1))
    mask = tube_masking(2, (2, 2, 2), 0.5)
    for normalize in (True, False):
        perfect = cube_targets(video, 8, 2, normalize)[mask].reshape(2, -1, 384)
        torch.testing.assert_close(reconstruct(video, mask, perfect, 8, 2, normalize),
                                   video01.clamp(0, 1), atol=1e-5, rtol=0)
    rec = reconstruct(video, mask, torch.zeros(2, 4, 384), 8, 2)
    vis = ~mask.view(2, 1, 2, 1, 2, 1, 2, 1).expand(2, 3, 2, 2, 2, 8, 2, 8).reshape(video.shape)
    torch.testing.assert_close(rec[vis], video01.clamp(0, 1)[vis])
    assert not torch.allclose(rec[~vis], video01.clamp(0, 1)[~vis])


def test_visible_only_embedding_equals_conv3d_then_gather():
    """Encoder with no blocks = LayerNorm(conv(video)[visible] + sine[visible])."""
    torch.manual_seed(0)
    m = build_pretrain('small', **{**TINY, 'depth': 0}).eval()
    video = torch.randn(3, 3, 4, 32, 24)  # grid (2, 4, 3)
    mask = tube_masking(3, m.grid(video.shape), 0.75)
    w, b = m.encoder.patch_embed.proj.weight, m.encoder.patch_embed.proj.bias
    full = (F.conv3d(video, w, b, stride=(2, 8, 8)).flatten(2).transpose(1, 2)
            + sine_reference(24, 32))
    ref = m.encoder.norm(full[~mask].reshape(3, -1, 32))
    visible = (~mask).nonzero()[:, 1].view(3, -1)  # indices, ascending
    out = m.encoder.forward_features(video, visible)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_pretrain_forward_matches_official_data_flow():
    """Embed all, add positions, keep visible, blocks, norm, project; decoder input = visible (+pos)
    then mask tokens (+pos), each in index order; prediction = head(norm(last N_masked))."""
    torch.manual_seed(0)
    m = build_pretrain('small', **TINY).eval()
    with torch.no_grad():
        m.mask_token.normal_()
    video = torch.randn(2, 3, 4, 32, 32)
    mask = tube_masking(2, m.grid(video.shape), 0.75)  # grid (2, 4, 4), 24 masked
    with torch.no_grad():
        x = (m.encoder.patch_embed.proj(video).flatten(2).transpose(1, 2)
             + sine_reference(32, 32))
        x = x[~mask].reshape(2, -1, 32)
        for blk in m.encoder.blocks:
            x = blk(x)
        x = m.encoder_to_decoder(m.encoder.norm(x))
        pos = sine_reference(32, 16).expand(2, -1, -1)
        x = torch.cat([x + pos[~mask].reshape(2, -1, 16),
                       m.mask_token + pos[mask].reshape(2, -1, 16)], 1)
        for blk in m.decoder.blocks:
            x = blk(x)
        ref = m.decoder.head(m.decoder.norm(x[:, -24:]))
        out = m(video, mask)
    assert out.shape == (2, 24, 3 * 2 * 8 * 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_dual_masking_equals_a_decoder_over_the_kept_tokens_only():
    """V2's decoder masking against a per-sample reference with boolean indexing: the decoder reads
    the visible tokens and mask tokens for the cubes the running cell keeps; the loss counts the
    kept cubes that the encoder did not see."""
    torch.manual_seed(0)
    m = build_pretrain('small', **TINY).eval()
    with torch.no_grad():
        m.mask_token.normal_()
    video = torch.randn(3, 3, 4, 32, 32)
    grid = m.grid(video.shape)
    mask, drop = tube_masking(3, grid, 0.75), running_cell_masking(3, grid, 0.5)
    with torch.no_grad():
        out = m(video, mask, drop)                                   # (B, 16 kept, P)
        assert out.shape == (3, 16, 3 * 2 * 8 * 8)
        x = (m.encoder.patch_embed.proj(video).flatten(2).transpose(1, 2)
             + sine_reference(32, 32))
        pos = sine_reference(32, 16).reshape(32, 16)
        for b in range(3):
            v = x[b][~mask[b]][None]
            for blk in m.encoder.blocks:
                v = blk(v)
            v = m.encoder_to_decoder(m.encoder.norm(v))[0]
            tokens = torch.cat([v + pos[~mask[b]], m.mask_token[0] + pos[~drop[b]]])[None]
            for blk in m.decoder.blocks:
                tokens = blk(tokens)
            ref = m.decoder.head(m.decoder.norm(tokens[:, -16:]))[0]
            torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)
        target = cube_targets(video, 8, 2)
        counted = mask & ~drop                                       # masked and decoded
        want = torch.cat([((out[b] - target[b][~drop[b]]) ** 2).mean(-1)[counted[b][~drop[b]]]
                          for b in range(3)]).mean()
        got = pretrain_loss(out, video, mask, 8, 2, decoder_mask=drop)
        torch.testing.assert_close(got, want)
        assert torch.equal(m(video, mask), m(video, mask, None))     # off: v1, unchanged


def test_masked_pixels_never_reach_the_predictions():
    torch.manual_seed(0)
    m = build_pretrain('small', **TINY).eval()
    video = torch.randn(2, 3, 4, 32, 32)
    mask = tube_masking(2, m.grid(video.shape), 0.75)
    cubes = video.clone().view(2, 3, 2, 2, 4, 8, 4, 8).permute(0, 2, 4, 6, 1, 3, 5, 7)
    cubes[mask.view(2, 2, 4, 4)] = 100 * torch.randn(48, 3, 2, 8, 8)
    video2 = cubes.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(video.shape)
    with torch.no_grad():
        assert torch.equal(m(video, mask), m(video2, mask))
        assert not torch.equal(m(video, mask), m(video, tube_masking(2, m.grid(video.shape), 0.75)))


def test_mask_errors_and_mixed_precision():
    m = build_pretrain('small', **TINY)
    video = torch.randn(2, 3, 4, 32, 32)
    uneven = torch.zeros(2, 32, dtype=torch.bool)
    uneven[0, :3] = True
    with pytest.raises(ValueError, match='same number'):
        m(video, uneven)
    with pytest.raises(ValueError, match='mask must hold'):
        m(video, torch.zeros(2, 31, dtype=torch.bool))
    mask = tube_masking(2, m.grid(video.shape), 0.9)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        pred = m(video, mask)
        loss = pretrain_loss(pred, video, mask, 8, 2)
    loss.backward()
    assert pred.shape == (2, 28, 384) and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_classifier_pools_tokens_and_any_grid_works():
    torch.manual_seed(0)
    c = build_classifier('small', 7, **TINY, fc_drop_rate=0.5).eval()
    video = torch.randn(2, 3, 6, 40, 24)  # 3 x 5 x 3 tokens
    feats = c.forward_features(video)
    assert (feats.shape == (2, 45, 32) and c.grid(video.shape) == (3, 5, 3)
            and c.grid((6, 40, 24)) == (3, 5, 3))
    torch.testing.assert_close(c(video), c.head(c.fc_norm(feats.mean(1))))
    # official fine-tuning init: head ~ N(0, .02) * 0.001, bias 0
    c = build_classifier('base', 400)
    assert (c.head.weight.std().item() == pytest.approx(2e-5, rel=0.05)
            and c.head.bias.abs().max() == 0)
