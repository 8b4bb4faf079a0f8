"""finetune.py as users run it (subprocesses, real AVI files in the UCF101 layout, CPU): from one of our
pre-training checkpoints and from scratch; the test protocol's scores and per-class CSV; --resume auto;
--predict prints class names; --compare; two torchrun processes (gloo) report the same scores as one."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import model as vmae
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
CLASSES = ['SlideLeft', 'SlideRight', 'SlideUp', 'SlideDown']
# The shape of the tiny "pre-trained" model below; finetune.py must read it from the checkpoint.
SHAPE = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, decoder_embed_dim=16, decoder_num_heads=2,
             decoder_depth=1, img_size=32, num_frames=4)
# 16 train videos, 2 clips each (repeated augmentation), micro-batch 4 videos, total 8: 2 steps per epoch.
CLIP = ['--input_size', '32', '--short_side', '32', '--num_frames', '4', '--sampling_rate', '2',
        '--num_workers', '0', '--device', 'cpu', '--test_clips', '2', '--test_crops', '3']
TINY = CLIP + ['--batch_size', '4', '--total_batch', '8', '--epochs', '2', '--warmup_epochs', '1']


def make_ucf_layout(root, per_class_train=4, per_class_test=2, size=40, frames=12):
    """Real AVI files: a coloured square sliding in one of four directions over a gradient, UCF101 layout
    (UCF-101/<Class>/v_<Class>_gGG_cCC.avi, ucfTrainTestlist/classInd.txt, trainlist01.txt, testlist01.txt)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    background = np.stack([xx * 5, yy * 5, np.full_like(xx, 60)], -1).astype(np.uint8)
    os.makedirs(os.path.join(root, 'ucfTrainTestlist'))
    train, test = [], []
    for c, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, 'UCF-101', name))
        dy, dx = [(0, -1), (0, 1), (-1, 0), (1, 0)][c]
        for k in range(per_class_train + per_class_test):
            video = np.repeat(background[None], frames, 0)
            y0, x0, colour = *rng.integers(0, size - 8, 2), rng.integers(100, 255, 3)
            for t in range(frames):
                y, x = (y0 + 2 * t * dy) % (size - 8), (x0 + 2 * t * dx) % (size - 8)
                video[t, y:y + 8, x:x + 8] = colour
            rel = f'{name}/v_{name}_g{k + 1:02d}_c01.avi'
            data.encode_video(os.path.join(root, 'UCF-101', rel), video)
            (train.append(f'{rel} {c + 1}') if k < per_class_train else test.append(rel))
    lists = os.path.join(root, 'ucfTrainTestlist')
    for fname, lines in (('classInd.txt', [f'{i + 1} {n}' for i, n in enumerate(CLASSES)]),
                         ('trainlist01.txt', train), ('testlist01.txt', test)):
        with open(os.path.join(lists, fname), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    return root


def save_tiny_pretrain(path):
    """A pre-training checkpoint in pretrain.py's layout ('model', 'config' with 'model' and 'model_kwargs')."""
    torch.manual_seed(0)
    net = vmae.build_pretrain('small', **SHAPE)
    torch.save({'model': net.state_dict(), 'stage': 'pretrain', 'epoch': 1,
                'config': {'model': 'small', 'model_kwargs': SHAPE}}, path)
    return path


def run(script, *args, check=True, torchrun=0):
    cmd = [sys.executable] + (['-m', 'torch.distributed.run', f'--nproc_per_node={torchrun}'] if torchrun else [])
    p = subprocess.run(cmd + [os.path.join(ROOT, script), *args], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f'exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}')
    return p


@pytest.fixture(scope='package')
def videos(tmp_path_factory):
    return make_ucf_layout(str(tmp_path_factory.mktemp('ucf')))


@pytest.fixture(scope='package')
def pretrained(tmp_path_factory):
    return save_tiny_pretrain(str(tmp_path_factory.mktemp('pre') / 'checkpoint-00001.pth'))


@pytest.fixture(scope='module')
def finetuned(videos, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp('ft')
    p = run('finetune.py', '--dataset', 'ucf101', '--data_path', videos, '--finetune', pretrained,
            '--output_dir', str(out), *TINY)
    return out, p.stdout


def test_finetuning_from_our_pretraining_checkpoint_reports_test_protocol_scores(finetuned, pretrained):
    out, stdout = finetuned
    assert 'ours-pretrain' in stdout and "'head.weight'" in stdout          # load report printed
    results = json.load(open(out / 'test-results.json'))
    assert results['videos'] == 8 and 0 <= results['top1'] <= results['top5'] <= 100
    assert results['title'] == 'test (2 clips x 3 crops)'
    rows = list(csv.DictReader(open(out / 'test-per-class.csv')))
    assert [r['class'] for r in rows] == CLASSES and all(r['videos'] == '2' for r in rows)
    state = torch.load(out / 'checkpoint-00002.pth', map_location='cpu', weights_only=True)
    assert (state['stage'], state['epoch'], state['step_in_epoch'], state['classes']) == ('finetune', 2, 0, CLASSES)
    cfg = state['config']
    # the model's shape came from the pre-training checkpoint, the recipe from § B (UCF101), flags on top
    assert (cfg['embed_dim'], cfg['depth'], cfg['patch_size'], cfg['size']) == (32, 2, 8, 'small')
    assert (cfg['layer_decay'], cfg['drop_path'], cfg['lr'], cfg['num_sample']) == (0.7, 0.2, 5e-4, 2)
    # the encoder moved away from the pre-trained weights (it was trained, not frozen)
    pre = torch.load(pretrained, map_location='cpu', weights_only=True)['model']
    assert not torch.equal(state['model']['blocks.0.attn.qkv.weight'], pre['encoder.blocks.0.attn.qkv.weight'])
    log = [json.loads(ln) for ln in open(out / 'log.jsonl')]
    assert [r['epoch'] for r in log if 'val_top1' in r] == [0, 1]
    assert any('loss' in r for r in log) and any('test_top1' in r for r in log)
    lrs = [r['lr'] for r in log if 'lr' in r]
    assert lrs[0] == 0.0                                                       # warm-up starts at zero
    # pretrain.py's step records, one per optimiser step: grad norm, speed, time blocked on the loader
    steps = [r for r in log if r.get('kind') == 'step']
    assert [(r['epoch'], r['step']) for r in steps] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in steps:
        assert all(math.isfinite(r[k]) for k in ('loss', 'grad_norm', 'clips_per_s', 'step_s', 'data_wait_s')), r
        assert r['grad_norm'] > 0 and 0 <= r['data_wait_s'] <= r['step_s']
        # 8 videos x 2 clips (repeated augmentation) go through the model per step
        assert r['clips_per_s'] == pytest.approx(16 / r['step_s'], rel=0.01), r
    epochs = [r for r in log if r.get('kind') == 'epoch']
    assert [r['epoch'] for r in epochs] == [1, 2] and all(0 <= r['data_wait'] <= 1 for r in epochs)
    assert 'epoch 2/2  loss' in stdout and 'clips/s  waiting for data' in stdout and 'val (1 view)' in stdout


def test_resume_auto_finds_the_finished_run_and_only_tests_it(finetuned):
    out, _ = finetuned
    p = run('finetune.py', '--output_dir', str(out), '--num_workers', '0', '--device', 'cpu')
    assert 'resumed' in p.stdout and 'epoch 2 step 0' in p.stdout
    assert 'waiting for data' not in p.stdout and 'val (1 view)' not in p.stdout   # no epoch trained again
    assert json.load(open(out / 'test-results.json'))['videos'] == 8


def test_predict_prints_top5_class_names_for_each_file(finetuned, videos):
    out, _ = finetuned
    files = [os.path.join(videos, 'UCF-101', c, f'v_{c}_g05_c01.avi') for c in CLASSES[:2]]
    p = run('finetune.py', '--resume', str(out / 'checkpoint-00002.pth'), '--predict', *files)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(tuple(files))]
    assert len(lines) == 2
    for ln in lines:
        names = [part.split()[0] for part in ln.split(': ', 1)[1].split(', ')]
        assert sorted(names) == sorted(CLASSES)                 # 4 classes: the top-5 is all of them, by name
    bad = run('finetune.py', '--resume', str(out / 'checkpoint-00002.pth'), '--predict', '/nonexistent.avi', check=False)
    assert bad.returncode != 0 and '/nonexistent.avi' in bad.stderr


def test_from_scratch_is_the_supervised_baseline_without_layer_decay(videos, tmp_path):
    p = run('finetune.py', '--dataset', 'ucf101', '--data_path', videos, '--output_dir', str(tmp_path),
            '--embed_dim', '32', '--depth', '2', '--num_heads', '2', '--patch_size', '8', *TINY[:-4],
            '--epochs', '1', '--warmup_epochs', '0', '--val_freq', '0')
    cfg = torch.load(tmp_path / 'checkpoint-00001.pth', map_location='cpu', weights_only=True)['config']
    assert cfg['finetune'] is None and cfg['layer_decay'] == 1.0
    assert json.load(open(tmp_path / 'test-results.json'))['videos'] == 8
    assert 'loaded' not in p.stdout
    # the default epochs switch to the from-scratch recipe (§ B: 200 on K400, 100 on SSv2)
    import finetune
    assert finetune.resolve(finetune.build_parser().parse_args(['--dataset', 'k400', '--resume', '']))['epochs'] == 200
    assert finetune.resolve(finetune.build_parser().parse_args(['--dataset', 'ssv2', '--resume', '']))['epochs'] == 100


def test_two_processes_score_every_test_video_once(finetuned, videos, tmp_path):
    """torchrun, 2 ranks: 8 videos split 4/4, views merged; the same scores as one process."""
    out, _ = finetuned
    single = json.load(open(out / 'test-results.json'))
    ckpt = str(out / 'checkpoint-00002.pth')
    run('finetune.py', '--eval', '--resume', ckpt, '--output_dir', str(tmp_path), '--num_workers', '0', torchrun=2)
    double = json.load(open(tmp_path / 'test-results.json'))
    assert double['videos'] == 8
    assert (double['top1'], double['top5']) == pytest.approx((single['top1'], single['top5']))


def test_compare_lists_the_classes_where_one_model_wins(tmp_path):
    a, b = tmp_path / 'a.csv', tmp_path / 'b.csv'
    utils.write_per_class_csv(a, [('Archery', 10, 90.0), ('Bowling', 10, 50.0), ('Diving', 10, 70.0)])
    utils.write_per_class_csv(b, [('Archery', 10, 60.0), ('Bowling', 10, 55.0), ('Diving', 10, 90.0)])
    p = run('finetune.py', '--compare', str(a), str(b), '--margin', '10')
    assert 'A (' in p.stdout and 'better on 1:' in p.stdout
    a_part, b_part = p.stdout.split('B (')
    assert 'Archery' in a_part and '+ 30.0' in a_part and 'Diving' in b_part and 'Bowling' not in p.stdout


def test_sigterm_saves_a_mid_epoch_checkpoint_exits_0_and_the_same_command_resumes(videos, pretrained, tmp_path):
    import signal
    import time
    args = ['--dataset', 'ucf101', '--data_path', videos, '--finetune', pretrained, '--output_dir', str(tmp_path),
            *CLIP, '--batch_size', '2', '--total_batch', '2', '--epochs', '1', '--warmup_epochs', '0', '--val_freq', '0']
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'finetune.py'), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = tmp_path / 'log.jsonl', time.time() + 120
    while time.time() < deadline and not (log.exists() and '"loss"' in log.read_text()):
        time.sleep(0.02)                                        # the first step is done: pre-empt
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    saved = [f for f in os.listdir(tmp_path) if f.endswith('.pth')]
    assert len(saved) == 1 and saved[0].startswith('checkpoint-00000-'), saved     # 8 steps in the epoch
    assert 'the same command resumes' in out
    p = run('finetune.py', *args)
    assert 'resumed' in p.stdout and json.load(open(tmp_path / 'test-results.json'))['videos'] == 8
    # the resumed run ends with the weights of an uninterrupted one, bit for bit (drop path 0.2 and mixup
    # draw from the restored RNG; starting the data loader must not draw from it)
    whole = tmp_path / 'uninterrupted'
    run('finetune.py', *args[:7], str(whole), *args[8:])
    final = lambda d: torch.load(sorted(d.glob('checkpoint-00001*.pth'))[-1], weights_only=True)['model']
    a, b = final(tmp_path), final(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
