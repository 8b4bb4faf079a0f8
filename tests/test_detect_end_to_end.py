"""Tiny training and evaluation on a small synthetic AVA-layout set (real JPEG frames, CSV, pbtxt)
on CPU: outputs, resume, evaluation-only, the submission CSV read back by the evaluator, DDP with
torchrun."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

import detect
import synthetic
from conftest import records

TINY = ['--embed_dim', '32', '--depth', '2', '--num_heads', '2', '--patch_size', '16',
        '--input_size', '32', '--short_side', '32', '--num_frames', '4', '--total_batch', '4',
        '--batch_size', '4', '--lr', '1e-2', '--warmup_epochs', '0', '--device', 'cpu',
        '--num_workers', '0']


@pytest.fixture(scope='module')
def ava(tmp_path_factory):
    root = tmp_path_factory.mktemp('ava')
    return synthetic.ensure_ava(str(root / 'syn'), num_train=3, num_val=2, seconds=4, size=(40, 56))


def mAP(text):
    return float(re.search(r'^mAP ([\d.]+)', text, re.M).group(1))


@pytest.mark.slow
def test_train_resume_evaluate(ava, tmp_path, capsys):
    out = str(tmp_path / 'run')
    args = ['--data_path', ava, '--output_dir', out, *TINY]
    detect.main(args + ['--epochs', '1'])
    first = capsys.readouterr().out
    assert 'frame-level AP @ IoU 0.5, all detections kept' in first
    assert os.path.isfile(os.path.join(out, 'checkpoint-00001.pth'))
    detect.main(args + ['--epochs', '2'])  # resumes the finished epoch, trains one more
    text = capsys.readouterr().out
    assert 'resuming' in text and 'checkpoint-00001.pth' in text
    steps, epochs = records(out, 'step'), records(out, 'epoch')
    spe = detect.utils.load_state(
        os.path.join(out, 'checkpoint-00002.pth'))['config']['steps_per_epoch']
    assert [(r['epoch'], r['it']) for r in steps] == [(i // spe, i + 1) for i in range(2 * spe)]
    # one record per optimiser step: loss, lr, grad norm, speed, data wait
    for r in steps:
        assert all(math.isfinite(r[k])
                   for k in ('loss', 'lr', 'grad_norm', 'clips_per_s', 'step_s', 'data_wait_s')), r
        assert r['grad_norm'] > 0 and 0 <= r['data_wait_s'] <= r['step_s']
        # --total_batch 4 clips a step
        assert r['clips_per_s'] == pytest.approx(4 / r['step_s'], rel=0.01), r
    assert [r['epoch'] for r in epochs] == [1, 2] and all(0 <= r['data_wait'] <= 1 for r in epochs)
    ck = detect.utils.load_state(os.path.join(out, 'checkpoint-00002.pth'))
    assert ck['stage'] == 'detect' and ck['epoch'] == 2 and ck['config']['epochs'] == 2
    assert (set(ck['model']) >= {'norm.weight', 'head.weight'}
            and not any(k.startswith('module.') for k in ck['model']))
    with open(os.path.join(out, 'config.json')) as f:
        cfg = json.load(f)
    # Table 12, base without K400 fine-tuning
    assert (cfg['layer_decay'], cfg['recipe']) == (0.75, 'base')
    # classes with GT are rated, those without any (id 1 at least) are reported and skipped
    assert re.search(r'^    1  bend/bow.*n/a \(no GT', text, re.M) and 'without GT skipped' in text
    trained = mAP(text)
    assert [r['mAP'] for r in records(out, 'final')][-1] == pytest.approx(trained, abs=0.01)
    # the submission CSV: 8 columns, 4-digit timestamps, only evaluated ids; scoring it gives the
    # same mAP
    rows = open(os.path.join(out, 'detections_val.csv')).read().split()
    assert rows and all(len(r.split(',')) == 8 and len(r.split(',')[1]) == 4 for r in rows)
    assert {int(r.split(',')[6]) for r in rows} <= set(synthetic.AVA_NAMES)
    detect.main(args + ['--eval_detections', os.path.join(out, 'detections_val.csv')])
    assert mAP(capsys.readouterr().out) == pytest.approx(trained, abs=0.5)
    detect.main(args + ['--eval', '--max_dets', '2'])  # evaluation only, from the latest checkpoint
    text = capsys.readouterr().out
    assert 'top 2 detections per keyframe' in text and len(records(out, 'epoch')) == 2


def test_bad_inputs_name_the_file(ava, tmp_path):
    with pytest.raises(SystemExit, match='train_csv'):
        detect.main(['--data_path', ava, '--train_csv', str(tmp_path / 'nope.csv'), *TINY])
    with pytest.raises(SystemExit, match='does not exist'):
        detect.main(['--data_path', str(tmp_path), *TINY])
    with pytest.raises(SystemExit, match='--data_path .* no such folder'):
        detect.main(['--data_path', str(tmp_path / 'missing'), *TINY])


@pytest.mark.slow
def test_torchrun_two_processes(ava, tmp_path):
    out = str(tmp_path / 'ddp')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
           '--master_port=29533', os.path.join(os.path.dirname(detect.__file__), 'detect.py'),
           '--data_path', ava, '--output_dir', out, *TINY, '--batch_size', '2', '--epochs', '1']
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (res.stdout.count('mAP ') == 1
            and os.path.isfile(os.path.join(out, 'checkpoint-00001.pth')))
