"""linprobe.py: only the linear layer learns. The encoder's weights stay bit-identical (no gradient, no
optimizer state, eval mode), the features are forward_features(...).mean(1) through BatchNorm1d without
affine; end to end on real videos from one of our pre-training checkpoints and from a random encoder."""
import json
import os

import torch

import linprobe
import model as vmae
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
