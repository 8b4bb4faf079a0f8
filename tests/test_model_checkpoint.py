"""Checkpoints in the official layouts and ours load and reproduce outputs; pre-training ->
classifier reports exactly what it left out; mismatches fail with readable errors naming keys and
shapes."""
import argparse

import pytest
import torch

from checkpoints import load_checkpoint
from masking import tube_masking
from model import build_classifier, build_pretrain

TINY = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2, patch_size=8, img_size=32, num_frames=4)


def randomise(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def test_official_pretrain_layout_loads_strict_and_reproduces(tmp_path):
    torch.manual_seed(0)
    a = randomise(build_pretrain('small', **TINY))
    # official pre-training files: {'model': sd, 'args': Namespace, ...}
    torch.save({'model': a.state_dict(), 'args': argparse.Namespace(model='x'), 'epoch': 800},
               tmp_path / 'p.pth')
    b = build_pretrain('small', **TINY).eval()
    report = load_checkpoint(b, tmp_path / 'p.pth')
    assert (report['missing'] == [] and report['unexpected'] == []
            and report['source'] == 'official-pretrain')
    video = torch.randn(2, 3, 4, 32, 32)
    mask = tube_masking(2, a.grid(video.shape), 0.75)
    with torch.no_grad():
        assert torch.equal(a(video, mask), b(video, mask))


def test_finetuned_layout_with_prefixes_and_fp16_loads_strict(tmp_path):
    a = randomise(build_classifier('small', 5, **TINY))
    # DeepSpeed 'module' wrapper, DDP + torch.compile prefixes, fp16 weights
    sd = {'module._orig_mod.' + k: v.half() for k, v in a.state_dict().items()}
    torch.save({'module': sd, 'ds_version': '0.5.8'}, tmp_path / 'f.pth')
    b = build_classifier('small', 5, **TINY).eval()
    report = load_checkpoint(b, str(tmp_path / 'f.pth'))
    assert report == {'missing': [], 'unexpected': [], 'source': 'official-classifier', 'notes': []}
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.half().float()(video), b(video))
    # ours, bare state dict too
    torch.save({'model': a.state_dict(), 'config': a.config}, tmp_path / 'ours.pth')
    assert load_checkpoint(b, tmp_path / 'ours.pth')['source'] == 'ours-classifier'
    # config rebuilds
    assert load_checkpoint(build_classifier(**a.config), tmp_path / 'ours.pth')['missing'] == []
    torch.save(a.state_dict(), tmp_path / 'bare.pth')
    assert load_checkpoint(b, tmp_path / 'bare.pth')['missing'] == []


def test_pretrain_into_classifier_reports_exactly_what_it_left_out(tmp_path):
    p = randomise(build_pretrain('small', **TINY))
    torch.save({'model': p.state_dict()}, tmp_path / 'p.pth')
    c = build_classifier('small', 10, **TINY)
    fresh_head = c.head.weight.clone()
    report = load_checkpoint(c, tmp_path / 'p.pth')
    assert report['missing'] == ['fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias']
    assert set(report['unexpected']) == (
        {k for k in p.state_dict() if not k.startswith('encoder.')}
        | {'encoder.norm.weight', 'encoder.norm.bias'})
    assert report['source'] == 'official-pretrain' and report['notes'] == [
        'pre-training checkpoint: encoder loaded; decoder, encoder_to_decoder, mask_token and '
        'encoder.norm left out; fc_norm and head keep their fresh init']
    for k, v in c.state_dict().items():
        if k.startswith(('patch_embed', 'blocks')):
            assert torch.equal(v, p.state_dict()['encoder.' + k]), k
    assert torch.equal(c.head.weight, fresh_head)


def test_other_class_count_drops_the_head_and_says_so(tmp_path):
    a = randomise(build_classifier('small', 400, **TINY))
    torch.save({'module': a.state_dict()}, tmp_path / 'k400.pth')
    b = build_classifier('small', 101, **TINY)
    report = load_checkpoint(b, tmp_path / 'k400.pth')
    assert report['missing'] == ['head.weight', 'head.bias'] == report['unexpected']
    assert '400 classes' in report['notes'][0]
    assert torch.equal(b.blocks[1].mlp.fc2.weight, a.blocks[1].mlp.fc2.weight)


def test_mismatched_checkpoints_fail_naming_keys_and_shapes(tmp_path):
    torch.save({'model': build_pretrain('small', **{**TINY, 'embed_dim': 48}).state_dict()},
               tmp_path / 'w.pth')
    with pytest.raises(ValueError, match=r"shape mismatch: encoder\.patch_embed\.proj\.weight "
                                         r"\(48, 3, 2, 8, 8\) vs model \(32, 3, 2, 8, 8\)"):
        load_checkpoint(build_pretrain('small', **TINY), tmp_path / 'w.pth')
    torch.save({'model': build_pretrain('small', **{**TINY, 'depth': 3}).state_dict()},
               tmp_path / 'd.pth')
    with pytest.raises(ValueError, match=r"not in model: blocks\.2\.norm1\.weight"):
        load_checkpoint(build_classifier('small', 3, **TINY), tmp_path / 'd.pth')
    torch.save({'module': build_classifier('small', 3, **TINY).state_dict()}, tmp_path / 'c.pth')
    with pytest.raises(ValueError, match=r"classifier checkpoint cannot load into a pre-training "
                                         r"model.*missing from checkpoint: mask_token"):
        load_checkpoint(build_pretrain('small', **TINY), tmp_path / 'c.pth')
    torch.save({'epoch': 3}, tmp_path / 'e.pth')
    with pytest.raises(ValueError, match=r"holds no state dict.*'epoch'"):
        load_checkpoint(build_pretrain('small', **TINY), tmp_path / 'e.pth')
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_checkpoint(build_pretrain('small', **TINY), tmp_path / 'nope.pth')


def test_other_frames_and_resolution_load_and_run(tmp_path):
    a = randomise(build_pretrain('small', **TINY))                       # 4 frames, 32 px
    torch.save({'model': a.state_dict()}, tmp_path / 'p.pth')
    c = build_classifier('small', 4, **{**TINY, 'num_frames': 8, 'img_size': 48})
    load_checkpoint(c, tmp_path / 'p.pth')
    assert c(torch.randn(1, 3, 8, 48, 48)).shape == (1, 4)


def test_mean_pooling_classifier_loads_into_a_token_norm_model_leaving_fc_norm_out(tmp_path):
    """A Kinetics-fine-tuned classifier into the AVA backbone (use_mean_pooling=False), as the
    official detection code: fc_norm is left out and reported, the token LayerNorm starts at 1/0."""
    src = randomise(build_classifier('small', 5,
                                     **{k: v for k, v in TINY.items() if 'decoder' not in k}))
    torch.save({'module': src.state_dict()}, tmp_path / 'k400.pth')
    dst = build_classifier('small', 5, use_mean_pooling=False,
                           **{k: v for k, v in TINY.items() if 'decoder' not in k})
    report = load_checkpoint(dst, tmp_path / 'k400.pth')
    assert sorted(report['unexpected']) == ['fc_norm.bias', 'fc_norm.weight']
    assert sorted(report['missing']) == ['norm.bias', 'norm.weight']
    assert torch.equal(dst.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    assert (dst.norm.weight == 1).all() and (dst.norm.bias == 0).all()


def test_interpolate_pos_resizes_the_training_table_only_off_the_training_grid():
    from model import _positions, resize_pos_embed, sincos_table
    kw = {k: v for k, v in TINY.items() if 'decoder' not in k}
    interp = build_classifier('small', 0, interpolate_pos=True, **kw)  # training grid (2, 4, 4)
    plain = build_classifier('small', 0, **kw)
    assert torch.equal(_positions(interp, (2, 4, 4), 32, 'cpu'),
                       _positions(plain, (2, 4, 4), 32, 'cpu'))
    want = resize_pos_embed(sincos_table(32, 32, 'cpu')[None], (2, 4, 4), (2, 5, 6))[0]
    assert torch.allclose(_positions(interp, (2, 5, 6), 32, 'cpu'), want)
    assert _positions(plain, (2, 5, 6), 32, 'cpu').shape == want.shape
    assert not torch.allclose(_positions(plain, (2, 5, 6), 32, 'cpu'), want)
