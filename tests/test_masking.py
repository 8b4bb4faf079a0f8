"""Masks: counts (official int() truncation), the tube property, randomness, reproducibility,
errors."""
import numpy as np
import pytest
import torch

from masking import frame_masking, random_masking, running_cell_masking, tube_masking


def test_tube_mask_counts_and_tube_property():
    g = torch.Generator().manual_seed(0)
    m = tube_masking(5, (8, 14, 14), 0.9, generator=g)
    assert m.shape == (5, 1568) and m.dtype == torch.bool
    assert m.sum(1).tolist() == [1408] * 5                    # int(0.9*196)=176 per slice x 8
    s = m.view(5, 8, 196)
    assert (s == s[:, :1]).all()                               # same spatial mask at every t
    assert (s[:, 0].sum(1) == 176).all()
    assert tube_masking(2, (8, 14, 14), 0.75).sum(1).tolist() == [1176, 1176]
    assert tube_masking(2, (8, 14, 14), 0.0).sum() == 0


def test_random_and_frame_mask_counts():
    m = random_masking(4, (8, 14, 14), 0.9)
    assert m.shape == (4, 1568) and m.sum(1).tolist() == [int(0.9 * 1568)] * 4
    s = m.view(4, 8, 196)
    assert not (s == s[:, :1]).all()                           # not a tube
    f = frame_masking(3, (8, 4, 4), 0.5).view(3, 8, 16)
    assert (f.all(2) | ~f.any(2)).all()                        # whole slices
    assert f.all(2).sum(1).tolist() == [4, 4, 4]


def test_rows_and_seeds_differ_generator_reproduces():
    a = tube_masking(8, (8, 14, 14), 0.9, generator=torch.Generator().manual_seed(1))
    b = tube_masking(8, (8, 14, 14), 0.9, generator=torch.Generator().manual_seed(1))
    c = tube_masking(8, (8, 14, 14), 0.9, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(r.nonzero().flatten().tolist()) for r in a}) == 8     # rows independent
    # every spatial position gets masked by some row over many draws (no positional bias stuck at 0)
    many = tube_masking(400, (1, 14, 14), 0.5,
                        generator=torch.Generator().manual_seed(3)).float().mean(0)
    assert 0.35 < many.min() and many.max() < 0.65


def test_device_argument_moves_result():
    g = torch.Generator().manual_seed(0)
    m = random_masking(2, (2, 2, 2), 0.5, generator=g, device=torch.device('cpu'))
    assert m.device.type == 'cpu' and m.sum(1).tolist() == [4, 4]


@pytest.mark.parametrize('ratio', [1.0, -0.1, 1.5, 'x'])
def test_bad_ratio_says_why(ratio):
    with pytest.raises(ValueError, match='mask ratio'):
        tube_masking(2, (8, 14, 14), ratio)


@pytest.mark.parametrize('grid', [(8, 14), (0, 14, 14), (8, 14.0, 14), 5])
def test_bad_grid_says_why(grid):
    with pytest.raises(ValueError, match='grid'):
        random_masking(2, grid, 0.5)


def test_bad_batch_size():
    with pytest.raises(ValueError, match='batch_size'):
        tube_masking(0, (8, 14, 14), 0.9)


def running_cell_reference(T, H, W, k, phase):
    """V2's generator as its release describes it: a queue [1]*k + [0]*(4-k) read from a pointer
    that starts at `phase` and advances by one before every time slice; the 2x2 cell is tiled."""
    queue, ptr, out = [1] * k + [0] * (4 - k), phase, []
    for _ in range(T):
        ptr += 1
        cell = np.array([queue[(i + ptr) % 4] for i in range(4)]).reshape(2, 2)
        out.append(np.tile(cell, (H // 2, W // 2)).flatten())
    return np.stack(out).flatten().astype(bool)


def test_running_cell_mask_is_v2s_pattern_with_a_random_phase_per_clip():
    g = torch.Generator().manual_seed(0)
    mask = running_cell_masking(64, (8, 14, 14), 0.5, generator=g)
    refs = [running_cell_reference(8, 14, 14, 2, phase) for phase in range(4)]
    phases = set()
    for row in mask.numpy():
        hit = [p for p, r in enumerate(refs) if (row == r).all()]
        assert len(hit) == 1
        phases.add(hit[0])
    assert phases == {0, 1, 2, 3}                                   # every phase is drawn
    assert (mask.sum(1) == 8 * 98).all()                             # half of each slice decoded
    again = running_cell_masking(64, (8, 14, 14), 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    with pytest.raises(ValueError, match='even grid'):
        running_cell_masking(1, (8, 7, 7), 0.5)
