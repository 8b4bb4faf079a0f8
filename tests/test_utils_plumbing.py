"""The shared training plumbing: flags over recipes, schedules, parameter groups, the training step,
checkpoints, RNG, evaluation merging."""
import argparse
import csv
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from tqdm import tqdm

import data
import finetune
import utils


def hand_run(model, optimizer, batches, folder, scaler=None, log=False, steps_per_epoch=1, **cfg):
    """A utils.Run with the fields utils.train_step reads, built without utils.start (no lock, no
    loader, no resume): cfg defaults to a constant lr of 1.0 (total_batch 256, no warm-up)."""
    cfg = {'total_batch': 256, 'epochs': 1, 'warmup_epochs': 0, 'lr': 1.0, 'min_lr': 1.0,
           'accum_iter': 1, 'clip_grad': None, 'output_dir': str(folder), **cfg}
    run = utils.Run(cfg, 'test', utils.Dist(), model, model, optimizer, None, [], data.FailureLog(),
                    scaler=scaler, steps_per_epoch=steps_per_epoch)
    run.meter, run.batches = utils.StepMeter(cfg['total_batch']), iter(batches)
    run.log, run.bar = utils.Log(str(folder), enabled=log), tqdm(disable=True)
    return run


def test_cosine_schedule_warms_up_from_zero_then_decays_to_final():
    kw = dict(total_steps=100, warmup_steps=10, base_value=1.0, final_value=0.1)
    assert utils.cosine_schedule(0, **kw) == 0.0
    assert utils.cosine_schedule(5, **kw) == pytest.approx(0.5)
    assert utils.cosine_schedule(10, **kw) == pytest.approx(1.0)
    # half-way through the cosine part: the mean of base and final
    assert utils.cosine_schedule(55, **kw) == pytest.approx(0.55)
    assert utils.cosine_schedule(100, **kw) == pytest.approx(0.1)
    values = [utils.cosine_schedule(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def probe_parser():
    """The flags utils.resolve reads, as a stage's parser has them."""
    p = argparse.ArgumentParser()
    p.add_argument('--resume', default='auto')
    p.add_argument('--output_dir')
    p.add_argument('--lr', type=float)
    for flag in ('--epochs', '--warmup_epochs', '--total_batch', '--batch_size'):
        p.add_argument(flag, type=int)
    p.add_argument('--dataset')
    return p


RECIPE = {'lr': 3e-4, 'epochs': 3200, 'warmup_epochs': 40, 'total_batch': 1024, 'batch_size': 32}


def test_flags_override_the_recipe_and_unset_flags_take_it(tmp_path, monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    monkeypatch.chdir(tmp_path)

    def resolve(*argv, recipe=RECIPE):
        return utils.resolve(probe_parser(), list(argv), lambda c: recipe,
                             lambda c: f"probe-{c['dataset']}")
    out = str(tmp_path / 'out')
    cfg = resolve('--epochs', '5', '--warmup_epochs', '1', '--dataset', 'ucf101',
                  '--output_dir', out)
    assert cfg == {'resume': 'auto', 'output_dir': out, 'lr': 3e-4, 'epochs': 5, 'warmup_epochs': 1,
                   'total_batch': 1024, 'batch_size': 32, 'accum_iter': 32, 'dataset': 'ucf101'}
    # an explicit --batch_size is kept and the accumulation follows it; no --dataset: synthetic, and
    # the output folder is named by output_of under runs/
    cfg = resolve('--epochs', '5', '--warmup_epochs', '1', '--batch_size', '16')
    assert (cfg['batch_size'], cfg['accum_iter']) == (16, 64) and cfg['epochs'] == 5
    assert cfg['dataset'] == 'synthetic'
    assert cfg['output_dir'] == os.path.join('runs', 'probe-synthetic')
    with pytest.raises(KeyError, match='mask_ratio'):
        resolve('--output_dir', out, recipe={**RECIPE, 'mask_ratio': 0.9})
    assert utils.recipe_help({'a': {'lr': 1}, 'b': {'lr': 2}, 'c': {'lr': 1}}, 'lr') == \
        'recipe default: a/c 1, b 2'


def test_auto_resume_takes_the_saved_config_under_the_flags_and_over_the_recipe(tmp_path,
                                                                                monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    out = tmp_path / 'out'
    out.mkdir()
    saved = {'lr': 1e-3, 'epochs': 7, 'warmup_epochs': 2, 'dataset': 'k400',
             'output_dir': '/elsewhere'}
    utils.save_checkpoint(str(out / utils.checkpoint_name(3)), {'config': saved})
    cfg = utils.resolve(probe_parser(), ['--output_dir', str(out), '--epochs', '9'],
                        lambda c: RECIPE, lambda c: 'unused')
    assert cfg['resume'] == str(out / 'checkpoint-00003.pth') and cfg['output_dir'] == str(out)
    assert (cfg['epochs'], cfg['lr'], cfg['warmup_epochs'], cfg['dataset']) == (9, 1e-3, 2, 'k400')
    assert cfg['total_batch'] == 1024                                 # not saved: the recipe's


class TinyViT(nn.Module):
    """Parameter names as in model.py's classifier (official names)."""

    def __init__(self, depth=3):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(3, 4, 2, 2)
        self.blocks = nn.ModuleList(nn.Sequential() for _ in range(depth))
        for b in self.blocks:
            b.add_module('fc', nn.Linear(4, 4))
            b.add_module('norm', nn.LayerNorm(4))
        self.fc_norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


def test_layer_decay_scales_embedding_blocks_and_head_and_skips_decay_on_1d(tmp_path):
    model, depth, ld = TinyViT(3), 3, 0.5
    groups = utils.param_groups(model, weight_decay=0.05, layer_decay=ld, depth=depth)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: g for g in groups for p in g['params']}
    assert by_name['patch_embed.proj.weight']['lr_scale'] == pytest.approx(ld ** 4)
    assert by_name['blocks.0.fc.weight']['lr_scale'] == pytest.approx(ld ** 3)
    assert by_name['blocks.2.fc.weight']['lr_scale'] == pytest.approx(ld ** 1)
    assert by_name['head.weight']['lr_scale'] == 1.0
    assert by_name['blocks.1.fc.weight']['weight_decay'] == 0.05
    for n in ('blocks.1.fc.bias', 'blocks.1.norm.weight', 'fc_norm.weight', 'head.bias',
              'patch_embed.proj.bias'):
        assert by_name[n]['weight_decay'] == 0.0, n
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))
    # train_step applies the scale to the scheduled lr: base 1.0 x 512 / 256 = 2.0 peak, half-way
    # through the cosine to 0 -> 1.0, times decay^k per group
    opt = utils.make_adamw(groups, 1.0, (0.9, 0.999), torch.device('cpu'))
    run = hand_run(model, opt, [{'failed': ['']}], tmp_path, steps_per_epoch=10, total_batch=512,
                   min_lr=0.0)
    run.it = 5
    utils.train_step(run, lambda batch, micro: sum((p ** 2).sum() for p in model.parameters()))
    assert run.lr == pytest.approx(1.0)
    assert sorted({g['lr'] for g in opt.param_groups}) == \
        pytest.approx(sorted({ld ** k for k in range(5)}))
    for g in opt.param_groups:
        assert g['lr'] == pytest.approx(g['lr_scale']), [names[id(p)] for p in g['params']]


def test_checkpoints_are_atomic_and_the_latest_is_found(tmp_path, monkeypatch):
    for epoch, step in [(1, 0), (10, 0), (2, 0), (10, 5)]:
        utils.save_checkpoint(tmp_path / utils.checkpoint_name(epoch, step),
                              {'epoch': epoch, 'w': torch.ones(2)})
    (tmp_path / 'checkpoint-00099.pth.tmp.123').write_bytes(b'half a file')  # a crash mid-write
    assert os.path.basename(utils.latest_checkpoint(tmp_path)) == 'checkpoint-00010-000005.pth'
    assert not [p for p in os.listdir(tmp_path) if '.tmp.' in p and '99' not in p]
    assert utils.load_state(utils.latest_checkpoint(tmp_path))['epoch'] == 10
    assert utils.latest_checkpoint(tmp_path / 'empty') is None
    with pytest.raises(SystemExit, match='no such file'):
        utils.load_state(str(tmp_path / 'nope.pth'))
    (tmp_path / 'zero.pth').write_bytes(b'')
    with pytest.raises(SystemExit, match='is an empty file'):
        utils.load_state(str(tmp_path / 'zero.pth'))

    # a write that fails half-way (torch.save reports a full disk as RuntimeError): one error line
    # naming the file, the temporary file removed, nothing under the real name, the others kept
    def short_write(state, f):
        f.write(b'half')
        raise RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed'
                           '\nsecond line')
    monkeypatch.setattr(utils.torch, 'save', short_write)
    before = sorted(os.listdir(tmp_path))
    path = tmp_path / utils.checkpoint_name(11)
    with pytest.raises(SystemExit, match=r'^error: writing .*checkpoint-00011\.pth failed '
                       r'\(PytorchStreamWriter failed writing file data/0: file write failed\)'):
        utils.save_checkpoint(path, {'epoch': 11})
    assert not os.path.exists(f'{path}.tmp.{os.getpid()}') and not path.exists()
    assert sorted(os.listdir(tmp_path)) == before
    assert os.path.basename(utils.latest_checkpoint(tmp_path)) == 'checkpoint-00010-000005.pth'


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    utils.seed_everything(3)
    utils.save_checkpoint(tmp_path / 'c.pth', {'rng': utils.rng_state()})
    first = (random.random(), np.random.rand(), torch.rand(3))
    utils.set_rng_state(utils.load_state(tmp_path / 'c.pth')['rng'])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_view_merger_averages_softmax_over_views_and_ignores_padding_duplicates():
    m = utils.ViewMerger()
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]],    # video 7: two views
                           [[0.0, 3.0], [0.0, 1.0]]])   # video 8
    m.add(torch.tensor([7, 8]), logits, torch.tensor([0, 1]))
    m.add(torch.tensor([7]), torch.tensor([[[-9.0, 9.0], [-9.0, 9.0]]]),
          torch.tensor([0]))                              # a padding copy: the first one counts
    scores, labels = m.gather()
    expected7 = (logits[0].softmax(-1)).mean(0)
    assert torch.allclose(scores[0], expected7) and labels.tolist() == [0, 1]
    assert utils.topk_accuracy(scores, labels, ks=(1,)) == {'top1': 100.0}


def test_topk_and_per_class_accuracy_and_compare(tmp_path):
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]])
    labels = torch.tensor([0, 1, 1, 0])
    acc = utils.topk_accuracy(scores, labels, ks=(1, 2))
    assert acc['top1'] == 50.0 and acc['top2'] == 75.0
    rows = utils.per_class_accuracy(scores, labels, ['a', 'b', 'c'])
    assert rows[0] == ('a', 2, 50.0) and rows[1] == ('b', 2, 50.0)
    assert rows[2][1] == 0 and math.isnan(rows[2][2])
    for name, rows in (('A.csv', [('a', 2, 90.0), ('b', 2, 50.0), ('c', 1, 40.0)]),
                       ('B.csv', [('a', 2, 60.0), ('b', 2, 52.0), ('c', 1, 80.0)])):
        with open(tmp_path / name, 'w', newline='') as f:          # as utils.evaluate writes it
            csv.writer(f).writerows([('class', 'videos', 'top1'), *rows])
    text = finetune.compare_per_class(tmp_path / 'A.csv', tmp_path / 'B.csv', margin=10)
    a_part, b_part = text.split('B (')
    assert 'a ' in a_part and '+ 30.0' in a_part and 'b ' not in a_part.split('\n', 2)[2]
    assert 'c ' in b_part and '+ 40.0' in b_part


def test_amp_setup_picks_native_bf16_or_fp32_on_cpu_and_refuses_fp16_there():
    ctx, scaler, name = utils.amp_setup(torch.device('cpu'))
    native = 'avx512_bf16' in open('/proc/cpuinfo').read().split()   # what the kernel reports
    assert name == ('bf16' if native else 'fp32') and scaler is None
    ctx, scaler, name = utils.amp_setup(torch.device('cpu'), 'bf16')
    with ctx():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(SystemExit, match='fp16 needs a GPU'):
        utils.amp_setup(torch.device('cpu'), 'fp16')


def test_non_finite_loss_stops_with_a_message_naming_the_checkpoint_folder():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.randn(4, 3)
    batches = [{'failed': [''], 'scale': 1.0}, {'failed': [''], 'scale': float('nan')}]
    run = hand_run(model, sgd, batches, 'runs/x', steps_per_epoch=10, epochs=1)

    def loss_of(batch, micro):
        return model(x).pow(2).mean() * batch['scale']

    w0, run.it = model.weight.clone(), 6
    assert math.isfinite(utils.train_step(run, loss_of))
    assert not torch.equal(model.weight, w0)                          # a finite step is applied
    good = {k: v.clone() for k, v in model.state_dict().items()}
    run.it = 7
    with pytest.raises(SystemExit, match=r'loss is nan at step 8; stopping before it reaches the '
                       r'weights\. The last good checkpoint in runs/x is kept'):
        utils.train_step(run, loss_of)
    for k, v in model.state_dict().items():                           # the bad step never applied
        assert torch.equal(v, good[k]), k
