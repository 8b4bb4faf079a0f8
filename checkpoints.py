"""Loading weights in the layouts users have into model.py's models: the official release's .pth
files, our own training checkpoints, and transformers / Hugging Face folders (config.json with
model.safetensors or pytorch_model.bin); and export_hf, our models out in the transformers layout.
"""
import argparse
import json
import os
import re

import torch

from model import SIZES, PretrainVideoMAE, VisionTransformer


# ----------------------------------------------------------------------------- checkpoints
def _read_state_dict(path):
    """A .pth file, a transformers folder or weights file, or a DeepSpeed folder -> (state dict in
    our names, without DDP's 'module.', torch.compile's '_orig_mod.' and the official AVA code's
    'backbone.' prefixes; 'ours', 'official' or 'hub'; notes)."""
    files = ('model.safetensors', 'pytorch_model.bin', 'mp_rank_00_model_states.pt')
    path = next((f for f in (os.path.join(path, n) for n in files) if os.path.isfile(f)),
                os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r} (a file, or a folder with one of "
                                f"{', '.join(files)})")
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file             # ImportError: pip install safetensors
        obj = load_file(path)
    else:
        try:                                # official checkpoints pickle their args Namespace
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read checkpoint {path!r} with torch.load(weights_only=True) "
                             f"({type(e).__name__}: {str(e)[:300]}). If you trust the file, load "
                             "it with weights_only=False and save only its state dict.") from e
    sd = next((obj[k] for k in ('model', 'module', 'state_dict')
               if isinstance(obj, dict) and isinstance(obj.get(k), dict)), obj)
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        top = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"checkpoint {path!r} holds no state dict (a dict of tensors, bare or "
                         f"under 'model'/'module'); found {top}")
    sd = {re.sub(r'^((module|_orig_mod|backbone)\.)+', '', k): v for k, v in sd.items()}
    if any(k.startswith(('videomae.', 'embeddings.patch_embeddings')) for k in sd):  # transformers'
        return _from_hub(sd), 'hub', hub_config_notes(os.path.dirname(path))
    return sd, 'ours' if 'config' in obj else 'official', []


def load_checkpoint(model, path):
    """Load an official, our or a transformers checkpoint into a PretrainVideoMAE or
    VisionTransformer -> {'missing': model keys left at init, 'unexpected': checkpoint keys unused,
    'source': '{official|ours|hub}-{pretrain|classifier}', 'notes': [why, in words]}. What
    fine-tuning leaves out (below) is reported; all else must fit, or a ValueError names it."""
    sd, kind, notes = _read_state_dict(path)
    is_pre = any(k.startswith(('encoder.', 'decoder.')) or k == 'mask_token' for k in sd)
    source = kind + ('-pretrain' if is_pre else '-classifier')
    target, classifier = model.state_dict(), isinstance(model, VisionTransformer)
    unexpected, may_miss = [], set()

    def leave_out(drop, fresh, note):   # checkpoint keys starting with drop go unused, model keys
        unexpected.extend(k for k in sd if k.startswith(drop))    # starting with fresh keep init
        may_miss.update(k for k in target if k.startswith(fresh))
        notes.append(note)
        return {k: v for k, v in sd.items() if not k.startswith(drop)}

    if classifier and is_pre:
        # Fine-tuning keeps encoder.* (prefix removed); encoder.norm becomes the token norm of a
        # model without mean pooling (AVA), else it is left out like the decoder side.
        pre_only = ('decoder.', 'encoder_to_decoder.', 'encoder.head.', 'mask_token')
        token_norm = 'norm.weight' in target
        pre_only += () if token_norm else ('encoder.norm.',)
        sd = leave_out(pre_only, ('fc_norm.', 'head.'), 'pre-training checkpoint: encoder loaded' +
                       (' (encoder.norm as the token norm); decoder, encoder_to_decoder and '
                        'mask_token left out; head keeps its fresh init' if token_norm else
                        '; decoder, encoder_to_decoder, mask_token and encoder.norm left out; '
                        'fc_norm and head keep their fresh init'))
        sd = {k.removeprefix('encoder.'): v for k, v in sd.items()}
    if classifier and kind == 'hub' and not is_pre and not any(
            k.startswith(('head.', 'fc_norm.')) for k in sd):
        sd = leave_out((), ('fc_norm.', 'head.'), 'a bare VideoMAEModel: fc_norm and head keep '
                       'their init')
    if classifier and not is_pre and 'fc_norm.weight' in sd and 'fc_norm.weight' not in target:
        # a mean-pooling classifier (e.g. Kinetics-fine-tuned) into a token-norm model (AVA): as the
        # official detection code, fc_norm is left out and the token LayerNorm starts at 1/0
        sd = leave_out('fc_norm.', 'norm.', 'classifier checkpoint into a token-norm model: '
                       'fc_norm left out, norm starts at 1/0')
    old, new = sd.get('head.weight'), target.get('head.weight')
    if classifier and old is not None and new is not None and old.shape != new.shape:
        sd = leave_out('head.', 'head.', f"head: checkpoint has {old.shape[0]} classes, model "
                       f"{new.shape[0]}; head left out and kept at its init")
    missing = [k for k in target if k not in sd]
    problems = {'missing from checkpoint': [k for k in missing if k not in may_miss],
                'not in model': [k for k in sd if k not in target],
                'shape mismatch': [f"{k} {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                                   for k, v in sd.items() if v.shape != target.get(k, v).shape]}
    problems = [f"{what}: {', '.join(keys[:5])}" + (f' (+{len(keys) - 5} more)' if keys[5:] else '')
                for what, keys in problems.items() if keys]
    if problems:
        hint = '' if classifier or is_pre else \
            ' (a classifier checkpoint cannot load into a pre-training model)'
        raise ValueError(f"checkpoint {path!r} ({source}) does not fit {type(model).__name__}"
                         f"{hint}: " + '; '.join(problems))
    model.load_state_dict(sd, strict=not missing)
    return {'missing': missing, 'unexpected': unexpected, 'source': source, 'notes': notes}


def load_weights(model, path, flag, is_main=True):
    """load_checkpoint for a stage's flag (e.g. '--finetune'), its report printed; a misfit: one
    error line naming the flag and the file."""
    try:
        report = load_checkpoint(model, path)
    except (ValueError, OSError, ImportError) as e:
        fix = f': pip install {e.name.split(".")[0]}' if isinstance(e, ImportError) else ''
        raise SystemExit(f'error: {flag} {path}: {e}{fix}') from None
    if is_main:
        print(f"loaded {path} ({report['source']}): missing {report['missing'][:6]}, unused "
              f"{report['unexpected'][:6]}" + ''.join(f'\n  {n}' for n in report['notes']))
    return report


# ----------------------------------------------------------------------------- Hugging Face folders
# transformers' VideoMAE names the same tensors otherwise: (ours, theirs), in the order that turns
# theirs into ours (reversed: ours into theirs). It has one Linear each for query, key and value
# (our qkv stacks them), calls the q/v biases q_bias/v_bias (4.x) or query.bias/value.bias (5.x)
# and keeps the ViT under videomae. in both model kinds (ours: under encoder. when pre-training).
_HUB = [('patch_embed.proj.', 'embeddings.patch_embeddings.projection.'),
        ('blocks.', 'encoder.layer.'), ('decoder.blocks.', 'decoder.decoder_layers.'),
        ('attn.', 'attention.attention.'), ('attn.proj.', 'attention.output.dense.'),
        ('mlp.fc1.', 'intermediate.dense.'), ('mlp.fc2.', 'output.dense.'),
        ('norm1.', 'layernorm_before.'), ('norm2.', 'layernorm_after.')]


def _from_hub(sd):
    """transformers' state dict -> ours."""
    vit = 'encoder.' if 'mask_token' in sd else ''          # our ViT's prefix
    out = {}
    for k, v in sd.items():
        k = k.replace('query.bias', 'q_bias').replace('value.bias', 'v_bias')        # 5.x -> 4.x
        for ours, hub in _HUB:
            k = k.replace(hub, ours)
        k = re.sub(r'^classifier\.', 'head.', re.sub(r'^(videomae\.)?layernorm\.', r'\1norm.', k))
        out[re.sub(r'^videomae\.', vit, k)] = v
    for q in [k for k in out if k.endswith('attn.query.weight')]:   # stacked into our fused qkv
        out[q.replace('query', 'qkv')] = torch.cat([out.pop(q.replace('query', n))
                                                    for n in ('query', 'key', 'value')])
    return out


def hub_config_notes(folder):
    """Where a transformers folder's config.json disagrees with the official architecture (traps
    of the converted configs): our models keep the official numerics."""
    files = (os.path.join(folder, n) for n in ('config.json', 'preprocessor_config.json'))
    hub, pre = (json.load(open(f)) if os.path.isfile(f) else {} for f in files)
    size = next((s for s, v in SIZES.items() if v['embed_dim'] == hub.get('hidden_size')), None)
    eps, mean = hub.get('layer_norm_eps', 1e-6), pre.get('image_mean', [0.485])
    heads, official = hub.get('num_attention_heads'), SIZES.get(size, {}).get('num_heads')
    return [note for bad, note in [
        (eps != 1e-6, f"config.json: layer_norm_eps {eps}; the official models (and this one) use "
                      "1e-6"),
        (mean[0] != 0.485, f"preprocessor_config.json: image_mean {mean}; the official models (and "
                           "this code's stages) normalise with ImageNet's"),
        (size and heads not in (None, official),
         f"config.json: {heads} heads for width {hub.get('hidden_size')}; the official {size} "
         f"model has {official}")] if bad]


def export_hf(model, out_dir, class_names=None):
    """Write model as a transformers folder (config.json + model.safetensors, or pytorch_model.bin
    without the safetensors package) that VideoMAEForPreTraining / VideoMAEForVideoClassification
    load with no missing, unexpected or mismatched keys."""
    c, pre = model.config, isinstance(model, PretrainVideoMAE)
    cfg = dict(hidden_size=c['embed_dim'], num_hidden_layers=c['depth'],
               num_attention_heads=c['num_heads'], image_size=c['img_size'],
               patch_size=c['patch_size'], tubelet_size=c['tubelet_size'],
               num_frames=c['num_frames'], decoder_hidden_size=c['decoder_embed_dim'],
               decoder_num_hidden_layers=c['decoder_depth'],
               decoder_num_attention_heads=c['decoder_num_heads'], model_type='videomae',
               intermediate_size=int(c['embed_dim'] * c['mlp_ratio']),
               decoder_intermediate_size=int(c['decoder_embed_dim'] * c['mlp_ratio']),
               layer_norm_eps=1e-6, qkv_bias=True, num_channels=3, norm_pix_loss=True,
               use_mean_pooling=not pre and c['use_mean_pooling'],
               architectures=['VideoMAEFor' + ('PreTraining' if pre else 'VideoClassification')])
    if not pre:
        names = class_names or [str(i) for i in range(c['num_classes'])]
        cfg.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    sd = {}
    for k, v in model.state_dict().items():
        vit = not k.startswith(('decoder.', 'encoder_to_decoder', 'mask_token', 'fc_norm', 'head'))
        k = re.sub(r'^head\.', 'classifier.', re.sub(r'^norm\.', 'layernorm.',
                                                      k.removeprefix('encoder.')))
        for ours, hub in reversed(_HUB):
            k = k.replace(ours, hub)
        k = 'videomae.' + k if vit else k
        if k.endswith('.qkv.weight'):                # q, k and v apart
            sd.update({k.replace('qkv', n): w.contiguous()
                       for n, w in zip(('query', 'key', 'value'), v.chunk(3))})
        else:
            sd[k] = v.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(cfg, f, indent=1)
    try:
        from safetensors.torch import save_file
        save_file(sd, os.path.join(out_dir, 'model.safetensors'))
    except ImportError:
        torch.save(sd, os.path.join(out_dir, 'pytorch_model.bin'))
    return out_dir
