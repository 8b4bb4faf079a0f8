"""Shared tiny configurations and fixtures: real AVI files in the UCF101 and list-file layouts, a
tiny pre-training checkpoint, and a runner for the scripts as users type them (subprocess,
torchrun)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import model as vmae
import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
CLASSES = ['SlideLeft', 'SlideRight', 'SlideUp', 'SlideDown']
# The tiny "pre-trained" model: a 50k-parameter ViT on 4 frames of 32x32 (2 x 4 x 4 = 32 cubes).
SHAPE = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8)
DECODER = dict(decoder_embed_dim=16, decoder_num_heads=2, decoder_depth=1)
CLIP = ['--input_size', '32', '--short_side', '32', '--num_frames', '4', '--sampling_rate', '2',
        '--num_workers', '0', '--device', 'cpu', '--test_clips', '2', '--test_crops', '3']
# finetune: 16 train videos x 2 clips, micro-batch 4 videos, total 8 -> 2 steps per epoch
TINY = CLIP + ['--batch_size', '4', '--total_batch', '8', '--epochs', '2', '--warmup_epochs', '1']
# pretrain on the list layout: 16 videos, micro-batch 2, total 4 -> 4 steps per epoch, 4 epochs
PRETRAIN = ['--dataset', 'list', *[f'--{k}={v}' for k, v in {**SHAPE, **DECODER}.items()],
            '--input_size', '32', '--num_frames', '4', '--sampling_rate', '2', '--batch_size', '2',
            '--total_batch', '4', '--epochs', '4', '--warmup_epochs', '1', '--lr', '0.128',
            '--save_ckpt_freq', '2', '--num_workers', '0', '--device', 'cpu', '--vis_videos', '2']


def run(script, *args, check=True, torchrun=0, env=None):
    """python SCRIPT ARGS (or torchrun with that many processes) from the repository root."""
    cmd = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone',
                               f'--nproc_per_node={torchrun}'] if torchrun else [])
    p = subprocess.run(cmd + [os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                       env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f'exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}')
    return p


def records(folder, kind=None):
    with open(os.path.join(folder, 'log.jsonl')) as f:
        return [r for r in map(json.loads, f) if kind is None or r['kind'] == kind]


def weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def sliding_square(rng, direction, size, frames, background):
    """A coloured 8x8 square sliding in direction (dy, dx) over a gradient:
    (frames, size, size, 3)."""
    video = np.repeat(background[None], frames, 0)
    (y0, x0), colour = rng.integers(0, size - 8, 2), rng.integers(100, 255, 3)
    for t in range(frames):
        y, x = (y0 + 2 * t * direction[0]) % (size - 8), (x0 + 2 * t * direction[1]) % (size - 8)
        video[t, y:y + 8, x:x + 8] = colour
    return video


def gradient(size):
    yy, xx = np.mgrid[:size, :size]
    return np.stack([xx * 5, yy * 5, np.full_like(xx, 60)], -1).clip(0, 255).astype(np.uint8)


def make_ucf_layout(root, per_class_train=4, per_class_test=2, size=40, frames=12):
    """Real AVI files in the UCF101 layout
    (UCF-101/<Class>/v_<Class>_gGG_cCC.avi, ucfTrainTestlist/)."""
    rng, background = np.random.default_rng(0), gradient(size)
    os.makedirs(os.path.join(root, 'ucfTrainTestlist'))
    train, test = [], []
    for c, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, 'UCF-101', name))
        for k in range(per_class_train + per_class_test):
            video = sliding_square(rng, [(0, -1), (0, 1), (-1, 0), (1, 0)][c], size, frames,
                                   background)
            rel = f'{name}/v_{name}_g{k + 1:02d}_c01.avi'
            synthetic.encode_video(os.path.join(root, 'UCF-101', rel), video)
            (train.append(f'{rel} {c + 1}') if k < per_class_train else test.append(rel))
    lists = os.path.join(root, 'ucfTrainTestlist')
    for fname, lines in (('classInd.txt', [f'{i + 1} {n}' for i, n in enumerate(CLASSES)]),
                         ('trainlist01.txt', train), ('testlist01.txt', test)):
        with open(os.path.join(lists, fname), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    return root


def make_list_layout(root, n_train=16, n_test=2, size=32, frames=12):
    """Real AVI files (a square sliding left or right) listed in train.csv / test.csv."""
    os.makedirs(root, exist_ok=True)
    rng, background = np.random.default_rng(0), gradient(size)
    for split, n in (('train', n_train), ('test', n_test)):
        lines = []
        for i in range(n):
            video = sliding_square(rng, (0, 1 if i % 2 else -1), size, frames, background)
            synthetic.encode_video(os.path.join(root, f'{split}{i}.avi'), video)
            lines.append(f'{split}{i}.avi {i % 2}')
        with open(os.path.join(root, f'{split}.csv'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    return root


@pytest.fixture(scope='session')
def videos(tmp_path_factory):
    return make_ucf_layout(str(tmp_path_factory.mktemp('ucf')))


@pytest.fixture(scope='session')
def list_videos(tmp_path_factory):
    return make_list_layout(str(tmp_path_factory.mktemp('list')))


@pytest.fixture(scope='session')
def pretrained(tmp_path_factory):
    """A pre-training checkpoint in pretrain.py's layout (weights and the config's shape keys)."""
    torch.manual_seed(0)
    net = vmae.build_pretrain('small', **SHAPE, **DECODER, img_size=32, num_frames=4)
    path = tmp_path_factory.mktemp('pre') / 'checkpoint-00001.pth'
    torch.save({'model': net.state_dict(), 'stage': 'pretrain', 'epoch': 1,
                'config': {'model': 'small', **SHAPE, **DECODER}}, path)
    return str(path)
