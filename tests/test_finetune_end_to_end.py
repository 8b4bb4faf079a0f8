"""finetune.py as users run it (subprocesses, real AVI files in the UCF101 layout, CPU): from one of
our pre-training checkpoints and from scratch; the test protocol's scores and per-class CSV;
--resume auto; --predict prints class names; --compare; two torchrun processes (gloo) report the
same scores as one."""
import csv
import json
import math
import os

import pytest
import torch

import finetune
from conftest import CLASSES, TINY, records, run

@pytest.fixture(scope='module')
def finetuned(videos, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp('ft')
    p = run('finetune.py', '--dataset', 'ucf101', '--data_path', videos, '--finetune', pretrained,
            '--output_dir', str(out), *TINY)
    return out, p.stdout


@pytest.mark.slow
def test_finetuning_from_our_pretraining_checkpoint_reports_test_protocol_scores(
        finetuned, pretrained):
    out, stdout = finetuned
    assert 'ours-pretrain' in stdout and "'head.weight'" in stdout          # load report printed
    results = json.load(open(out / 'test-results.json'))
    assert results['videos'] == 8 and 0 <= results['top1'] <= results['top5'] <= 100
    assert results['title'] == 'test (2 clips x 3 crops)'
    rows = list(csv.DictReader(open(out / 'test-per-class.csv')))
    assert [r['class'] for r in rows] == CLASSES and all(r['videos'] == '2' for r in rows)
    state = torch.load(out / 'checkpoint-00002.pth', map_location='cpu', weights_only=True)
    assert ((state['stage'], state['epoch'], state['step_in_epoch'], state['classes'])
            == ('finetune', 2, 0, CLASSES))
    cfg = state['config']
    # the model's shape came from the pre-training checkpoint, the recipe from § B (UCF101), flags
    # on top
    assert (cfg['embed_dim'], cfg['depth'], cfg['patch_size'], cfg['model']) == (32, 2, 8, 'small')
    assert ((cfg['layer_decay'], cfg['drop_path'], cfg['lr'], cfg['num_sample'])
            == (0.7, 0.2, 5e-4, 2))
    # the encoder moved away from the pre-trained weights (it was trained, not frozen)
    pre = torch.load(pretrained, map_location='cpu', weights_only=True)['model']
    assert not torch.equal(state['model']['blocks.0.attn.qkv.weight'],
                           pre['encoder.blocks.0.attn.qkv.weight'])
    steps, epochs = records(out, 'step'), records(out, 'epoch')
    assert [r['epoch'] for r in epochs if 'val_top1' in r] == [1, 2]
    assert [r['test_top1'] for r in records(out, 'test')] == [results['top1']]
    assert steps[0]['lr'] == 0.0                                            # warm-up starts at zero
    # one record per optimiser step: grad norm, speed, time blocked on the loader
    assert [(r['epoch'], r['it']) for r in steps] == [(0, 1), (0, 2), (1, 3), (1, 4)]
    for r in steps:
        assert all(math.isfinite(r[k])
                   for k in ('loss', 'grad_norm', 'clips_per_s', 'step_s', 'data_wait_s')), r
        assert r['grad_norm'] > 0 and 0 <= r['data_wait_s'] <= r['step_s']
        # 8 videos x 2 clips (repeated augmentation) go through the model per step
        assert r['clips_per_s'] == pytest.approx(16 / r['step_s'], rel=0.01), r
    assert [r['epoch'] for r in epochs] == [1, 2] and all(0 <= r['data_wait'] <= 1 for r in epochs)


@pytest.mark.slow
def test_resume_auto_finds_the_finished_run_and_only_tests_it(finetuned):
    out, _ = finetuned
    before = len(records(out, 'epoch'))
    p = run('finetune.py', '--output_dir', str(out), '--num_workers', '0', '--device', 'cpu')
    assert 'resuming' in p.stdout and 'epoch 2 step 0' in p.stdout
    assert len(records(out, 'epoch')) == before                    # no epoch trained again
    assert json.load(open(out / 'test-results.json'))['videos'] == 8


@pytest.mark.slow
def test_predict_prints_top5_class_names_for_each_file(finetuned, videos):
    out, _ = finetuned
    files = [os.path.join(videos, 'UCF-101', c, f'v_{c}_g05_c01.avi') for c in CLASSES[:2]]
    p = run('finetune.py', '--resume', str(out / 'checkpoint-00002.pth'), '--predict', *files)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(tuple(files))]
    assert len(lines) == 2
    for ln in lines:
        names = [part.split()[0] for part in ln.split(': ', 1)[1].split(', ')]
        # 4 classes: the top-5 is all of them, by name
        assert sorted(names) == sorted(CLASSES)
    bad = run('finetune.py', '--resume', str(out / 'checkpoint-00002.pth'), '--predict',
              '/nonexistent.avi', check=False)
    assert bad.returncode != 0 and '/nonexistent.avi' in bad.stderr


@pytest.mark.slow
def test_from_scratch_is_the_supervised_baseline_without_layer_decay(videos, tmp_path):
    p = run('finetune.py', '--dataset', 'ucf101', '--data_path', videos,
            '--output_dir', str(tmp_path), '--embed_dim', '32', '--depth', '2', '--num_heads', '2',
            '--patch_size', '8', *TINY[:-4], '--epochs', '1', '--warmup_epochs', '0',
            '--val_freq', '0')
    cfg = torch.load(tmp_path / 'checkpoint-00001.pth', map_location='cpu',
                     weights_only=True)['config']
    assert cfg['finetune'] is None and cfg['layer_decay'] == 1.0
    assert json.load(open(tmp_path / 'test-results.json'))['videos'] == 8
    assert 'loaded' not in p.stdout
    # the default epochs switch to the from-scratch recipe (§ B: 200 on K400, 100 on SSv2)
    for dataset, epochs in (('k400', 200), ('ssv2', 100)):
        cfg = finetune.resolve(['--dataset', dataset, '--data_path', 'x', '--resume', ''])
        assert (cfg['epochs'], cfg['layer_decay']) == (epochs, 1.0)


@pytest.mark.slow
def test_two_processes_score_every_test_video_once(finetuned, videos, tmp_path):
    """torchrun, 2 ranks: 8 videos split 4/4, views merged; the same scores as one process."""
    out, _ = finetuned
    single = json.load(open(out / 'test-results.json'))
    ckpt = str(out / 'checkpoint-00002.pth')
    run('finetune.py', '--eval', '--resume', ckpt, '--output_dir', str(tmp_path),
        '--num_workers', '0', torchrun=2)
    double = json.load(open(tmp_path / 'test-results.json'))
    assert double['videos'] == 8
    assert (double['top1'], double['top5']) == pytest.approx((single['top1'], single['top5']))


@pytest.mark.slow
def test_compare_lists_the_classes_where_one_model_wins(tmp_path):
    a, b = tmp_path / 'a.csv', tmp_path / 'b.csv'
    for path, scores in ((a, (90, 50, 70)), (b, (60, 55, 90))):
        with open(path, 'w', newline='') as f:
            csv.writer(f).writerows([('class', 'videos', 'top1'),
                                     *zip(('Archery', 'Bowling', 'Diving'), (10,) * 3, scores)])
    p = run('finetune.py', '--compare', str(a), str(b), '--margin', '10')
    assert 'A (' in p.stdout and 'better on 1:' in p.stdout
    a_part, b_part = p.stdout.split('B (')
    assert ('Archery' in a_part and '+ 30.0' in a_part and 'Diving' in b_part
            and 'Bowling' not in p.stdout)
