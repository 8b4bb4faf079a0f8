"""pretrain.py end to end on real (tiny) videos, in subprocesses as users run it: the loss falls,
the checkpoints and pictures are kept as --save_ckpt_freq says, the encoder loads into the
classifier that finetune.py / linprobe.py build, --visualize draws any checkpoint, a diverging run
stops cleanly, and --compile trains like eager. (Pre-emption, SIGKILL and torchrun:
tests/test_run_mechanism.py.)"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision

import checkpoints
import model as videomae
import utils
from conftest import PRETRAIN, records, run, weights


@pytest.fixture(scope='module')
def reference(list_videos, tmp_path_factory):
    """One uninterrupted run; the other tests look at its outputs."""
    out = tmp_path_factory.mktemp('reference')
    run('pretrain.py', *PRETRAIN, '--data_path', list_videos, '--output_dir', out)
    return out


@pytest.mark.slow
def test_tiny_run_lowers_loss_and_keeps_checkpoints(reference):
    steps, epochs = records(reference, 'step'), records(reference, 'epoch')
    assert len(steps) == 16 and [r['epoch'] for r in epochs] == [1, 2, 3, 4]
    assert steps[0]['lr'] == 0.0 and max(r['lr'] for r in steps) == pytest.approx(0.128 * 4 / 256)
    assert all(k in steps[0] for k in ('loss', 'grad_norm', 'clips_per_s', 'data_wait_s'))
    first, last = np.mean([r['loss'] for r in steps[:4]]), np.mean([r['loss'] for r in steps[-4:]])
    assert last < first - 0.03, (first, last)
    # every epoch was checkpointed, only every --save_ckpt_freq 2 (and the last) kept, pictures
    # with them
    assert (sorted(f for f in os.listdir(reference) if f.endswith('.pth'))
            == ['checkpoint-00002.pth', 'checkpoint-00004.pth'])
    assert os.path.isfile(reference / 'reconstructions' / 'checkpoint-00004' / 'video-1.png')
    curve = torchvision.io.read_image(str(reference / 'loss.png'))   # the loss curve, drawn
    assert tuple(curve.shape) == (3, 300, 640) and (curve < 255).any()
    state = torch.load(reference / 'checkpoint-00004.pth', map_location='cpu', weights_only=True)
    assert (state['stage'], state['epoch'], state['step_in_epoch']) == ('pretrain', 4, 0)
    assert state['config']['embed_dim'] == 32 and state['config']['accum_iter'] == 2
    assert json.load(open(reference / 'config.json'))['mask_ratio'] == 0.9


@pytest.mark.slow
def test_encoder_loads_into_the_classifier(reference):
    cfg = torch.load(reference / 'checkpoint-00004.pth', map_location='cpu',
                     weights_only=True)['config']
    clf = videomae.build_classifier(cfg['model'], 2, **utils.shape(cfg))
    report = checkpoints.load_checkpoint(clf, reference / 'checkpoint-00004.pth')
    assert sorted(report['missing']) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias',
                                         'head.weight']
    enc = weights(reference / 'checkpoint-00004.pth')
    assert torch.equal(clf.state_dict()['blocks.1.mlp.fc2.weight'],
                       enc['encoder.blocks.1.mlp.fc2.weight'])


@pytest.mark.slow
def test_visualize_writes_legible_pngs(reference, tmp_path):
    ckpt = tmp_path / 'checkpoint-00004.pth'
    ckpt.write_bytes((reference / 'checkpoint-00004.pth').read_bytes())
    run('pretrain.py', '--visualize', ckpt)
    pngs = sorted((tmp_path / 'reconstructions' / 'checkpoint-00004').glob('*.png'))
    assert [x.name for x in pngs] == ['video-0.png', 'video-1.png']
    img = torchvision.io.read_image(str(pngs[0]))
    # 7 rows (original, then masked input and reconstruction at 0.75 / 0.9 / 0.95) of the 4 frames,
    # 32x32 shown 4x (nearest), 2-pixel gaps: torchvision.utils.make_grid
    assert tuple(img.shape) == (3, 2 + 7 * (32 * 4 + 2), 2 + 4 * (32 * 4 + 2))
    rows = img[:, 2:-2].unfold(1, 128, 130)                          # (3, 7, W, 128)
    assert (rows[:, 0] != rows[:, 1]).any()                         # the masked input differs
    assert img.float().std() > 10                                   # not a blank picture


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_message(list_videos, tmp_path):
    # an absurd lr blows the weights up within a few steps: the run stops before saving anything bad
    p = run('pretrain.py', *PRETRAIN, '--data_path', list_videos, '--output_dir', tmp_path,
            '--lr', '1e35', '--warmup_epochs', '0', check=False)
    assert p.returncode == 1
    assert 'error: the loss is' in p.stderr and 'stopping' in p.stderr
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.pth')]


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which('cc') or shutil.which('gcc') or shutil.which('g++')),
                    reason='torch.compile on CPU needs a C++ compiler')
def test_compile_trains_like_eager_and_saves_plain_weights(list_videos, reference, tmp_path):
    # --compile must not change the maths (same first-epoch losses as the eager reference, to float
    # tolerance) nor the checkpoint: keys without torch.compile's '_orig_mod.' prefix, loadable by
    # the eager model.
    run('pretrain.py', *PRETRAIN, '--data_path', list_videos, '--output_dir', tmp_path, '--compile',
        '--save_ckpt_freq', '4')
    steps = lambda d: [r['loss'] for r in records(d, 'step')][:4]  # noqa: E731
    np.testing.assert_allclose(steps(tmp_path), steps(reference), rtol=1e-3)
    state = weights(tmp_path / 'checkpoint-00004.pth')
    assert state.keys() == weights(reference / 'checkpoint-00004.pth').keys()
    assert not any('_orig_mod' in k for k in state)
