"""Issue 5's norm-matched control: a pre-training checkpoint whose encoder is replaced by a RANDOM one (official
init, another seed) with every weight matrix rescaled to the trained matrix's Frobenius norm; LayerNorms, biases and the
rest as the official init leaves them (LayerNorms 1/0, Linear biases 0). Fine-tuning or probing it separates "pre-training learnt something" from "pre-training
only made the weights bigger" (AdamW grows the matrices ~3x even on the plateau).

usage (from the repository root):
  python docs/experiments/make_control.py runs/pretrain-synthetic/checkpoint-00100.pth runs/control-00100.pth
  python finetune.py --finetune runs/control-00100.pth --output_dir runs/finetune-synthetic-control"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch
import model as M
import utils

def rescaled_random(trained, config, seed=1):
    """Encoder state dict: a fresh official-init encoder (seed `seed`) with each >= 2-D tensor rescaled to the
    Frobenius norm of the same tensor in `trained` (an encoder state dict, keys without 'encoder.')."""
    torch.manual_seed(seed)
    fresh = M.build_pretrain(config['model'], **config['model_kwargs']).encoder.state_dict()
    out = {}
    for k, v in trained.items():
        r = fresh[k].clone()
        if r.dim() >= 2:
            r *= v.float().norm() / r.norm()
        out[k] = r.to(v.dtype)
    return out


if __name__ == '__main__':
    src, dst = sys.argv[1], sys.argv[2]
    ckpt = torch.load(src, map_location='cpu', weights_only=False)
    enc = {k[len('encoder.'):]: v for k, v in ckpt['model'].items() if k.startswith('encoder.')}
    for k, r in rescaled_random(enc, ckpt['config']).items():
        print(f'encoder.{k:45s} trained {enc[k].float().norm():8.3f}  control {r.float().norm():8.3f}')
        ckpt['model']['encoder.' + k] = r
    ckpt.pop('optimizer', None)
    utils.save_checkpoint(dst, ckpt)
    print('wrote', dst)
