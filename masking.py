"""Which cubes the encoder does not see (VideoMAE section 3.3, appendix Table 8 "tube mask").

A video of T x H x W pixels is cut into cubes of tubelet x patch x patch, giving a token grid
(T', H', W') = (T/2, H/16, W/16); tokens are numbered t-major, then h, then w (w fastest), the same
order as the Conv3d cube embedding in model.py. A mask is a bool tensor (B, T'*H'*W'),
True = masked.

- tube_masking: the paper's default. One random spatial mask per sample, repeated over every time
  slice, so a masked patch stays hidden for the whole clip (no copying from a neighbouring frame).
  int(ratio * H'*W') masked per slice, truncating like the official TubeMaskingGenerator:
  ratio 0.9 on 14x14 -> 176 of 196 per slice, 1408 of 1568 in total.
- random_masking: ablation (Table 2c / issue #61 of the official repo): int(ratio * N) cubes
  anywhere.
- frame_masking: ablation: int(ratio * T') whole time slices.
- running_cell_masking: VideoMAE V2's decoder mask (dual masking): which cubes the DECODER drops.

Every sample of a batch masks the same number of cubes, so the model can reshape the visible tokens
to (B, N_vis, C). All functions are vectorised over the batch: rank random noise per row and mask
the k lowest ranks. Noise is drawn on the generator's device (so a seeded generator gives the same
masks wherever the result goes), then moved to `device`.
"""
import torch


def _check(batch_size, grid, ratio):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not (isinstance(grid, (tuple, list, torch.Size)) and len(grid) == 3
            and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"grid must be 3 positive ints (T', H', W') = (frames/tubelet, "
                         f"height/patch, width/patch), got {grid!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be a number in [0, 1) (1 would leave the encoder "
                         f"nothing to see), got {ratio!r}")
    return tuple(int(g) for g in grid)


def _lowest_k(batch_size, n, k, generator, device):
    """(B, n) bool with exactly k True per row, uniformly at random, independent rows."""
    gen_device = generator.device if generator is not None else (device or "cpu")
    noise = torch.rand(batch_size, n, generator=generator, device=gen_device)
    ids = noise.argsort(dim=1)[:, :k]  # (B, k) the k positions with the lowest noise
    mask = torch.zeros(batch_size, n, dtype=torch.bool, device=gen_device)
    mask.scatter_(1, ids, True)
    return mask if device is None else mask.to(device)


def tube_masking(batch_size, grid, ratio, generator=None, device=None):
    """(B, T'*H'*W') bool, True = masked; the same spatial mask at every t (a 'tube')."""
    T, H, W = _check(batch_size, grid, ratio)
    k = int(ratio * H * W)                                  # official truncation, per time slice
    spatial = _lowest_k(batch_size, H * W, k, generator, device)          # (B, H'W')
    return spatial[:, None, :].expand(batch_size, T, H * W).reshape(batch_size, T * H * W)


def random_masking(batch_size, grid, ratio, generator=None, device=None):
    """(B, N) bool, True = masked; int(ratio * N) cubes chosen anywhere in space-time."""
    T, H, W = _check(batch_size, grid, ratio)
    return _lowest_k(batch_size, T * H * W, int(ratio * T * H * W), generator, device)


def frame_masking(batch_size, grid, ratio, generator=None, device=None):
    """(B, N) bool, True = masked; int(ratio * T') whole time slices masked."""
    T, H, W = _check(batch_size, grid, ratio)
    frames = _lowest_k(batch_size, T, int(ratio * T), generator, device)  # (B, T')
    return frames[:, :, None].expand(batch_size, T, H * W).reshape(batch_size, T * H * W)


def running_cell_masking(batch_size, grid, ratio, generator=None, device=None):
    """(B, N) bool, True = the decoder drops this cube (VideoMAE V2's RunningCellMaskingGenerator).
    Every 2x2 cell of a time slice drops int(4 * ratio) of its 4 cubes; the pattern moves one place
    along the cell per time slice, so over 4 slices every position is decoded alike, and the
    starting phase is random per clip. ratio 0.5: a diagonal pair per cell, 784 of 1568 decoded."""
    T, H, W = _check(batch_size, grid, ratio)
    k = int(4 * ratio)
    if not 0 < k < 4 or H % 2 or W % 2:
        raise ValueError(f"running-cell masking needs 0.25 <= ratio < 1 and an even grid, got "
                         f"ratio {ratio} on {H}x{W}")
    gen_device = generator.device if generator is not None else (device or 'cpu')
    phase = torch.randint(4, (batch_size, 1, 1), generator=generator, device=gen_device)
    # the cell as a queue [drop x k, keep x (4-k)], read from position phase + t + 1 at slice t
    pos = (phase + torch.arange(T, device=gen_device)[:, None] + 1
           + torch.arange(4, device=gen_device)) % 4                            # (B, T, 4)
    cells = (pos < k).view(batch_size, T, 2, 2)
    mask = cells.repeat(1, 1, H // 2, W // 2).reshape(batch_size, T * H * W)  # tiled over the slice
    return mask if device is None else mask.to(device)
