"""The pieces of the fine-tuning recipe: layer-wise lr decay and weight-decay groups on the classifier,
mixup/cutmix soft targets with label smoothing folded in, CutMix's box the same in every frame, and the
multi-view merge (the views of one video averaged, only those, padding duplicates counted once), and the
synthetic row's label-preserving augmentation."""

import pytest
import torch

import finetune
import model as vmae
import utils


def tiny_classifier(depth=3):
    return vmae.build_classifier('small', 5, embed_dim=32, depth=depth, num_heads=2, patch_size=8, img_size=32,
                                 num_frames=4)


def test_layer_decay_embedding_is_layer_0_blocks_follow_head_is_last():
    model, decay, depth = tiny_classifier(depth=3), 0.75, 3
    groups = utils.param_groups(model, 0.05, decay, depth=depth)
    where = {n: g for g in groups for n in g['names']}
    assert set(where) == {n for n, _ in model.named_parameters()}             # every parameter, once
    expected_layer = {'patch_embed.proj.weight': 0, 'patch_embed.proj.bias': 0,
                      'blocks.0.attn.qkv.weight': 1, 'blocks.0.attn.q_bias': 1, 'blocks.1.mlp.fc1.weight': 2,
                      'blocks.2.norm2.weight': 3, 'fc_norm.weight': 4, 'head.weight': 4, 'head.bias': 4}
    for name, layer in expected_layer.items():
        assert where[name]['layer'] == layer, name
        assert where[name]['lr_scale'] == pytest.approx(decay ** (depth + 1 - layer)), name
    # weight decay only for matrices / kernels; never for biases, norms, q/v biases
    for name, g in where.items():
        is_matrix = name.endswith('.weight') and 'norm' not in name
        assert g['weight_decay'] == (0.05 if is_matrix else 0.0), name
    assert where['head.weight']['lr_scale'] == 1.0 and where['patch_embed.proj.weight']['lr_scale'] == pytest.approx(0.75 ** 4)
    # set_lr applies the scales: the head gets the scheduled lr, block 0 decay^3 of it
    opt = utils.make_adamw(groups, 1.0, (0.9, 0.999), torch.device('cpu'))
    utils.set_lr(opt, 2e-3)
    lrs = {n: pg['lr'] for pg, g in zip(opt.param_groups, groups) for n in g['names']}
    assert lrs['head.weight'] == pytest.approx(2e-3) and lrs['blocks.0.mlp.fc2.weight'] == pytest.approx(2e-3 * 0.75 ** 3)


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
        assert soft.min() >= s / C - 1e-6                                      # smoothing folded into both terms
        # soft = lam * smooth(y_i) + (1 - lam) * smooth(y_{i-1}); lam read back from the pixels
        lam = (out == video).float().mean(dim=(1, 2, 3, 4))                   # share of own pixels (cutmix) ...
        if cutmix == 0.0 or not torch.equal(out.round(), out):                # ... or the mixing weight (mixup)
            lam = 1 - (out - video)[:, 0, 0, 0, 0] / (video.roll(1, 0) - video)[:, 0, 0, 0, 0]
        smooth = torch.nn.functional.one_hot(labels, C).float() * (1 - s) + s / C
        expect = lam[:, None] * smooth + (1 - lam[:, None]) * smooth.roll(1, 0)
        assert torch.allclose(soft, expect, atol=1e-5), (soft, expect)


def test_no_mixing_gives_smoothed_one_hot():
    video, labels = batch()
    out, soft = finetune.mix_batch(video, labels, 5, 0.1, finetune.make_mixer({'mixup': 0.0, 'cutmix': 0.0}))
    assert out is video and soft.max() == pytest.approx(0.92) and soft.min() == pytest.approx(0.02)


def test_cutmix_cuts_the_same_height_width_box_in_every_frame():
    """On (B, 3, T, H, W), the pasted region must be a box in (H, W), identical across T and channels:
    not a slab of frames (the official code's 2022 bug sliced (T, H))."""
    video, labels = batch(n=4)
    video[:, :, :, :, :] += torch.arange(4.0).view(1, 1, 4, 1, 1) * 10            # frames differ, too
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


def test_views_of_a_video_are_averaged_and_only_those_padding_counted_once():
    """utils.evaluate + ViewMerger: video k's score = mean of the softmax of its own V views; a video seen twice
    (DistributedSampler padding) is counted once; top-1 against an independent computation."""
    torch.manual_seed(0)
    V, C = 3, 4
    logits = {k: torch.randn(V, C) * 3 for k in range(5)}
    labels = {0: 1, 1: 2, 2: 0, 3: 3, 4: 1}
    order = [[0, 1], [2, 3], [4, 0]]                                           # video 0 again: padding
    # the "model" reads the video id from the clip and returns that view's logits
    loader = [{'video': torch.stack([torch.full((V, 3, 2, 4, 4), k, dtype=torch.uint8) for k in ids]) * 0 +
               torch.tensor(ids, dtype=torch.uint8).view(-1, 1, 1, 1, 1, 1) * 10 +
               torch.arange(V, dtype=torch.uint8).view(1, V, 1, 1, 1, 1),
               'label': torch.tensor([labels[k] for k in ids]), 'index': torch.tensor(ids), 'failed': ['', '']}
              for ids in order]

    def model_fn(clips):
        codes = clips[:, 0, 0, 0, 0].long()
        return torch.stack([logits[int(c) // 10][int(c) % 10] for c in codes])

    merger = utils.evaluate(model_fn, loader, torch.device('cpu'), max_clips=2, progress=False)
    scores, y = merger.gather()
    assert scores.shape == (5, C) and y.tolist() == [labels[k] for k in range(5)]
    for k in range(5):
        assert torch.allclose(scores[k], logits[k].softmax(-1).mean(0))
    expected_top1 = 100 * sum(int(logits[k].softmax(-1).mean(0).argmax() == labels[k]) for k in range(5)) / 5
    assert utils.topk_accuracy(scores, y)['top1'] == pytest.approx(expected_top1)


def test_synthetic_row_keeps_direction_labels_and_the_moving_shapes_in_view():
    # A horizontal flip turns MoveLeft into MoveRight and a clockwise rotation into a counter-clockwise one:
    # on the synthetic classes it is label noise. RandomResizedCrop's 8%-area crops cut the shapes out.
    resolve = lambda *a: finetune.resolve(finetune.build_parser().parse_args([*a, '--resume', '']))  # noqa: E731
    cfg = resolve()
    assert cfg['dataset'] == 'synthetic' and cfg['flip'] is False and cfg['crop'] == 'multiscale'
    ds = finetune.make_dataset(cfg, [('unused.avi', 0)], 'train')
    assert ds.flip is False and ds.crop == 'multiscale'
    k400 = resolve('--dataset', 'k400')  # Table 10 keeps the official RandomResizedCrop and flip
    assert k400['flip'] is True and k400['crop'] == 'resized'
    assert resolve('--crop', 'resized', '--flip', 'yes')['crop'] == 'resized'
