"""The shared training plumbing: schedules, parameter groups, checkpoints, RNG, evaluation merging."""
import argparse
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

import utils


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


def test_accumulation_reaches_the_recipe_batch_or_says_what_to_change():
    assert utils.accumulation_steps(1024, 32, 8) == 4
    assert utils.accumulation_steps(192, 24, 8) == 1
    with pytest.raises(SystemExit, match='not a multiple of --batch_size 24'):
        utils.accumulation_steps(1024, 24, 8)


def test_flags_override_the_recipe_and_unset_flags_take_it():
    args = argparse.Namespace(lr=None, epochs=5, dataset='ucf101')
    cfg = utils.resolve_config(args, {'lr': 3e-4, 'epochs': 3200})
    assert cfg == {'lr': 3e-4, 'epochs': 5, 'dataset': 'ucf101'}
    with pytest.raises(KeyError, match='mask_ratio'):
        utils.resolve_config(args, {'mask_ratio': 0.9})
    assert utils.recipe_help({'a': {'lr': 1}, 'b': {'lr': 2}, 'c': {'lr': 1}}, 'lr') == 'recipe default: a/c 1, b 2'


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


def test_layer_decay_scales_embedding_blocks_and_head_and_skips_decay_on_1d():
    model, depth, ld = TinyViT(3), 3, 0.5
    groups = utils.param_groups(model, weight_decay=0.05, layer_decay=ld, depth=depth)
    by_name = {n: g for g in groups for n in g['names']}
    assert by_name['patch_embed.proj.weight']['lr_scale'] == pytest.approx(ld ** 4)
    assert by_name['blocks.0.fc.weight']['lr_scale'] == pytest.approx(ld ** 3)
    assert by_name['blocks.2.fc.weight']['lr_scale'] == pytest.approx(ld ** 1)
    assert by_name['head.weight']['lr_scale'] == 1.0
    assert by_name['blocks.1.fc.weight']['weight_decay'] == 0.05
    for n in ('blocks.1.fc.bias', 'blocks.1.norm.weight', 'fc_norm.weight', 'head.bias', 'patch_embed.proj.bias'):
        assert by_name[n]['weight_decay'] == 0.0, n
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))
    # set_lr applies the scale
    opt = utils.make_adamw(groups, 1.0, (0.9, 0.999), torch.device('cpu'))
    utils.set_lr(opt, 2.0)
    assert sorted({g['lr'] for g in opt.param_groups}) == pytest.approx(sorted({2.0 * ld ** k for k in range(5)}))


def test_checkpoints_are_atomic_and_the_latest_is_found(tmp_path):
    for epoch, step in [(1, 0), (10, 0), (2, 0), (10, 5)]:
        utils.save_checkpoint(tmp_path / utils.checkpoint_name(epoch, step), {'epoch': epoch, 'w': torch.ones(2)})
    (tmp_path / 'checkpoint-00099.pth.tmp.123').write_bytes(b'half a file')  # a crash mid-write
    assert os.path.basename(utils.latest_checkpoint(tmp_path)) == 'checkpoint-00010-000005.pth'
    assert not [p for p in os.listdir(tmp_path) if '.tmp.' in p and '99' not in p]
    assert utils.load_state(utils.latest_checkpoint(tmp_path))['epoch'] == 10
    assert utils.resolve_resume('', tmp_path) is None
    assert utils.resolve_resume('auto', tmp_path / 'empty') is None
    with pytest.raises(SystemExit, match='no such file'):
        utils.resolve_resume(str(tmp_path / 'nope.pth'), tmp_path)


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
    m.add(torch.tensor([7]), torch.tensor([[[-9.0, 9.0], [-9.0, 9.0]]]), torch.tensor([0]))  # padding copy
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
    assert rows[0] == ('a', 2, 50.0) and rows[1] == ('b', 2, 50.0) and rows[2][1] == 0 and math.isnan(rows[2][2])
    utils.write_per_class_csv(tmp_path / 'A.csv', [('a', 2, 90.0), ('b', 2, 50.0), ('c', 1, 40.0)])
    utils.write_per_class_csv(tmp_path / 'B.csv', [('a', 2, 60.0), ('b', 2, 52.0), ('c', 1, 80.0)])
    text = utils.compare_per_class(tmp_path / 'A.csv', tmp_path / 'B.csv', margin=10)
    a_part, b_part = text.split('B (')
    assert 'a ' in a_part and '+ 30.0' in a_part and 'b ' not in a_part.split('\n', 2)[2]
    assert 'c ' in b_part and '+ 40.0' in b_part


def test_amp_setup_picks_fp32_on_cpu_and_refuses_fp16_there():
    ctx, scaler, name = utils.amp_setup(torch.device('cpu'))
    assert name == 'fp32' and scaler is None
    ctx, scaler, name = utils.amp_setup(torch.device('cpu'), 'bf16')
    with ctx():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(SystemExit, match='fp16 needs a GPU'):
        utils.amp_setup(torch.device('cpu'), 'fp16')


def test_non_finite_loss_stops_with_a_message_naming_the_checkpoint_folder():
    utils.check_finite(1.0, 3, 'runs/x')
    with pytest.raises(SystemExit, match='loss is nan at step 7.*runs/x'):
        utils.check_finite(float('nan'), 7, 'runs/x')
