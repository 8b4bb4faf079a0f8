"""pretrain.py end to end on real (tiny) videos, in subprocesses as users run it: the loss falls; a run killed
with SIGKILL after a checkpoint, or stopped by SIGTERM mid-epoch, resumes to bit-identical weights; two
torchrun processes (gloo) hold identical weights; --visualize writes pictures; the encoder loads into the
classifier that finetune.py / linprobe.py build."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision

import data
import model as videomae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 50k-parameter ViT on 4 frames of 32x32 (2 x 4 x 4 = 32 cubes); 16 videos, 2 clips per process and
# micro-batch, total batch 4 (2 accumulation steps in one process) -> 4 steps per epoch, 4 epochs.
TINY = ['--dataset', 'list', '--embed_dim', '32', '--depth', '2', '--num_heads', '2', '--decoder_embed_dim', '16',
        '--decoder_num_heads', '2', '--decoder_depth', '1', '--patch_size', '8', '--input_size', '32',
        '--num_frames', '4', '--sampling_rate', '2', '--batch_size', '2', '--total_batch', '4', '--epochs', '4',
        '--warmup_epochs', '1', '--lr', '0.128', '--save_ckpt_freq', '2', '--num_workers', '0', '--device', 'cpu',
        '--vis_videos', '2']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


def make_list_dataset(root, n_train=16, n_test=2, size=32, frames=12):
    """Real AVI files (a coloured square sliding left or right over a gradient) in the list-file layout."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    background = np.stack([xx * 4, yy * 4, np.full_like(xx, 60)], -1).astype(np.uint8)
    for split, n in (('train', n_train), ('test', n_test)):
        lines = []
        for i in range(n):
            video = np.repeat(background[None], frames, 0)
            colour, direction, y = rng.integers(80, 255, 3), 1 if i % 2 else -1, int(rng.integers(0, size - 8))
            for t in range(frames):
                x = (2 + 2 * t * direction) % (size - 8)
                video[t, y:y + 8, x:x + 8] = colour
            data.encode_video(os.path.join(root, f'{split}{i}.avi'), video)
            lines.append(f'{split}{i}.avi {i % 2}')
        with open(os.path.join(root, f'{split}.csv'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    return root


def run(out, *extra, env=None, check=True):
    cmd = [sys.executable, os.path.join(ROOT, 'pretrain.py'), *TINY, '--output_dir', str(out), *extra]
    p = subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f'exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}')
    return p


def weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return make_list_dataset(str(tmp_path_factory.mktemp('videos')))


@pytest.fixture(scope='module')
def reference(dataset, tmp_path_factory):
    """One uninterrupted run; the other tests compare against its final weights."""
    out = tmp_path_factory.mktemp('reference')
    run(out, '--data_path', dataset)
    return out


def test_tiny_run_lowers_loss_and_keeps_checkpoints(reference):
    records = [json.loads(ln) for ln in open(reference / 'log.jsonl')]
    steps = [r for r in records if r['kind'] == 'step']
    epochs = [r for r in records if r['kind'] == 'epoch']
    assert len(steps) == 16 and [r['epoch'] for r in epochs] == [1, 2, 3, 4]
    assert steps[0]['lr'] == 0.0 and max(r['lr'] for r in steps) == pytest.approx(0.128 * 4 / 256)
    assert all(k in steps[0] for k in ('loss', 'grad_norm', 'clips_per_s', 'data_wait_s'))
    first, last = np.mean([r['loss'] for r in steps[:4]]), np.mean([r['loss'] for r in steps[-4:]])
    assert last < first - 0.03, (first, last)
    # every epoch was checkpointed, only every --save_ckpt_freq 2 (and the last) kept, pictures with them
    assert sorted(f for f in os.listdir(reference) if f.endswith('.pth')) == ['checkpoint-00002.pth', 'checkpoint-00004.pth']
    assert os.path.isfile(reference / 'reconstructions' / 'checkpoint-00004' / 'video-1.png')
    state = torch.load(reference / 'checkpoint-00004.pth', map_location='cpu', weights_only=True)
    assert (state['stage'], state['epoch'], state['step_in_epoch']) == ('pretrain', 4, 0)
    assert state['config']['model_kwargs']['embed_dim'] == 32 and state['config']['accumulation_steps'] == 2
    assert json.load(open(reference / 'config.json'))['mask_ratio'] == 0.9


def test_encoder_loads_into_the_classifier(reference):
    cfg = torch.load(reference / 'checkpoint-00004.pth', map_location='cpu', weights_only=True)['config']
    clf = videomae.build_classifier(cfg['model'], 2, **cfg['model_kwargs'])
    report = videomae.load_checkpoint(clf, reference / 'checkpoint-00004.pth')
    assert sorted(report['missing']) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    enc = weights(reference / 'checkpoint-00004.pth')
    assert torch.equal(clf.state_dict()['blocks.1.mlp.fc2.weight'], enc['encoder.blocks.1.mlp.fc2.weight'])


def test_resume_after_sigkill_is_bit_exact(dataset, reference, tmp_path):
    # the process kills itself (SIGKILL, no handler, no cleanup) right after checkpoint-00001 is on disk
    p = run(tmp_path, '--data_path', dataset, env={'VIDEOMAE_DEBUG_SIGKILL_AFTER_EPOCH': '1'}, check=False)
    assert p.returncode == -signal.SIGKILL
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith('.pth')) == ['checkpoint-00001.pth']
    p = run(tmp_path, '--data_path', dataset)                      # same command: --resume auto
    assert 'resuming' in p.stdout and 'epoch 1 step 0' in p.stdout
    assert_same_weights(weights(tmp_path / 'checkpoint-00004.pth'), weights(reference / 'checkpoint-00004.pth'))


def test_sigterm_saves_mid_epoch_and_resume_is_bit_exact(dataset, reference, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, 'pretrain.py'), *TINY, '--output_dir', str(tmp_path),
           '--data_path', dataset, '--num_workers', '1']           # with a decoding worker, as in real runs
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = tmp_path / 'log.jsonl', time.time() + 120
    while time.time() < deadline and not (log.exists() and '"kind": "step"' in log.read_text()):
        time.sleep(0.02)                                            # wait for the first step, then pre-empt
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert 'SIGTERM' in err and 'saved' in out
    saved = [f for f in os.listdir(tmp_path) if f.endswith('.pth')]
    assert len(saved) == 1 and saved[0].startswith('checkpoint-00000-'), saved   # mid-epoch 0 (4 steps)
    state = torch.load(tmp_path / saved[0], map_location='cpu', weights_only=True)
    assert (state['epoch'], 0 < state['step_in_epoch'] < 4) == (0, True)
    p = run(tmp_path, '--data_path', dataset)
    assert 'resuming' in p.stdout
    assert_same_weights(weights(tmp_path / 'checkpoint-00004.pth'), weights(reference / 'checkpoint-00004.pth'))


def test_torchrun_two_processes_hold_identical_weights(dataset, tmp_path):
    dump = str(tmp_path / 'params')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'pretrain.py'), *TINY, '--epochs', '2', '--output_dir', str(tmp_path / 'out'),
           '--data_path', dataset]
    p = subprocess.run(cmd, cwd=ROOT, env={**ENV, 'VIDEOMAE_DEBUG_PARAM_DUMP': dump}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = torch.load(dump + '-rank0.pt'), torch.load(dump + '-rank1.pt')
    assert_same_weights(r0, r1)
    assert_same_weights(r0, weights(tmp_path / 'out' / 'checkpoint-00002.pth'))
    cfg = json.load(open(tmp_path / 'out' / 'config.json'))
    assert (cfg['world_size'], cfg['accumulation_steps'], cfg['steps_per_epoch']) == (2, 1, 4)
    init = videomae.build_pretrain('small', **cfg['model_kwargs']).state_dict()
    assert not torch.equal(init['encoder.blocks.0.attn.qkv.weight'], r0['encoder.blocks.0.attn.qkv.weight'])


def test_visualize_writes_legible_pngs(reference, tmp_path):
    ckpt = tmp_path / 'checkpoint-00004.pth'
    ckpt.write_bytes((reference / 'checkpoint-00004.pth').read_bytes())
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'pretrain.py'), '--visualize', str(ckpt)], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    pngs = sorted((tmp_path / 'reconstructions' / 'checkpoint-00004').glob('*.png'))
    assert [x.name for x in pngs] == ['video-0.png', 'video-1.png']
    img = torchvision.io.read_image(str(pngs[0]))
    # 7 rows (original, then masked input and reconstruction at 0.75 / 0.9 / 0.95) of 32x32 frames shown 4x
    # (nearest) with a 2-pixel border; 4 frames and a label column
    assert img.shape[0] == 3 and img.shape[1] == 7 * (32 * 4 + 4) and img.shape[2] > 4 * (32 * 4 + 4)
    assert img.float().std() > 10                                   # not a blank picture


def test_non_finite_loss_stops_with_a_clear_message(dataset, tmp_path):
    # an absurd lr blows the weights up within a few steps: the run stops before saving anything bad
    p = run(tmp_path, '--data_path', dataset, '--lr', '1e35', '--warmup_epochs', '0', check=False)
    assert p.returncode == 1
    assert 'error: the loss is' in p.stderr and 'stopping' in p.stderr
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.pth')]


@pytest.mark.skipif(not (shutil.which('cc') or shutil.which('gcc') or shutil.which('g++')),
                    reason='torch.compile on CPU needs a C++ compiler')
def test_compile_trains_like_eager_and_saves_plain_weights(dataset, reference, tmp_path):
    # --compile must not change the maths (same first-epoch losses as the eager reference, to float tolerance)
    # nor the checkpoint: keys without torch.compile's '_orig_mod.' prefix, loadable by the eager model.
    run(tmp_path, '--data_path', dataset, '--compile', '--epochs', '4', '--save_ckpt_freq', '4')
    steps = lambda d: [r['loss'] for r in map(json.loads, open(d / 'log.jsonl')) if r['kind'] == 'step'][:4]
    np.testing.assert_allclose(steps(tmp_path), steps(reference), rtol=1e-3)
    state = weights(tmp_path / 'checkpoint-00004.pth')
    assert state.keys() == weights(reference / 'checkpoint-00004.pth').keys()
    assert not any('_orig_mod' in k for k in state)
