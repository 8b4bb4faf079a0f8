"""Hugging Face VideoMAE folders in and out, against transformers itself (an independent
implementation of the same model): small random models on both sides, outputs equal to a relative
error <= 2e-5, for both model kinds, both weight formats and both directions. No network: every
folder is made here with save_pretrained."""
import json
import sys

import pytest
import torch

import checkpoints
import model as vmae
import utils

transformers = pytest.importorskip('transformers')
pytest.importorskip('safetensors')

HUB = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
           image_size=32, patch_size=8, num_frames=4, tubelet_size=2, layer_norm_eps=1e-6,
           decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
           decoder_intermediate_size=128, norm_pix_loss=True)


def randomised(m):
    torch.manual_seed(0)
    with torch.no_grad():                       # every tensor away from its init (biases too)
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def save(hub, folder, safe):
    """save_pretrained; safe=False: the older layout of transformers 4.x instead, pytorch_model.bin
    with 4.x's q_bias/v_bias names (5.x writes only model.safetensors, with query.bias)."""
    hub.save_pretrained(folder)
    if not safe:
        (folder / 'model.safetensors').unlink()
        sd = {k.replace('query.bias', 'q_bias').replace('value.bias', 'v_bias'): v
              for k, v in hub.state_dict().items()}
        torch.save(sd, folder / 'pytorch_model.bin')


def hub_shape(hub):
    """build_* arguments of a transformers config.json: size, encoder shape, pooling."""
    size = next((s for s, v in vmae.SIZES.items() if v['embed_dim'] == hub['hidden_size']), 'base')
    return size, dict(embed_dim=hub['hidden_size'], depth=hub['num_hidden_layers'],
                      num_heads=hub['num_attention_heads'], img_size=hub['image_size'],
                      patch_size=hub['patch_size'], tubelet_size=hub['tubelet_size'],
                      num_frames=hub['num_frames'],
                      mlp_ratio=hub['intermediate_size'] / hub['hidden_size'],
                      use_mean_pooling=hub.get('use_mean_pooling', True))


def ours_like(hub_dir, classes=0):
    size, shape = hub_shape(json.load(open(hub_dir / 'config.json')))
    if classes:
        return vmae.build_classifier(size, classes, **shape)
    return vmae.build_pretrain(size, **shape, decoder_embed_dim=32, decoder_depth=1,
                               decoder_num_heads=2)


VIDEO = torch.randn(2, 3, 4, 32, 32)                    # ours: (B, C, T, H, W); transformers: T, C


@pytest.mark.parametrize('safe', [True, False])
def test_a_hub_pretraining_folder_gives_transformers_reconstructions(tmp_path, safe):
    hub = randomised(transformers.VideoMAEForPreTraining(
        transformers.VideoMAEConfig(**HUB, use_mean_pooling=False)))
    save(hub, tmp_path, safe)
    ours = ours_like(tmp_path).eval()
    report = checkpoints.load_checkpoint(ours, tmp_path)
    assert report['source'] == 'hub-pretrain' and report['missing'] == []
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[:, torch.randperm(32)[:24]] = True
    with torch.no_grad():
        want = hub(VIDEO.transpose(1, 2), bool_masked_pos=mask).logits
        got = ours(VIDEO, mask)
    assert rel_err(got, want) <= 2e-5
    report = checkpoints.load_checkpoint(ours_like(tmp_path, classes=5), tmp_path)  # fine-tuning
    assert report['notes'][0].startswith('pre-training checkpoint: encoder loaded')
    assert not any('bare VideoMAEModel' in n for n in report['notes'])


@pytest.mark.parametrize('safe', [True, False])
def test_a_hub_classifier_folder_gives_transformers_logits_and_its_label_names(tmp_path, safe):
    names = ['archery', 'bowling', 'cycling']
    cfg = transformers.VideoMAEConfig(**HUB, id2label=dict(enumerate(names)),
                                      label2id={n: i for i, n in enumerate(names)})
    hub = randomised(transformers.VideoMAEForVideoClassification(cfg))
    save(hub, tmp_path, safe)
    ours = ours_like(tmp_path, 3).eval()
    report = checkpoints.load_checkpoint(ours, tmp_path)
    assert report['source'] == 'hub-classifier' and report['missing'] == []
    with torch.no_grad():
        assert rel_err(ours(VIDEO), hub(VIDEO.transpose(1, 2)).logits) <= 2e-5
    assert utils.checkpoint_meta(str(tmp_path))['classes'] == names
    # the weights file alone loads too
    alone = tmp_path / ('model.safetensors' if safe else 'pytorch_model.bin')
    assert checkpoints.load_checkpoint(ours_like(tmp_path, 3), alone)['missing'] == []


@pytest.mark.parametrize('kind', ['pretrain', 'classifier'])
def test_our_models_export_to_folders_transformers_loads_with_the_same_outputs(tmp_path, kind):
    torch.manual_seed(0)
    shape = dict(embed_dim=64, depth=2, num_heads=4, patch_size=8, img_size=32, num_frames=4)
    if kind == 'pretrain':
        ours = randomised(vmae.build_pretrain('small', **shape, decoder_embed_dim=32,
                                              decoder_depth=1, decoder_num_heads=2))
        checkpoints.export_hf(ours, tmp_path)
        hub, info = transformers.VideoMAEForPreTraining.from_pretrained(tmp_path,
                                                                         output_loading_info=True)
        mask = torch.zeros(2, 32, dtype=torch.bool)
        mask[:, torch.randperm(32)[:24]] = True
        with torch.no_grad():
            got, want = ours(VIDEO, mask), hub.eval()(VIDEO.transpose(1, 2), bool_masked_pos=mask)
    else:
        ours = randomised(vmae.build_classifier('small', 3, **shape))
        checkpoints.export_hf(ours, tmp_path, class_names=['a', 'b', 'c'])
        hub, info = transformers.VideoMAEForVideoClassification.from_pretrained(
            tmp_path, output_loading_info=True)
        assert hub.config.id2label == {0: 'a', 1: 'b', 2: 'c'}
        with torch.no_grad():
            got, want = ours(VIDEO), hub.eval()(VIDEO.transpose(1, 2))
    assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
    assert rel_err(got, want.logits) <= 2e-5


def test_a_hub_config_that_disagrees_with_the_official_architecture_is_reported(tmp_path):
    hub = transformers.VideoMAEForVideoClassification(transformers.VideoMAEConfig(
        **{**HUB, 'layer_norm_eps': 1e-12}, num_labels=2))
    hub.save_pretrained(tmp_path)
    (tmp_path / 'preprocessor_config.json').write_text(json.dumps(
        {'image_mean': [0.5, 0.5, 0.5], 'image_std': [0.5, 0.5, 0.5]}))
    report = checkpoints.load_checkpoint(ours_like(tmp_path, 2), tmp_path)
    assert any('layer_norm_eps 1e-12' in n for n in report['notes'])
    assert any('image_mean [0.5, 0.5, 0.5]' in n for n in report['notes'])


@pytest.mark.slow
def test_the_stages_take_hub_folders_and_write_them(tmp_path, videos, pretrained):
    from conftest import CLASSES, CLIP, run
    cfg = transformers.VideoMAEConfig(**HUB, id2label=dict(enumerate(CLASSES)),
                                      label2id={n: i for i, n in enumerate(CLASSES)})
    randomised(transformers.VideoMAEForVideoClassification(cfg)).save_pretrained(tmp_path / 'clf')
    video = f'{videos}/UCF-101/SlideLeft/v_SlideLeft_g05_c01.avi'
    p = run('finetune.py', '--dataset', 'ucf101', '--data_path', videos, *CLIP,
            '--resume', tmp_path / 'clf', '--predict', video)
    top = p.stdout.strip().splitlines()[-1]
    assert top.startswith(video) and sorted(x.split()[0] for x in top.split(': ')[1].split(', ')) \
        == sorted(CLASSES)                                           # id2label names
    run('pretrain.py', '--resume', pretrained, '--export_hf', tmp_path / 'pre',
        '--input_size', 32, '--num_frames', 4)
    hub, info = transformers.VideoMAEForPreTraining.from_pretrained(tmp_path / 'pre',
                                                                     output_loading_info=True)
    assert not any(info.values()) and hub.config.hidden_size == 32


def test_a_bare_videomae_model_gives_our_encoder_features(tmp_path):
    hub = randomised(transformers.VideoMAEModel(transformers.VideoMAEConfig(**HUB)))
    hub.save_pretrained(tmp_path)
    size, shape = hub_shape(json.load(open(tmp_path / 'config.json')))
    ours = vmae.build_classifier(size, 0, **shape).eval()   # features only: no head
    report = checkpoints.load_checkpoint(ours, tmp_path)
    assert report['source'] == 'hub-classifier' and 'bare VideoMAEModel' in report['notes'][-1]
    with torch.no_grad():
        got, want = ours.forward_features(VIDEO), hub(VIDEO.transpose(1, 2)).last_hidden_state
    assert rel_err(got, want) <= 2e-5


def test_without_safetensors_export_writes_pytorch_model_bin_and_loading_says_what_to_install(
        tmp_path, monkeypatch):
    shape = dict(embed_dim=64, depth=2, num_heads=4, patch_size=8, img_size=32, num_frames=4)
    ours = randomised(vmae.build_classifier('small', 3, **shape))
    checkpoints.export_hf(ours, tmp_path / 'safe')              # with the package
    with monkeypatch.context() as m:                            # as if it were not installed
        m.setitem(sys.modules, 'safetensors', None)
        m.setitem(sys.modules, 'safetensors.torch', None)
        checkpoints.export_hf(ours, tmp_path / 'bin')
        with pytest.raises(SystemExit, match=r"^error: --finetune .*: pip install safetensors$"):
            checkpoints.load_weights(vmae.build_classifier('small', 3, **shape),
                                     tmp_path / 'safe', '--finetune')
    assert sorted(p.name for p in (tmp_path / 'bin').iterdir()) == ['config.json',
                                                                    'pytorch_model.bin']
    hub = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path / 'bin')
    with torch.no_grad():
        assert rel_err(ours(VIDEO), hub.eval()(VIDEO.transpose(1, 2)).logits) <= 2e-5
