"""State-dict keys, order and shapes equal the official release's lists
(spec/official-checkpoint-keys.txt, blocks elided there are extrapolated), and the parameter counts
of all four sizes match exactly."""
import re
from pathlib import Path

import pytest
import torch

from model import SIZES, build_classifier, build_pretrain

# the release's key list, a copy of the spec's
KEYS = Path(__file__).resolve().parent / 'data' / 'official-checkpoint-keys.txt'


def parse_sections():
    """-> [(entries [(key, shape)], total_tensors, total_params)] with elided blocks filled in."""
    sections, entries = [], []
    for line in KEYS.read_text().splitlines():
        m = re.match(r'# total tensors: (\d+); parameters: ([\d,]+)', line)
        if m:
            sections.append((expand(entries), int(m[1]), int(m[2].replace(',', ''))))
            entries = []
        elif line and not line.startswith('#') and '\t' in line:
            key, shape = line.split('\t')
            entries.append((key, tuple(int(s) for s in re.findall(r'\d+', shape))))
    return sections


def expand(entries):
    """The file shows blocks 0 and the last one; blocks in between are copies of block 0."""
    out, last = [], {}
    for key, shape in entries:
        m = re.match(r'(.*blocks\.)(\d+)\.(.*)', key)
        if m:
            prefix, i = m[1], int(m[2])
            prev = last.get(prefix, i)
            # first key of the last shown block: insert the gap
            if i > prev + 1:
                template = [(k, s) for k, s in out if k.startswith(f'{prefix}{prev}.')]
                for j in range(prev + 1, i):
                    out += [(k.replace(f'{prefix}{prev}.', f'{prefix}{j}.', 1), s)
                            for k, s in template]
            last[prefix] = max(prev, i)
        out.append((key, shape))
    return out


def test_parser_reproduces_the_files_totals():
    for entries, tensors, params in parse_sections():
        assert len(entries) == tensors
        assert sum(torch.Size(s).numel() for _, s in entries) == params


def test_base_pretrain_and_classifier_state_dicts_equal_the_official_lists():
    (pre, _, _), (cls, _, _) = parse_sections()
    with torch.device('meta'):
        p, c = build_pretrain('base'), build_classifier('base', 400)
    assert [(k, tuple(v.shape)) for k, v in p.state_dict().items()] == pre
    assert [(k, tuple(v.shape)) for k, v in c.state_dict().items()] == cls


@pytest.mark.parametrize('size', ['small', 'base', 'large', 'huge'])
def test_parameter_counts_match_the_release(size):
    line = next(ln for ln in KEYS.read_text().splitlines() if ln.startswith(f'{size}: classifier'))
    cls_count, pre_count = (int(x.replace(',', '')) for x in re.findall(r'\d[\d,]{6,}', line))
    with torch.device('meta'):
        p, c = build_pretrain(size), build_classifier(size, 400)
    assert sum(t.numel() for t in p.parameters()) == pre_count
    assert sum(t.numel() for t in c.parameters()) == cls_count
    assert p.decoder.blocks.__len__() == (4 if size in ('small', 'base') else 12)
    assert p.encoder.blocks[0].attn.num_heads == SIZES[size]['num_heads']


def test_giant_is_videomae_v2s_vit_g14_with_about_a_billion_encoder_parameters():
    with torch.device('meta'):
        p = build_pretrain('giant')
    enc = sum(t.numel() for t in p.encoder.parameters())
    assert abs(enc - 1.011e9) / 1.011e9 < 1e-3                    # V2: ViT-g, 1011M parameters
    assert (p.patch_size, p.encoder.blocks[0].mlp.fc1.out_features) == (14, 6144)   # 1408 x 48/11
    assert (len(p.decoder.blocks), p.mask_token.shape[-1], p.decoder.head.out_features) == \
        (4, 512, 3 * 2 * 14 * 14)
    assert p.config['use_checkpoint'] and SIZES['huge']['use_checkpoint']   # memory by default
