"""The pieces of the fine-tuning recipe: layer-wise lr decay and weight-decay groups on the
classifier, mixup/cutmix soft targets with label smoothing folded in, CutMix's box the same in every
frame, the multi-view merge (the views of one video averaged, only those, padding duplicates counted
once, big batches scored in chunks), and the synthetic row's label-preserving augmentation."""
import csv
import json
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import data
import finetune
import model as vmae
import utils
from test_utils_plumbing import hand_run


def tiny_classifier(depth=3):
    return vmae.build_classifier('small', 5, embed_dim=32, depth=depth, num_heads=2, patch_size=8,
                                 img_size=32, num_frames=4)


def test_layer_decay_embedding_is_layer_0_blocks_follow_head_is_last(tmp_path):
    model, decay, depth = tiny_classifier(depth=3), 0.75, 3
    groups = utils.param_groups(model, 0.05, decay, depth=depth)
    names = {id(p): n for n, p in model.named_parameters()}
    where = {names[id(p)]: g for g in groups for p in g['params']}
    assert sum(len(g['params']) for g in groups) == len(names)             # every parameter, once
    assert set(where) == set(names.values())
    expected_layer = {'patch_embed.proj.weight': 0, 'patch_embed.proj.bias': 0,
                      'blocks.0.attn.qkv.weight': 1, 'blocks.0.attn.q_bias': 1,
                      'blocks.1.mlp.fc1.weight': 2, 'blocks.2.norm2.weight': 3, 'fc_norm.weight': 4,
                      'head.weight': 4, 'head.bias': 4}
    for name, layer in expected_layer.items():
        assert where[name]['layer'] == layer, name
        assert where[name]['lr_scale'] == pytest.approx(decay ** (depth + 1 - layer)), name
    # weight decay only for matrices / kernels; never for biases, norms, q/v biases
    for name, g in where.items():
        is_matrix = name.endswith('.weight') and 'norm' not in name
        assert g['weight_decay'] == (0.05 if is_matrix else 0.0), name
    assert where['head.weight']['lr_scale'] == 1.0
    assert where['patch_embed.proj.weight']['lr_scale'] == pytest.approx(0.75 ** 4)
    # the training step applies the scales: the head gets the scheduled lr, block 0 decay^3 of it
    opt = utils.make_adamw(groups, 1.0, (0.9, 0.999), torch.device('cpu'))
    batch = {'video': torch.randn(2, 3, 4, 32, 32), 'label': torch.tensor([0, 3]), 'failed': ['']}
    run = hand_run(model, opt, [batch], tmp_path, lr=2e-3, min_lr=2e-3)
    utils.train_step(run, lambda b, micro: F.cross_entropy(model(b['video']), b['label']))
    lrs = {names[id(p)]: pg['lr'] for pg in opt.param_groups for p in pg['params']}
    assert lrs['head.weight'] == pytest.approx(2e-3)
    assert lrs['blocks.0.mlp.fc2.weight'] == pytest.approx(2e-3 * 0.75 ** 3)
    assert lrs['patch_embed.proj.weight'] == pytest.approx(2e-3 * 0.75 ** 4)


def test_from_scratch_has_no_layer_decay_two_groups():
    groups = utils.param_groups(tiny_classifier(), 0.05, 1.0, depth=3)
    assert len(groups) == 2 and all(g['lr_scale'] == 1.0 for g in groups)


def batch(n=6, classes=5):
    torch.manual_seed(1)
    # sample i is the constant i everywhere, so every output pixel says which sample it came from
    video = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1, 1).expand(n, 3, 4, 16, 16).clone()
    return video, torch.arange(n) % classes


@pytest.mark.parametrize('mixup,cutmix', [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_soft_targets_sum_to_one_and_keep_the_smoothing(mixup, cutmix):
    video, labels = batch()
    C, s = 5, 0.1
    mixer = finetune.make_mixer({'mixup': mixup, 'cutmix': cutmix})
    for seed in range(5):
        torch.manual_seed(seed)
        out, soft = finetune.mix_batch(video.clone(), labels, C, s, mixer)
        assert soft.shape == (6, C) and torch.allclose(soft.sum(1), torch.ones(6))
        assert soft.min() >= s / C - 1e-6                 # smoothing folded into both terms
        # soft = lam * smooth(y_i) + (1 - lam) * smooth(y_{i-1}); lam read back from the pixels
        lam = (out == video).float().mean(dim=(1, 2, 3, 4))   # share of own pixels (cutmix) ...
        if cutmix == 0.0 or not torch.equal(out.round(), out):    # ... or the mixing weight (mixup)
            lam = 1 - (out - video)[:, 0, 0, 0, 0] / (video.roll(1, 0) - video)[:, 0, 0, 0, 0]
        smooth = torch.nn.functional.one_hot(labels, C).float() * (1 - s) + s / C
        expect = lam[:, None] * smooth + (1 - lam[:, None]) * smooth.roll(1, 0)
        assert torch.allclose(soft, expect, atol=1e-5), (soft, expect)


def test_no_mixing_gives_smoothed_one_hot():
    video, labels = batch()
    mixer = finetune.make_mixer({'mixup': 0.0, 'cutmix': 0.0})
    out, soft = finetune.mix_batch(video, labels, 5, 0.1, mixer)
    assert out is video and soft.max() == pytest.approx(0.92) and soft.min() == pytest.approx(0.02)


def test_cutmix_cuts_the_same_height_width_box_in_every_frame():
    """On (B, 3, T, H, W), the pasted region must be a box in (H, W), identical across T and
    channels: not a slab of frames (the official code's 2022 bug sliced (T, H))."""
    video, labels = batch(n=4)
    video[:, :, :, :, :] += torch.arange(4.0).view(1, 1, 4, 1, 1) * 10     # frames differ, too
    mixer = finetune.make_mixer({'mixup': 0.0, 'cutmix': 1.0})
    seen_box = False
    for seed in range(10):
        torch.manual_seed(seed)
        out, soft = finetune.mix_batch(video.clone(), labels, 5, 0.0, mixer)
        pasted = out != video                                                    # (B, 3, T, H, W)
        for b in range(4):
            frame0 = pasted[b, 0, 0]
            assert all(torch.equal(pasted[b, c, t], frame0) for c in range(3) for t in range(4))
            if frame0.any():
                seen_box = True
                rows, cols = frame0.any(1).nonzero().flatten(), frame0.any(0).nonzero().flatten()
                box = frame0[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
                assert box.all() and frame0.sum() == box.numel()              # a filled rectangle
                # the label weight is the pasted area: lam = 1 - box / (H*W)
                assert soft[b, labels[b]] == pytest.approx(1 - box.numel() / 256, abs=1e-6)
            # pixels come from this sample or its partner i-1 and nowhere else, in every frame
            assert torch.equal(out[b][pasted[b]], video[(b - 1) % 4][pasted[b]])
    assert seen_box


class Batches(list):
    """What utils.evaluate iterates: batches, and the dataset they come from (for its length)."""

    def __init__(self, batches, dataset):
        super().__init__(batches)
        self.dataset = dataset


def test_views_of_a_video_are_averaged_and_only_those_padding_counted_once(tmp_path):
    """ViewMerger: video k's score = mean of the softmax of its own V views; a video seen twice
    (DistributedSampler padding) is counted once. utils.evaluate: every view through the model in
    chunks of max_clips; top-1 / top-5 and the per-class table against an independent
    computation."""
    torch.manual_seed(0)
    V, C = 3, 4
    logits = {k: torch.randn(V, C) * 3 for k in range(5)}
    labels = {0: 3, 1: 2, 2: 0, 3: 2, 4: 1}                                 # 0 and 3 come out right
    order = [[0, 1], [2, 3], [4, 0]]                                   # video 0 again: padding
    merger = utils.ViewMerger()
    for ids in order:
        view_logits = torch.stack([logits[k] for k in ids])               # (B, V, C)
        if ids == [4, 0]:
            view_logits[1] = -view_logits[1]                              # the copy must not count
        merger.add(torch.tensor(ids), view_logits, torch.tensor([labels[k] for k in ids]))
    scores, y = merger.gather()
    assert scores.shape == (5, C) and y.tolist() == [labels[k] for k in range(5)]
    mean = {k: logits[k].softmax(-1).mean(0) for k in range(5)}
    for k in range(5):
        assert torch.allclose(scores[k], mean[k]), k

    # uint8 clips whose pixels code (video id, view): the "model" returns that view's logits
    def clips_of(ids):
        code = torch.tensor(ids).view(-1, 1) * 10 + torch.arange(V)          # (B, V)
        return code.to(torch.uint8).view(-1, V, 1, 1, 1, 1).expand(-1, V, 3, 2, 4, 4).clone()
    loader = Batches([{'video': clips_of(ids), 'label': torch.tensor([labels[k] for k in ids]),
                       'index': torch.tensor(ids), 'failed': ['', '']} for ids in order], range(6))
    chunks = []

    def model_fn(clips):
        chunks.append(len(clips))
        return torch.stack([logits[int(c) // 10][int(c) % 10] for c in clips[:, 0, 0, 0, 0]])

    classes = ['a', 'b', 'c', 'd']
    prefix = str(tmp_path / 'val')
    m = utils.evaluate(model_fn, loader, utils.Dist(), nullcontext, data.FailureLog(), classes,
                       'val (3 views)', save_prefix=prefix, max_clips=2)
    assert chunks == [2] * 9                                  # 3 batches of 2 videos x 3 views
    correct = {k: int(mean[k].argmax() == labels[k]) for k in range(5)}
    assert 0 < sum(correct.values()) < 5                       # neither all right nor all wrong
    assert m == pytest.approx({'top1': 100 * sum(correct.values()) / 5, 'top5': 100.0, 'videos': 5})
    assert m['top1'] == pytest.approx(40.0)
    with open(f'{prefix}-per-class.csv', newline='') as f:
        rows = list(csv.reader(f))
    expected = []
    for c, name in enumerate(classes):
        of_c = [k for k in range(5) if labels[k] == c]
        top1 = 100 * sum(correct[k] for k in of_c) / len(of_c)
        expected.append([name, str(len(of_c)), f'{top1:.2f}'])
    assert rows == [['class', 'videos', 'top1'], *expected]
    assert [r[2] for r in rows[1:]] == ['0.00', '0.00', '50.00', '100.00']
    assert json.load(open(f'{prefix}-results.json')) == {**m, 'title': 'val (3 views)'}


def test_synthetic_row_keeps_direction_labels_and_the_moving_shapes_in_view():
    # A horizontal flip turns MoveLeft into MoveRight and a clockwise rotation into a
    # counter-clockwise one: on the synthetic classes it is label noise. RandomResizedCrop's 8%-area
    # crops cut the shapes out; RandAugment is off too (a short schedule).
    def resolve(*argv):
        return finetune.resolve(['--resume', '', *argv])
    cfg = resolve()
    assert cfg['dataset'] == 'synthetic' and cfg['flip'] is False and cfg['crop'] == 'multiscale'
    assert cfg['model'] == 'small' and cfg['randaug'] == [0, 0]
    ds = finetune.make_dataset(cfg, [('unused.avi', 0)], 'train')
    assert ds.flip is False and ds.crop == 'multiscale' and ds.randaug is None
    k400 = resolve('--dataset', 'k400', '--data_path', 'unused')   # Table 10: RandomResizedCrop,
    # flip and RandAugment, as the official code
    assert k400['flip'] is True and k400['crop'] == 'resized' and k400['randaug'] == [9, 0.5]
    assert k400['model'] == 'base' and k400['opt_betas'] == [0.9, 0.999]
    ds = finetune.make_dataset(k400, [('unused.avi', 0)], 'train')
    assert ds.flip is True and ds.crop == 'resized' and ds.randaug == [9, 0.5]
    mine = resolve('--crop', 'resized', '--flip')
    assert mine['crop'] == 'resized' and mine['flip'] is True
