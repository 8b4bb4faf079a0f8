"""linprobe.py: only the linear layer learns. The encoder's weights stay bit-identical (no gradient,
no optimizer state, eval mode), the features are forward_features(...).mean(1) through BatchNorm1d
without affine; end to end on real videos from one of our pre-training checkpoints and from a random
encoder."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import data
import linprobe
import model as vmae
import utils
from conftest import CLASSES, CLIP, records, run
from test_utils_plumbing import hand_run


def tiny_probe():
    torch.manual_seed(0)
    encoder = vmae.build_classifier('small', 0, embed_dim=32, depth=2, num_heads=2, patch_size=8,
                                    img_size=32, num_frames=4, drop_path_rate=0.1)
    return linprobe.LinearProbe(encoder, 3)


def test_sgd_steps_change_the_head_and_leave_the_encoder_bit_identical():
    probe = tiny_probe()
    before = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
    head0 = probe.head.weight.clone()
    sgd = torch.optim.SGD(probe.head.parameters(), lr=0.5, momentum=0.9)
    probe.train()
    assert not probe.encoder.training and probe.bn.training     # drop path off, BN statistics on
    for _ in range(3):
        x, y = torch.randn(4, 3, 4, 32, 32), torch.randint(0, 3, (4,))
        torch.nn.functional.cross_entropy(probe(x), y).backward()
        sgd.step()
        sgd.zero_grad()
    assert all(p.grad is None and not p.requires_grad for p in probe.encoder.parameters())
    for k, v in probe.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(probe.head.weight, head0)
    assert len(sgd.state) == 2                                  # head weight and bias only
    trained = [n for n, p in probe.named_parameters() if p.requires_grad]
    assert trained == ['head.weight', 'head.bias']


def probe_run(probe, folder, scaler, batches):
    """utils.Run around a probe as linprobe.main builds it: SGD on the head only, 2 steps of 2
    micro-batches of 4 clips, a constant peak lr of 0.5 (16 x 8 / 256)."""
    sgd = torch.optim.SGD(probe.head.parameters(), lr=0.5, momentum=0.9)
    r = hand_run(probe, sgd, batches, folder, scaler=scaler, log=True, steps_per_epoch=2,
                 total_batch=8, accum_iter=2, lr=16.0, min_lr=16.0, save_ckpt_freq=1)
    r.stage, r.classes = 'linprobe', CLASSES[:3]
    return r


def probe_loss(r):
    """linprobe.main's loss of one micro-batch."""
    def loss_of(batch, micro):
        video = data.normalize(batch['video'].flatten(0, 1))
        return F.cross_entropy(r.net(video).float(), batch['label'])
    return loss_of


def test_train_step_with_a_grad_scaler_moves_the_head_as_without_it_and_keeps_the_encoder(tmp_path):
    """fp16 loss scaling through utils.train_step (GradScaler runs on CPU too): the loss is
    multiplied by the scale and the head's gradients divided by it again, so the head moves exactly
    as without a scaler (not 2^10 times further, nor 2^10 times less), the logged grad norm is in
    true units, the scaler's step/update ran, the encoder stays bit-identical; the scaler's state is
    saved in the checkpoint and a resume restores it."""
    torch.manual_seed(1)
    batches = [{'video': torch.randint(0, 256, (4, 1, 3, 4, 32, 32), dtype=torch.uint8),
                'label': torch.randint(0, 3, (4,)), 'failed': [''] * 4} for _ in range(4)]
    runs = {}
    scalers = {'plain': None, 'scaled': torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)}
    for name, scaler in scalers.items():
        probe = tiny_probe().train()
        encoder0 = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
        head0 = probe.head.weight.clone()
        os.makedirs(tmp_path / name)
        r = probe_run(probe, tmp_path / name, scaler, batches)
        for it in range(2):
            r.it = it
            assert math.isfinite(utils.train_step(r, probe_loss(r)))
        for k, v in probe.encoder.state_dict().items():
            assert torch.equal(v, encoder0[k]), (name, k)
        assert all(p.grad is None for p in probe.encoder.parameters())
        assert not torch.equal(probe.head.weight, head0)
        assert r.lr == 0.5 and all(g['lr'] == 0.5 for g in r.optimizer.param_groups)
        steps = records(tmp_path / name, 'step')
        assert [s['it'] for s in steps] == [1, 2] and [s['epoch'] for s in steps] == [0, 0]
        runs[name] = r, [s['grad_norm'] for s in steps]
    (plain, plain_norms), (scaled, norms) = runs['plain'], runs['scaled']
    for k in ('weight', 'bias'):
        torch.testing.assert_close(getattr(scaled.model.head, k), getattr(plain.model.head, k),
                                   rtol=1e-6, atol=1e-9)
    assert norms == pytest.approx(plain_norms, rel=1e-6) and all(n > 0 for n in norms)
    scaler = scaled.scaler                                    # 2 steps, none skipped: no back-off
    assert scaler.get_scale() == 2.0 ** 10 and scaler.state_dict()['_growth_tracker'] == 2

    path = utils.save(scaled, 1, 0)
    assert os.path.basename(path) == 'checkpoint-00001.pth'
    state = torch.load(path, map_location='cpu', weights_only=True)
    assert state['scaler'] == scaler.state_dict() and state['stage'] == 'linprobe'
    assert len(state['optimizer']['state']) == 2                  # momentum of the head only
    fresh = torch.amp.GradScaler('cpu')                            # 2^16, no growth yet
    restored = probe_run(tiny_probe(), tmp_path / 'restored', fresh, [])
    utils.resume(restored, path)
    assert fresh.state_dict() == scaler.state_dict()
    assert (restored.start_epoch, restored.start_step) == (1, 0)
    for k, v in scaled.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[k], v), k


def test_features_are_mean_pooled_tokens_through_bn_without_affine():
    probe = tiny_probe().eval()
    x = torch.randn(2, 3, 4, 32, 32)
    feats = probe.encoder.forward_features(x).mean(1)
    bn = probe.bn
    assert bn.weight is None and bn.bias is None
    expected = probe.head((feats - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps))
    assert torch.allclose(probe(x), expected, atol=1e-5)


def test_probe_on_our_checkpoint_keeps_its_encoder_and_random_baseline_does_not(videos, pretrained,
                                                                               tmp_path):
    tiny = CLIP + ['--batch_size', '8', '--total_batch', '16', '--epochs', '2',
                   '--warmup_epochs', '1']
    out = tmp_path / 'probe'
    p = run('linprobe.py', '--dataset', 'ucf101', '--data_path', videos, '--finetune', pretrained,
            '--output_dir', str(out), *tiny)
    assert 'ours-pretrain' in p.stdout
    state = torch.load(out / 'checkpoint-00002.pth', map_location='cpu', weights_only=True)
    pre = torch.load(pretrained, map_location='cpu', weights_only=True)['model']
    encoder = {k.removeprefix('encoder.'): v for k, v in state['model'].items()
               if k.startswith('encoder.')}
    loaded = {k for k in encoder if 'encoder.' + k in pre}
    # the classifier's own fc_norm, unused by the probe
    assert set(encoder) - loaded == {'fc_norm.weight', 'fc_norm.bias'}
    assert all(torch.equal(encoder[k], pre['encoder.' + k]) for k in loaded)
    assert state['stage'] == 'linprobe' and state['classes'] == CLASSES
    assert len(state['optimizer']['state']) == 2                   # SGD momentum for the head only
    # Table 11's lr; the shape from the checkpoint
    assert state['config']['lr'] == 0.1 and state['config']['embed_dim'] == 32
    assert state['scaler'] is None                                 # fp32 on CPU: no loss scaling
    steps = records(out, 'step')                                   # 1 step per epoch, 2 epochs
    assert [(r['epoch'], r['it']) for r in steps] == [(0, 1), (1, 2)]
    for r in steps:                                                # the head's grad norm, speed
        assert all(math.isfinite(r[k]) for k in ('loss', 'lr', 'grad_norm', 'clips_per_s', 'step_s',
                                                 'data_wait_s')), r
        assert r['grad_norm'] > 0 and 0 <= r['data_wait_s'] <= r['step_s']
    # per iteration: the warm-up epoch's one step starts at 0, the cosine at the peak 0.1 x 16 / 256
    assert [r['lr'] for r in steps] == [0.0, pytest.approx(0.1 * 16 / 256)]
    epochs = records(out, 'epoch')
    assert [(r['epoch'], r['it']) for r in epochs] == [(1, 1), (2, 2)]
    for r in epochs:                                               # validated after every epoch
        assert math.isfinite(r['loss']) and 0 <= r['data_wait'] <= 1 and r['clips_per_s'] > 0
        assert r['val_videos'] == 8 and 0 <= r['val_top1'] <= r['val_top5'] <= 100
    assert 'epoch 2/2  lr ' in p.stdout and '  loss ' in p.stdout
    results = json.load(open(out / 'test-results.json'))
    assert results['videos'] == 8 and results['title'] == 'test (2 clips x 3 crops)'
    assert os.path.isfile(out / 'test-per-class.csv')
    # same command again: --resume auto picks the finished probe and only re-tests it
    p = run('linprobe.py', '--output_dir', str(out), '--num_workers', '0')
    assert f'resuming {out}/checkpoint-00002.pth at epoch 2 step 0' in p.stdout
    assert records(out, 'step') == steps and records(out, 'epoch') == epochs   # no training
    assert [r['test_videos'] for r in records(out, 'test')] == [8, 8]

    base = tmp_path / 'random'
    run('linprobe.py', '--dataset', 'ucf101', '--data_path', videos, '--checkpoint', pretrained,
        '--random_init', '--output_dir', str(base), *tiny, '--epochs', '1', '--val_freq', '0')
    rand = torch.load(base / 'checkpoint-00001.pth', map_location='cpu', weights_only=True)['model']
    key = 'encoder.blocks.0.attn.qkv.weight'
    assert rand[key].shape == pre[key].shape
    assert not torch.equal(rand[key], pre[key])
    assert not [k for k in records(base, 'epoch')[0] if k.startswith('val_')]   # --val_freq 0
