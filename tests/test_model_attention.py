"""The SDPA attention is plain softmax(QK^T/sqrt(d))V with q/v biases (k none), forward and
backward; blocks, drop path, checkpointing and config errors behave as documented."""
import math

import pytest
import torch

from model import Attention, attention, DropPath, build_classifier, build_pretrain

TINY = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2, patch_size=8, img_size=32, num_frames=4)


def plain_attention(attn, x):
    B, N, C = x.shape
    H, W = attn.num_heads, attn.qkv.weight
    q = x @ W[:C].T + attn.q_bias                      # k has no bias
    k = x @ W[C:2 * C].T
    v = x @ W[2 * C:].T + attn.v_bias
    heads = lambda t: t.view(B, N, H, C // H).transpose(1, 2)
    q, k, v = heads(q), heads(k), heads(v)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // H), dim=-1)
    out = (a @ v).transpose(1, 2).reshape(B, N, C)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize('dim,heads', [(32, 4), (40, 2)])          # head dim 8 and 20 (huge has 80)
def test_sdpa_attention_matches_plain_softmax_forward_and_backward(dim, heads):
    torch.manual_seed(0)
    attn = Attention(dim, heads).double()
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(3, 7, dim, dtype=torch.double, requires_grad=True)
    params = [x] + list(attn.parameters())
    out = attn(x)
    ref = plain_attention(attn, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, g)
    grads_ref = torch.autograd.grad(ref, params, g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert grads[1].abs().sum() > 0 and grads[2].abs().sum() > 0  # q_bias, v_bias get gradients


def test_cpu_bf16_attention_is_softmax_attention_to_bf16_rounding():
    # the written-out path model.attention takes on CPU in bf16, against fp64 SDPA
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 64, 16, dtype=torch.double).unbind(0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = attention(*(t.bfloat16() for t in (q, k, v)))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=0.05)
    assert (out.double() - ref).abs().mean() < 0.01


def test_drop_path_is_per_sample_and_identity_in_eval():
    dp = DropPath(0.5).train()
    torch.manual_seed(0)
    y = dp(torch.ones(2000, 3, 4))
    per_sample = y.flatten(1)
    # dropped or scaled by 1/(1-p)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert abs((per_sample[:, 0] == 0).float().mean() - 0.5) < 0.05
    assert torch.equal(dp.eval()(torch.ones(4, 3)), torch.ones(4, 3))


def test_drop_path_rates_grow_linearly():
    m = build_classifier('small', 5, **{**TINY, 'depth': 5}, drop_path_rate=0.2)
    assert [b.drop_path.p for b in m.blocks] == pytest.approx([0, 0.05, 0.1, 0.15, 0.2])
    assert not any('gamma' in k for k in m.state_dict())              # no layer scale (official)


def test_gradient_checkpointing_gives_same_outputs_and_grads():
    torch.manual_seed(0)
    a = build_pretrain('small', **TINY)
    b = build_pretrain('small', **TINY, use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    video = torch.randn(2, 3, 4, 32, 32)
    mask = torch.zeros(2, 2 * 4 * 4, dtype=torch.bool)
    mask[:, ::3] = True
    ga, gb = [torch.autograd.grad(m(video, mask).square().sum(), list(m.parameters()))
              for m in (a, b)]
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_unknown_size_or_option_names_it_and_the_choices():
    with pytest.raises(ValueError, match=r"'tiny'.*small, base, large, huge"):
        build_pretrain('tiny')
    with pytest.raises(ValueError, match=r"embed_dims.*valid options:.*embed_dim"):
        build_classifier('base', 10, embed_dims=12)
    with pytest.raises(ValueError, match='init_values'):             # no stage, no release uses it
        build_classifier('small', 10, init_values=0.1)
    with pytest.raises(ValueError, match='not divisible by num_heads'):
        build_classifier('small', 10, embed_dim=30, num_heads=4)
    m = build_classifier('small', 10, **TINY)
    with pytest.raises(ValueError, match='not divisible into cubes'):
        m(torch.randn(1, 3, 3, 32, 32))
