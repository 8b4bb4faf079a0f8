"""linprobe.py: only the linear layer learns. The encoder's weights stay bit-identical (no gradient, no
optimizer state, eval mode), the features are forward_features(...).mean(1) through BatchNorm1d without
affine; end to end on real videos from one of our pre-training checkpoints and from a random encoder."""
import json
import math
import os
from contextlib import nullcontext

import pytest
import torch

import linprobe
import model as vmae
import utils
from test_finetune_end_to_end import CLIP, CLASSES, pretrained, run, videos  # noqa: F401 (fixtures)


def tiny_probe():
    torch.manual_seed(0)
    encoder = vmae.build_classifier('small', 0, embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32,
                                    num_frames=4, drop_path_rate=0.1)
    return linprobe.LinearProbe(encoder, 3)


def test_sgd_steps_change_the_head_and_leave_the_encoder_bit_identical():
    probe = tiny_probe()
    before = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
    head0 = probe.head.weight.clone()
    sgd = torch.optim.SGD(probe.head.parameters(), lr=0.5, momentum=0.9)
    probe.train()
    assert not probe.encoder.training and probe.bn.training                 # drop path off, BN statistics on
    for _ in range(3):
        x, y = torch.randn(4, 3, 4, 32, 32), torch.randint(0, 3, (4,))
        torch.nn.functional.cross_entropy(probe(x), y).backward()
        sgd.step()
        sgd.zero_grad()
    assert all(p.grad is None and not p.requires_grad for p in probe.encoder.parameters())
    for k, v in probe.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(probe.head.weight, head0)
    assert len(sgd.state) == 2                                               # head weight and bias only
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ['head.weight', 'head.bias']


def test_train_step_with_a_grad_scaler_moves_the_head_as_without_it_and_keeps_the_encoder(tmp_path):
    """fp16 loss scaling through linprobe.train_step (GradScaler runs on CPU too): the loss is multiplied by
    the scale and the head's gradients divided by it again, so the head moves exactly as without a scaler
    (not 2^10 times further, nor 2^10 times less), the logged grad norm is in true units, the scaler's
    step/update ran, the encoder stays bit-identical; the scaler's state is saved in the checkpoint and a
    resume restores it."""
    torch.manual_seed(1)
    batches = [dict(video=torch.randint(0, 256, (4, 1, 3, 4, 32, 32), dtype=torch.uint8),  # (B, V, 3, T, H, W)
                    label=torch.randint(0, 3, (4,))) for _ in range(4)]     # 2 steps of 2 micro-batches
    runs = {}
    for name, scaler in (('plain', None), ('scaled', torch.amp.GradScaler('cpu', init_scale=2.0 ** 10))):
        probe = tiny_probe().train()
        encoder0 = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
        head0 = probe.head.weight.clone()
        sgd = torch.optim.SGD(probe.head.parameters(), lr=0.5, momentum=0.9)
        norms = [linprobe.train_step(probe, sgd, scaler, nullcontext, iter(batches[2 * i:2 * i + 2]), 2,
                                     torch.device('cpu'), i, str(tmp_path))[1] for i in range(2)]
        for k, v in probe.encoder.state_dict().items():
            assert torch.equal(v, encoder0[k]), (name, k)
        assert all(p.grad is None for p in probe.encoder.parameters())
        assert not torch.equal(probe.head.weight, head0)
        runs[name] = probe, sgd, scaler, norms
    (plain, _, _, plain_norms), (probe, sgd, scaler, norms) = runs['plain'], runs['scaled']
    torch.testing.assert_close(probe.head.weight, plain.head.weight, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(probe.head.bias, plain.head.bias, rtol=1e-6, atol=1e-9)
    assert norms == pytest.approx(plain_norms, rel=1e-6) and all(n > 0 for n in norms)
    assert scaler.get_scale() == 2.0 ** 10 and scaler.state_dict()['_growth_tracker'] == 2   # 2 steps, none skipped

    linprobe.checkpoint({'output_dir': str(tmp_path)}, utils.Dist(), probe, sgd, scaler, CLASSES[:3], 1, 0)
    state = torch.load(tmp_path / 'checkpoint-00001.pth', map_location='cpu', weights_only=True)
    assert state['scaler'] == scaler.state_dict()
    fresh = torch.amp.GradScaler('cpu')                            # 2^16, no growth yet
    restored = tiny_probe()
    utils.resume_training(tmp_path / 'checkpoint-00001.pth', 'linprobe', restored,
                          torch.optim.SGD(restored.head.parameters(), lr=0.5, momentum=0.9), fresh)
    assert fresh.state_dict() == scaler.state_dict()


def test_features_are_mean_pooled_tokens_through_bn_without_affine():
    probe = tiny_probe().eval()
    x = torch.randn(2, 3, 4, 32, 32)
    feats = probe.encoder.forward_features(x).mean(1)
    bn = probe.bn
    assert bn.weight is None and bn.bias is None
    expected = probe.head((feats - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps))
    assert torch.allclose(probe(x), expected, atol=1e-5)


def test_probe_on_our_checkpoint_keeps_its_encoder_and_random_baseline_does_not(videos, pretrained, tmp_path):
    tiny = CLIP + ['--batch_size', '8', '--total_batch', '16', '--epochs', '2', '--warmup_epochs', '1']
    out = tmp_path / 'probe'
    p = run('linprobe.py', '--dataset', 'ucf101', '--data_path', videos, '--checkpoint', pretrained,
            '--output_dir', str(out), *tiny)
    assert 'ours-pretrain' in p.stdout
    state = torch.load(out / 'checkpoint-00002.pth', map_location='cpu', weights_only=True)
    pre = torch.load(pretrained, map_location='cpu', weights_only=True)['model']
    encoder = {k[len('encoder.'):]: v for k, v in state['model'].items() if k.startswith('encoder.')}
    loaded = {k for k in encoder if 'encoder.' + k in pre}
    assert set(encoder) - loaded == {'fc_norm.weight', 'fc_norm.bias'}      # the classifier's own, unused by the probe
    assert all(torch.equal(encoder[k], pre['encoder.' + k]) for k in loaded)
    assert state['stage'] == 'linprobe' and state['classes'] == CLASSES
    assert len(state['optimizer']['state']) == 2                               # SGD momentum for the head only
    assert state['config']['lr'] == 0.1 and state['config']['embed_dim'] == 32  # Table 11 lr; shape from checkpoint
    assert state['scaler'] is None                                               # fp32 on CPU: no loss scaling
    log = [json.loads(ln) for ln in open(out / 'log.jsonl')]
    steps = [r for r in log if r.get('kind') == 'step']                          # 1 step per epoch, 2 epochs
    assert [(r['epoch'], r['step']) for r in steps] == [(0, 0), (1, 0)]
    for r in steps:                                                              # the head's grad norm, speed
        assert all(math.isfinite(r[k]) for k in ('loss', 'grad_norm', 'clips_per_s', 'step_s', 'data_wait_s')), r
        assert r['grad_norm'] > 0 and 0 <= r['data_wait_s'] <= r['step_s']
    assert [r['epoch'] for r in log if r.get('kind') == 'epoch'] == [1, 2]
    assert 'epoch 2/2  loss' in p.stdout and 'waiting for data' in p.stdout
    results = json.load(open(out / 'test-results.json'))
    assert results['videos'] == 8 and results['title'] == 'test (2 clips x 3 crops)'
    assert os.path.isfile(out / 'test-per-class.csv')
    # same command again: --resume auto picks the finished probe and only re-tests it
    p = run('linprobe.py', '--output_dir', str(out), '--num_workers', '0')
    assert 'resumed at epoch 2 step 0' in p.stdout

    base = tmp_path / 'random'
    run('linprobe.py', '--dataset', 'ucf101', '--data_path', videos, '--checkpoint', pretrained, '--random_init',
        '--output_dir', str(base), *tiny, '--epochs', '1', '--val_freq', '0')
    rand = torch.load(base / 'checkpoint-00001.pth', map_location='cpu', weights_only=True)['model']
    assert rand['encoder.blocks.0.attn.qkv.weight'].shape == pre['encoder.blocks.0.attn.qkv.weight'].shape
    assert not torch.equal(rand['encoder.blocks.0.attn.qkv.weight'], pre['encoder.blocks.0.attn.qkv.weight'])
