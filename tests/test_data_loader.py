"""VideoDataset / make_loader / augmentation: shapes, determinism, resume, bad files."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import synthetic
from conftest import ROOT


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('cache') / 'synthetic')
    return synthetic.ensure_motion(root, seed=0, num_train=3, num_test=1)


def make_set(synth, **kw):
    samples, _ = data.load_split('synthetic', synth, 'train')
    kw.setdefault('input_size', 32)
    kw.setdefault('mode', 'train')
    return data.VideoDataset(samples, num_frames=8, sampling_rate=2, **kw)


def test_train_items_shape_and_determinism(synth):
    ds = make_set(synth, num_sample=2, crop='resized', flip=True, randaug=(9, 0.5),
                  random_erasing=0.5)
    a, b = ds[(3, 0)], ds[(3, 0)]
    assert a['video'].shape == (2, 3, 8, 32, 32) and a['video'].dtype == torch.uint8
    assert (torch.equal(a['video'], b['video']) and a['label'] == ds.samples[3][1]
            and a['failed'] == '')
    # two independent augmentations of one decode
    assert not torch.equal(a['video'][0], a['video'][1])
    assert not torch.equal(a['video'], ds[(3, 1)]['video'])  # another epoch
    assert not torch.equal(a['video'], ds[(4, 0)]['video'])  # another index


def test_same_augmentation_hits_every_frame():
    frame = torch.randint(0, 256, (1, 3, 48, 64), dtype=torch.uint8)
    clip = frame.repeat(6, 1, 1, 1)
    for crop in ('multiscale', 'resized', 'center'):
        torch.manual_seed(0)
        out = data.train_augment(clip, 32, crop=crop, flip=True, randaug=(9, 0.5))
        assert out.shape == (6, 3, 32, 32) and (out == out[:1]).all()


def test_center_crop_is_the_central_square_of_every_clip():
    clip = torch.randint(0, 256, (4, 3, 48, 64), dtype=torch.uint8)
    for seed in range(5):   # no random draw: the same view every time
        torch.manual_seed(seed)
        out = data.train_augment(clip, 48, crop='center')
        assert torch.equal(out, clip[..., :, 8:56])
    with pytest.raises(ValueError,
                       match="crop must be 'multiscale', 'resized' or 'center', got 'corner'"):
        data.train_augment(clip, 48, crop='corner')


def test_multiscale_crop_follows_the_official_grid():
    torch.manual_seed(0)
    seen = set()
    for _ in range(300):
        y, x, h, w = data.multiscale_crop_box(240, 320, 224)
        # int(240 * [1, .875, .75, .66])
        assert h in (240, 210, 180, 158) and w in (240, 210, 180, 158)
        assert x % ((320 - w) // 4 or 1) == 0 and y % ((240 - h) // 4 or 1) == 0
        seen.add((h, w))
    assert (240, 158) not in seen and (240, 210) in seen and len(seen) == 10  # max_distort 1
    assert data.multiscale_crop_box(256, 340, 224)[2] in (256, 224, 192, 168)


def test_temporal_sampling():
    # short: repeat last
    assert data.dense_indices(20, 8, 4, random=False) == [[0, 4, 8, 12, 16, 19, 19, 19]]
    assert data.dense_indices(100, 4, 4, random=False, clips=3) == [[0, 4, 8, 12], [42, 46, 50, 54],
                                                                    [84, 88, 92, 96]]
    assert data.segment_indices(32, 4, random=False) == [[4, 12, 20, 28]]  # middle of each segment
    torch.manual_seed(0)
    for _ in range(20):
        idx = data.segment_indices(32, 4)[0]
        assert all(8 * k <= i < 8 * (k + 1) for k, i in enumerate(idx))
        s = data.dense_indices(100, 4, 4)[0]
        assert s[0] <= 84 and np.diff(s).tolist() == [4, 4, 4]


def test_test_views_resize_short_side_and_crop_along_long_side(synth):
    ds = make_set(synth, mode='test', test_clips=2, test_crops=3, sampling='segment')
    v = ds[0]['video']
    assert v.shape == (6, 3, 8, 32, 32)
    wide = torch.arange(64).view(1, 1, 1, 64).expand(2, 3, 32, 64).to(torch.uint8)
    views = data.test_views(wide, 16, 16, 3)
    # left / centre / right after halving
    assert [int(x[0, 0, 0, 0]) // 2 for x in views] == [0, 8, 16]
    assert make_set(synth, mode='val')[0]['video'].shape == (1, 3, 8, 32, 32)


def test_unreadable_videos_are_replaced_counted_and_reported(synth, tmp_path):
    samples, _ = data.load_split('synthetic', synth, 'train')
    text = tmp_path / 'renamed.avi'
    text.write_text('not a video\n' * 100)
    raw = open(samples[0][0], 'rb').read()
    trunc = tmp_path / 'truncated.avi'
    trunc.write_bytes(raw[:len(raw) // 3])
    ds = data.VideoDataset([(str(text), 0), (str(trunc), 1)] + samples[:6], mode='train',
                           num_frames=8, sampling_rate=4, input_size=32)
    with pytest.warns(UserWarning, match='renamed.avi'):
        item = ds[(0, 0)]
    assert 'renamed.avi' in item['failed'] and item['video'].shape == (1, 3, 8, 32, 32)
    with pytest.warns(UserWarning, match='truncated.avi'):
        assert 'truncated.avi' in ds[(1, 0)]['failed']
    log = data.FailureLog(max_ratio=0.05)
    log.update([ds[(0, 0)]['failed'], ''])
    assert log.end_epoch(100) == 1  # 1 % : reported
    log.update(['a.avi', 'b.avi\nc.avi'])
    with pytest.raises(data.DataError, match='a.avi'):
        log.end_epoch(20)


def test_failure_log_stop_names_the_flag_that_sets_it():
    log = data.FailureLog(max_ratio=0.1)
    log.update(['x.avi', ''])
    assert log.end_epoch(10) == 1  # 10 %: not more than the ratio, reported
    log.update(['x.avi', 'y.avi'])
    with pytest.raises(data.DataError, match='--max_failed_ratio') as e:
        log.end_epoch(10)
    assert e.value.user_error and 'x.avi' in str(e.value) and '--data_path' in str(e.value)


def test_a_dataset_of_undecodable_videos_is_a_data_error(tmp_path):
    bad = tmp_path / 'bad.avi'
    bad.write_text('not a video\n')
    ds = data.VideoDataset([(str(bad), 0)], mode='val', num_frames=4, input_size=32,
                           max_retries=2)
    with pytest.warns(UserWarning), pytest.raises(data.DataError, match='3 videos in a row'):
        ds[0]


def test_loader_resume_and_worker_independence(synth):
    ds = make_set(synth)
    loader = data.make_loader(ds, 4, train=True, num_workers=0, seed=1)
    loader.sampler.set_epoch(2)
    full = list(loader)
    assert len(full) == 6 and full[0]['video'].shape == (4, 1, 3, 8, 32, 32)
    loader.sampler.set_epoch(2, skip=8)
    resumed = list(loader)
    assert len(resumed) == 4
    assert all(torch.equal(a['video'], b['video']) and torch.equal(a['index'], b['index'])
               for a, b in zip(full[2:], resumed))
    workers = data.make_loader(ds, 4, train=True, num_workers=2, seed=1)
    workers.sampler.set_epoch(2)
    assert all(torch.equal(a['video'], b['video']) for a, b in zip(full, workers))
    loader.sampler.set_epoch(3)
    assert not torch.equal(next(iter(loader))['index'], full[0]['index'])


def test_starting_an_epoch_leaves_the_global_rng_alone(synth):
    # iter(loader) draws a worker base seed; from torch's global RNG it would shift the drop-path
    # masks of every later step, so a run resumed mid-epoch would not match an uninterrupted one
    for workers in (0, 2):
        loader = data.make_loader(make_set(synth), 4, train=True, num_workers=workers, seed=1)
        torch.manual_seed(0)
        expected = torch.rand(3)
        torch.manual_seed(0)
        next(iter(loader))
        assert torch.equal(torch.rand(3), expected), workers


def test_normalize():
    v = torch.full((2, 3, 4, 8, 8), 255, dtype=torch.uint8)
    out = data.normalize(v)
    assert out.dtype == torch.float32 and out.shape == v.shape
    assert torch.allclose(out[0, :, 0, 0, 0],
                          (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD))


@pytest.mark.slow
def test_a_crash_with_decoding_workers_alive_exits_instead_of_waiting_for_them(synth):
    # the workers ignore SIGTERM (a job-wide signal is the main process's to handle), which is also
    # how multiprocessing stops them at exit: without data._stop_workers this run never ends
    # (the traceback keeps train()'s frame, so its loader and workers, alive until the exit)
    code = ('import data\n'
            'def train():\n'
            f"    samples, _ = data.load_split('synthetic', {synth!r}, 'train')\n"
            "    ds = data.VideoDataset(samples, mode='train', num_frames=8, sampling_rate=2, "
            'input_size=32)\n'
            '    loader = data.make_loader(ds, 2, train=True, num_workers=2)\n'
            '    for batch in loader:\n'
            "        raise RuntimeError('a bug in the step')\n"
            'train()\n')
    p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and 'RuntimeError: a bug in the step' in p.stderr, p.stderr[-2000:]
    assert 'Exception ignored' not in p.stderr and 'DataLoader worker' not in p.stderr
