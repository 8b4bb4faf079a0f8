"""The detection head on the VideoMAE tokens: shapes, RoI pooling, positions at test size,
checkpoint loading."""
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from detect import NUM_ACTIONS, build_detector, detection_loss
from model import build_classifier, build_pretrain, resize_pos_embed, sincos_table

TINY = dict(model='small', embed_dim=32, depth=2, num_heads=2, patch_size=16, input_size=32,
            num_frames=4, drop_path=0.0, head_dropout=0.0, finetune=None)


def test_head_shapes_and_gradients():
    torch.manual_seed(0)
    det = build_detector(TINY)
    assert set(det.backbone.state_dict()) >= {'norm.weight', 'head.weight',
                                              'patch_embed.proj.weight'}
    assert ('fc_norm.weight' not in det.backbone.state_dict()
            and 'pos_embed' not in det.backbone.state_dict())
    video = torch.randn(2, 3, 4, 48, 64)  # a test-size clip, larger than the 32 crop
    boxes = [torch.tensor([[0., 0., 64., 48.], [10., 5., 30., 40.]]), torch.zeros(0, 4)]
    logits = det(video, boxes)
    assert logits.shape == (2, NUM_ACTIONS)
    loss = detection_loss(logits, torch.zeros(2, NUM_ACTIONS))
    loss.backward()
    assert (det.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
            and det.backbone.head.weight.grad is not None)
    assert det(video, [torch.zeros(0, 4), torch.zeros(0, 4)]).shape == (0, NUM_ACTIONS)


def test_head_is_mean_over_time_then_roialign_then_max():
    """Tokens (t, h, w) -> (C, T', H', W') -> mean over T' -> RoIAlign 7x7 at 1/patch -> max over
    7x7."""
    torch.manual_seed(0)
    det = build_detector(TINY).eval()
    det.backbone.head = torch.nn.Identity()          # look at the pooled features themselves
    video = torch.randn(1, 3, 4, 32, 64)
    tokens = det.backbone.forward_features(video)    # (1, T'*H'*W', C) = (1, 2*2*4, 32)
    fmap = tokens.view(1, 2, 2, 4, 32).mean(1).permute(0, 3, 1, 2)  # (1, C, H'=2, W'=4)
    boxes = torch.tensor([[0., 0., 64., 32.], [20., 4., 50., 30.]])
    ref = roi_align(fmap, [boxes], output_size=7, spatial_scale=1 / 16, sampling_ratio=0,
                    aligned=False).amax((2, 3))
    assert torch.allclose(det(video, [boxes]), ref, atol=1e-5)
    # the whole-clip box never pools above the largest cell (bilinear samples are convex
    # combinations)
    assert (det(video, [boxes[:1]])[0] <= fmap.flatten(2).amax(2)[0] + 1e-5).all()


def test_positions_are_the_training_table_resized_not_recomputed():
    """At the training size the model is unchanged; at test size the (T', 2, 2) sine table is
    resized bicubically per time slice (official detection code), not recomputed over the larger
    grid."""
    torch.manual_seed(0)
    det = build_detector(TINY)
    plain = build_classifier('small', NUM_ACTIONS, use_mean_pooling=False, embed_dim=32, depth=2,
                             num_heads=2, img_size=32, num_frames=4)
    plain.load_state_dict(det.backbone.state_dict())
    x = torch.randn(1, 3, 4, 32, 32)
    assert torch.allclose(det.backbone.forward_features(x), plain.forward_features(x), atol=1e-6)
    table = sincos_table(2 * 2 * 2, 32, 'cpu')[None]
    want = resize_pos_embed(table, (2, 2, 2), (2, 3, 4))
    assert 'pos_embed' not in det.backbone.state_dict()  # nothing extra to save or load
    from model import _positions
    assert torch.allclose(_positions(det.backbone, (2, 3, 4), 32, 'cpu'), want[0])
    assert not torch.allclose(_positions(plain, (2, 3, 4), 32, 'cpu'), want[0])


def test_loads_pretrained_and_kinetics_finetuned_checkpoints(tmp_path, capsys):
    torch.manual_seed(0)
    pre = build_pretrain('small', embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                         decoder_num_heads=2, decoder_depth=1, img_size=32, num_frames=4)
    with torch.no_grad():
        pre.encoder.norm.weight.fill_(2.0)
    torch.save({'model': pre.state_dict()}, tmp_path / 'pre.pth')      # official layout
    det = build_detector({**TINY, 'finetune': str(tmp_path / 'pre.pth')})
    assert torch.equal(det.backbone.blocks[1].mlp.fc2.weight, pre.encoder.blocks[1].mlp.fc2.weight)
    assert (det.backbone.norm.weight == 2).all()  # encoder.norm -> the token norm
    cls = build_classifier('small', 400, embed_dim=32, depth=2, num_heads=2, img_size=32,
                           num_frames=4)
    with torch.no_grad():
        cls.fc_norm.weight.fill_(3.0)
    torch.save({'module': cls.state_dict()}, tmp_path / 'k400.pth')    # official fine-tuned layout
    det = build_detector({**TINY, 'finetune': str(tmp_path / 'k400.pth')})
    assert torch.equal(det.backbone.blocks[0].attn.qkv.weight, cls.blocks[0].attn.qkv.weight)
    assert (det.backbone.norm.weight == 1).all()  # fc_norm dropped, norm fresh
    assert det.backbone.head.weight.shape == (NUM_ACTIONS, 32)
    out = capsys.readouterr().out
    assert 'fc_norm left out' in out and 'official-classifier' in out and 'official-pretrain' in out
    assert 'encoder.norm as the token norm' in out and 'encoder.norm left out' not in out


def test_loss_is_bce_summed_over_rois():
    logits, labels = torch.randn(3, NUM_ACTIONS), (torch.rand(3, NUM_ACTIONS) > .9).float()
    ref = sum(F.binary_cross_entropy_with_logits(logits[i], labels[i]) for i in range(3))
    assert torch.allclose(detection_loss(logits, labels), ref)
