"""The run mechanism shared by pretrain.py, finetune.py, linprobe.py and detect.py.

Only what two or more stages need and that is not the method itself. A stage's loop reads:

    run = utils.start(cfg, 'finetune', d, model, opt, loader, classes, failures)  # amp, resume, DDP
    for epoch in range(run.start_epoch, cfg['epochs']):
        for step in utils.steps(run, epoch):           # pre-emption: save mid-epoch, exit 0
            utils.train_step(run, loss_of)             # lr, accumulation, autocast, clip, step, log
        utils.end_epoch(run, epoch)                    # epoch log, checkpoint, retention

where loss_of(batch, micro) is the stage's own loss of one micro-batch. No model, no data here.
"""
import argparse
import csv
import fcntl
import json
import math
import os
import random
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

SIZES = ('small', 'base', 'large', 'huge', 'giant')
# Model-shape keys every stage stores in its config under these names, so that a checkpoint of one
# stage rebuilds its encoder in another.
SHAPE_KEYS = ('model', 'embed_dim', 'depth', 'num_heads', 'patch_size', 'tubelet_size')
INIT_KEYS = SHAPE_KEYS + ('num_frames', 'input_size')      # what --finetune's checkpoint sets


# --------------------------------------------------------------------------------------------------
# Command line: the stage's recipe table gives the defaults, explicit flags win.

def flag_error(message):
    """A bad flag: one line on stderr and exit code 2, as argparse does, without the usage block."""
    tqdm.write(f'error: {message}', file=sys.stderr)
    raise SystemExit(2)


def model_name(value):
    """'base', or the official 'pretrain_videomae_base_patch16_224' / 'vit_base_patch16_224'."""
    name = re.sub(r'^(pretrain_videomae_|vit_)|_patch1[46]_224$', '', value)
    if name not in SIZES:
        raise argparse.ArgumentTypeError(f'unknown model {value!r}; choose from {", ".join(SIZES)} '
                                         '(or the official vit_<size>_patch16_224 spelling)')
    return name


def recipe_help(table, key):
    """'recipe default: ssv2/k400 1024, ucf101 192' for a flag's --help (every default visible)."""
    vals = {}
    for name, row in table.items():
        if key in row:
            vals.setdefault(str(row[key]), []).append(name)
    if len(vals) == 1 and sum(map(len, vals.values())) == len(table):
        return f'recipe default: {next(iter(vals))}'
    return ('recipe default: ' + ', '.join(f'{"/".join(n)} {v}' for v, n in vals.items())
            if vals else '')


def add_common_flags(p, recipes):
    """The flags every stage has, named as the official scripts' where they exist; the optimiser's
    own (--opt_betas, --layer_decay, --momentum) only where the recipes set them."""
    def r(key, text):
        return f'{text} ({recipe_help(recipes, key) or "no recipe default"})'
    add = p.add_argument_group('optimisation (recipe defaults)').add_argument
    has = {k for row in recipes.values() for k in row}
    if 'opt_betas' in has:
        add('--opt_betas', '--betas', type=float, nargs=2, help=r('opt_betas', 'AdamW betas'))
    if 'layer_decay' in has:
        add('--layer_decay', type=float, help=r('layer_decay', 'layer-wise lr decay; 1 = off'))
    if 'momentum' in has:
        add('--momentum', type=float, help=r('momentum', 'SGD momentum'))
    add('--epochs', type=int, help=r('epochs', 'epochs; the cosine spans all of them'))
    add('--warmup_epochs', type=int, help=r('warmup_epochs', 'linear warm-up from 0'))
    add('--lr', type=float, help=r('lr', 'BASE lr: the peak is lr x total_batch / 256'))
    add('--min_lr', type=float, help=r('min_lr', 'final lr of the cosine, scaled like --lr'))
    add('--weight_decay', type=float, help=r('weight_decay', 'weight decay'))
    add('--total_batch', type=int, help=r('total_batch', 'clips per optimiser step, all processes; '
                                          'reached by gradient accumulation'))
    add('--batch_size', type=int, help=r('batch_size', 'clips per process and forward; unset: the '
                                         'largest that splits --total_batch over the processes'))
    add('--clip_grad', type=float, help='clip the gradient norm (the recipes do not clip)')
    add = p.add_argument_group('run').add_argument
    add('--output_dir', help='checkpoints, log.jsonl, config.json (default runs/<stage>-..)')
    add('--resume', default='auto', help="'auto' (default): the latest checkpoint in --output_dir; "
        "a path; '' to start fresh")
    add('--save_ckpt_freq', type=int, help=r('save_ckpt_freq', "keep every N-th epoch's "
                                             'checkpoint; the latest is always kept'))
    add('--num_workers', type=int, help=r('num_workers', 'decoding processes per process'))
    add('--max_failed_ratio', type=float, default=0.05, help="stop when more than this share of an "
        "epoch's videos cannot be decoded (default 0.05; below it they are replaced, counted and "
        'reported)')
    add('--seed', type=int, default=0, help='init, sampling, augmentation (default 0)')
    add('--device', default='auto', help='auto (a GPU if there is one), cpu or cuda')
    add('--precision', default='auto', choices=['auto', 'fp32', 'bf16', 'fp16'],
        help='auto: bf16 on GPUs that have it, else fp16 + loss scaling; fp32 on CPU')
    add('--compile', action='store_true', help='torch.compile the model (long runs)')
    add('--log_dir', help='also write TensorBoard curves here (needs `tensorboard`)')


def add_shape_flags(p, recipes):
    g = p.add_argument_group("model shape (default: the initial checkpoint's, else the recipe's)")
    g.add_argument('--model', type=model_name,
                   help=f'{", ".join(SIZES)} ({recipe_help(recipes, "model")})')
    for key, text in [('embed_dim', 'encoder width'), ('depth', 'encoder blocks'),
                      ('num_heads', 'encoder heads'), ('patch_size', 'patch side in pixels'),
                      ('tubelet_size', 'frames per cube')]:
        default = recipe_help(recipes, key) or "default: the --model size's"
        g.add_argument(f'--{key}', type=int, help=f'{text} ({default})')
    return g


def add_data_flags(p, recipes, datasets=None):
    """--dataset (datasets: default the recipe rows), --data_path and the clip flags."""
    def r(key, text):
        return f'{text} ({recipe_help(recipes, key)})'
    g = p.add_argument_group('data')
    g.add_argument('--dataset', choices=datasets or list(recipes),
                   help='which recipe row and reader (default: synthetic, generated on first use)')
    g.add_argument('--data_path', help='the dataset folder as downloaded (README: datasets); a '
                   'list file or its folder for --dataset list; root/train/<class>/<video> and '
                   'root/val/ for --dataset folder; synthetic: the generated cache')
    g.add_argument('--fold', type=int, default=1, help='UCF101/HMDB51 split, 1-3 (default 1)')
    g.add_argument('--num_frames', type=int, help=r('num_frames', 'frames per clip'))
    g.add_argument('--sampling_rate', type=int, help=r('sampling_rate', 'stride between frames'))
    g.add_argument('--input_size', type=int, help=r('input_size', 'crop side in pixels'))
    return g


def check_clip_flags(cfg, size_patch=16):
    """Clips must cut into whole cubes; a real dataset needs its folder. -> the patch side.
    size_patch: the --model size's patch side (model.SIZES; 14 for giant)."""
    p, t = cfg.get('patch_size') or size_patch, cfg.get('tubelet_size') or 2
    if cfg['num_frames'] % t:
        flag_error(f"--num_frames {cfg['num_frames']} is not divisible by the tubelet size {t} "
                   f"(frames per cube); use a multiple of {t}")
    if cfg['input_size'] % p:
        flag_error(f"--input_size {cfg['input_size']} is not divisible by the patch size {p}; "
                   f"use a multiple of {p}, e.g. {max(p, cfg['input_size'] // p * p)}")
    if cfg.get('dataset', 'synthetic') != 'synthetic' and not cfg['data_path']:
        flag_error(f"--dataset {cfg['dataset']} needs --data_path "
                   "(the folder you downloaded; README)")
    return p


def shape(cfg):
    """model.build_* overrides of this config: the shape flags given, the clip size."""
    kw = {k: cfg[k] for k in SHAPE_KEYS[1:] if cfg.get(k) is not None}
    return dict(kw, img_size=cfg['input_size'], num_frames=cfg['num_frames'])


def resolve(parser, argv, recipe_of, output_of, init_flag=None, init_keys=INIT_KEYS):
    """Flags > the config of the checkpoint being resumed > the initial weights' config (init_flag,
    e.g. --finetune: its init_keys; all keys: the run is that checkpoint's, no auto-resume) > the
    recipe row recipe_of(cfg). --resume auto finds the latest checkpoint of the output folder and
    resolves again with it. -> a plain dict, checked before any work."""
    args = parser.parse_args(argv)
    saved = checkpoint_meta(args.resume)['config'] if args.resume not in ('auto', '') else {}
    init = getattr(args, init_flag) if init_flag else None
    init = checkpoint_meta(init)['config'] if init else {}
    cfg = dict(vars(args))
    for source in (saved, {k: v for k, v in init.items() if init_keys is None or k in init_keys}):
        cfg.update({k: v for k, v in source.items()
                    if k in cfg and cfg[k] is None and k != 'output_dir'})
    if 'dataset' in cfg:
        cfg['dataset'] = cfg['dataset'] or 'synthetic'
    for key, value in recipe_of(cfg).items():
        if key not in cfg:
            raise KeyError(f'recipe key {key!r} has no command-line flag')
        cfg[key] = value if cfg[key] is None else cfg[key]
    cfg['output_dir'] = cfg['output_dir'] or (os.path.dirname(os.path.abspath(args.resume)) if saved
                                              else os.path.join('runs', output_of(cfg)))
    latest = args.resume == 'auto' and latest_checkpoint(cfg['output_dir'])
    if latest and not (init and init_keys is None):
        return resolve(parser, [*(sys.argv[1:] if argv is None else argv), '--resume', latest],
                       recipe_of, output_of, init_flag, init_keys)
    for key in ('epochs', 'total_batch', 'num_frames', 'input_size', 'sampling_rate',
                'save_ckpt_freq', 'test_clips', 'test_crops', 'short_side', 'batch_size'):
        if cfg.get(key) is not None and cfg[key] < 1:
            flag_error(f'--{key} must be at least 1, got {cfg[key]}')
    if cfg.get('num_workers') is not None and cfg['num_workers'] < 0:
        flag_error('--num_workers must be 0 (decode in the main process) or more, '
                   f'got {cfg["num_workers"]}')
    if cfg['warmup_epochs'] > cfg['epochs']:
        flag_error(f'--warmup_epochs {cfg["warmup_epochs"]} is longer than '
                   f'--epochs {cfg["epochs"]}')
    cfg['batch_size'], cfg['accum_iter'] = fit_batch(cfg['total_batch'], cfg['batch_size'],
                                                     int(os.environ.get('WORLD_SIZE', 1)),
                                                     args.batch_size is not None)
    return cfg


def fit_batch(total, batch, world, explicit):
    """-> (clips per process and forward, accumulation steps) with batch x world x steps = total.
    An explicit --batch_size must fit; otherwise the largest batch up to the recipe's that does."""
    if explicit:
        if total % (batch * world):
            flag_error(f'--total_batch {total} is not a multiple of --batch_size {batch} x {world} '
                       f'process(es) = {batch * world}; change --batch_size or --total_batch')
        return batch, total // (batch * world)
    if total % world:
        lo, hi = total // world * world, -(-total // world) * world
        flag_error(f'--total_batch {total} cannot be split over {world} processes; use '
                   f'--total_batch {max(lo, world)} or {hi} (multiples of {world})')
    per_rank = total // world
    batch = max(d for d in range(1, min(batch, per_rank) + 1) if per_rank % d == 0)
    return batch, per_rank // batch


# --------------------------------------------------------------------------------------------------
# Distributed: one code path for `python X.py` and `torchrun --nproc_per_node=N X.py`.

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device_arg='auto'):
    """Reads torchrun's environment. NCCL on GPUs, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device_arg == 'auto' else device_arg.startswith('cuda')
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit('error: --device cuda was asked for but no CUDA device is visible')
    world_size, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    device = torch.device('cpu')
    if use_cuda:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if use_cuda else 'gloo',
                                device_id=device if use_cuda else None)
    return Dist(rank, world_size, device)


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Optimisation: appendix § B scales lr with the batch; cosine per iteration after a linear warm-up.

def cosine_schedule(step, total_steps, warmup_steps, base_value, final_value):
    if step < warmup_steps:
        return base_value * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * progress))


def layer_id(name, depth):
    """A parameter's layer for lr decay: the embeddings 0, block i -> i + 1, the rest depth + 1."""
    name = name.removeprefix('encoder.')
    if name.startswith(('patch_embed', 'pos_embed', 'mask_token', 'cls_token')):
        return 0
    return int(name.split('.')[1]) + 1 if name.startswith('blocks.') else depth + 1


def param_groups(model, weight_decay, layer_decay=1.0, depth=None):
    """AdamW groups: no weight decay on biases, norms and tokens (1-D); lr_scale =
    decay^(depth+1-layer). layer_decay 1 (pre-training, from scratch) gives two groups."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith('.bias') or 'token' in name or 'pos_embed' in name
        layer = layer_id(name, depth) if layer_decay < 1.0 else 0
        g = groups.setdefault((layer, no_decay), {
            'params': [], 'weight_decay': 0.0 if no_decay else weight_decay, 'layer': layer,
            'lr_scale': layer_decay ** (depth + 1 - layer) if layer_decay < 1.0 else 1.0})
        g['params'].append(p)
    return [groups[k] for k in sorted(groups)]


def make_adamw(groups, lr, betas, device):
    """AdamW, eps 1e-8 as the official code; fused on GPU and CPU (one kernel over all parameters:
    on 2 CPU cores ~8x faster than the per-tensor loop for ViT-B, the same maths to 1 ulp)."""
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=1e-8,
                             fused=device.type in ('cuda', 'cpu'))


def amp_setup(device, precision='auto'):
    """-> (autocast context factory, GradScaler or None, precision name)."""
    if precision == 'auto':
        precision = 'fp32' if device.type != 'cuda' else \
            'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
    if precision == 'fp16' and device.type != 'cuda':
        raise SystemExit('error: --precision fp16 needs a GPU; use bf16 or fp32 on CPU')
    if precision == 'fp32':
        return nullcontext, None, precision
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == 'fp16' else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler, precision


# --------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, the latest found by name, every RNG restored (exact resume).

def save_checkpoint(path, state):
    """Temporary file in the same folder, fsync, rename: a crash or a full disk never leaves half a
    file under the real name, and the previous checkpoints stay."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f'error: writing {path} failed ({str(e).splitlines()[0][:200]}): is the '
                         'disk full or over quota? The earlier checkpoints in '
                         f'{os.path.dirname(path)} are kept; free space and rerun the same command '
                         'to resume') from None


def checkpoint_name(epoch, step_in_epoch=0):
    """checkpoint-00040.pth: 40 epochs done; checkpoint-00040-000123.pth: 123 steps in epoch 41."""
    return f'checkpoint-{epoch:05d}' + (f'-{step_in_epoch:06d}' if step_in_epoch else '') + '.pth'


def _checkpoints(folder):
    """{(epoch, step): path} of the checkpoints in folder."""
    found = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        m = re.fullmatch(r'checkpoint-(\d+)(?:-(\d+))?\.pth', name)
        if m:
            found[int(m[1]), int(m[2] or 0)] = os.path.join(folder, name)
    return found


def latest_checkpoint(folder):
    found = _checkpoints(folder)
    return found[max(found)] if found else None


def load_state(path):
    """One of our checkpoints, weights_only (tensors, numbers, strings, lists and dicts only)."""
    if not os.path.isfile(path):
        raise SystemExit(f'error: checkpoint {path}: no such file')
    if os.path.getsize(path) == 0:
        raise SystemExit(f'error: checkpoint {path} is an empty file')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # official files' args
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:
        raise SystemExit(f'error: {path} is not a readable PyTorch checkpoint '
                         f'({type(e).__name__}: {str(e).splitlines()[0][:200]})') from None


def checkpoint_meta(path):
    """{'config', 'classes', 'stage'} of a checkpoint (mmap: no tensor is read); empty for
    official files. A transformers folder gives its config.json's shape and id2label names."""
    hub = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), 'config.json')
    if (os.path.isdir(path) or path.endswith('.safetensors')) and os.path.isfile(hub):
        with open(hub) as f:
            c = json.load(f)
        labels = c.get('id2label') or {}
        return {'config': dict(embed_dim=c['hidden_size'], depth=c['num_hidden_layers'],
                               num_heads=c['num_attention_heads'], patch_size=c['patch_size'],
                               tubelet_size=c['tubelet_size'], num_frames=c['num_frames'],
                               input_size=c['image_size']), 'stage': None,
                'classes': [labels[k] for k in sorted(labels, key=int)]}
    obj = load_state(path)
    obj = obj if isinstance(obj, dict) else {}
    cfg = obj.get('config')
    return {'config': dict(cfg) if isinstance(cfg, dict) else {}, 'stage': obj.get('stage'),
            'classes': list(obj.get('classes') or [])}


def rng_state():
    """Every RNG state as tensors and plain values, so checkpoints load with weights_only=True."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {'python': list(random.getstate()[1]), 'python_version': random.getstate()[0],
             'numpy': torch.from_numpy(keys.astype(np.int64)),
             'numpy_rest': [pos, has_gauss, gauss], 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate((state['python_version'], tuple(state['python']), None))
    np.random.set_state(('MT19937', state['numpy'].numpy().astype(np.uint32), *state['numpy_rest']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def lock_output_dir(folder):
    """Create folder and lock it for this process's life: a second run into it refuses instead of
    mixing logs and overwriting checkpoints. The lock dies with its holder: never a stale one."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SystemExit(f'error: --output_dir {folder} is a file, not a folder; pass another path')
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, '.lock'), 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        raise SystemExit(f'error: --output_dir {folder} is in use by another run (pid '
                         f'{f.read().strip() or "?"}); wait for it or pass another '
                         '--output_dir') from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f  # keep a reference: closing it releases the lock


# --------------------------------------------------------------------------------------------------
# The run: what every stage's loop shares.

@dataclass
class Run:
    cfg: dict
    stage: str
    dist: Dist
    model: torch.nn.Module            # the plain module: checkpoints and evaluation
    net: torch.nn.Module              # what the loop calls: DDP and/or torch.compile around it
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    classes: list
    failures: object                  # data.FailureLog: unreadable videos, counted per epoch
    scaler: object = None             # a GradScaler with fp16
    autocast: object = nullcontext    # () -> the mixed-precision context
    steps_per_epoch: int = 0
    # set by start(): the precision used, where the run starts, clips per step (all views), the
    # output folder's lock, the Log, the tqdm bar, Preemption; it (optimiser steps done) by start()
    # and steps(), which also sets the StepMeter and the batch iterator; lr by train_step()
    precision, start_epoch, start_step, clips_per_step, it, lr = 'fp32', 0, 0, 0, 0, 0.0
    lock = log = bar = preempt = meter = batches = None


def start(cfg, stage, d, model, optimizer, loader, classes, failures, net=None, clips_per_video=1):
    """Everything before the first step: lock, mixed precision, resume, DDP, the logs, the config
    printed and saved. net: the module the loop calls, if it is not `model` (detect.py)."""
    run = Run(cfg, stage, d, model, net or model, optimizer, loader, classes, failures)
    run.lock = lock_output_dir(cfg['output_dir']) if d.is_main else None
    run.autocast, run.scaler, run.precision = amp_setup(d.device, cfg['precision'])
    run.steps_per_epoch = loader.sampler.num_samples // cfg['batch_size'] // cfg['accum_iter']
    if run.steps_per_epoch < 1:
        raise SystemExit(f"error: {len(loader.dataset)} training items do not fill one step of "
                         f"--total_batch {cfg['total_batch']}; lower it or add data")
    run.clips_per_step = cfg['total_batch'] * clips_per_video
    path = cfg['resume'] if cfg['resume'] not in ('auto', '') else None
    if path:
        resume(run, path)
    if d.world_size > 1:
        ids = [d.device.index] if d.device.type == 'cuda' else None
        run.net = torch.nn.parallel.DistributedDataParallel(run.net, device_ids=ids)
    run.net = torch.compile(run.net) if cfg.get('compile') else run.net
    cfg.update(world_size=d.world_size, steps_per_epoch=run.steps_per_epoch,
               precision_used=run.precision)
    run.it = run.start_epoch * run.steps_per_epoch + run.start_step
    run.log = Log(cfg['output_dir'], d.is_main, cfg.get('log_dir'), run.it)
    run.preempt = Preemption()
    if d.is_main:
        width = max(map(len, cfg))
        print(f'{stage}: configuration', *(f'  {k:<{width}} {v}' for k, v in sorted(cfg.items())),
              sep='\n', flush=True)
        with open(os.path.join(cfg['output_dir'], 'config.json'), 'w') as f:
            json.dump(cfg, f, indent=1, sort_keys=True)
        print(f"{len(loader.dataset)} training items, {run.steps_per_epoch} steps per epoch of "
              f"{cfg['accum_iter']} x {cfg['batch_size']} clips x {d.world_size} process(es); "
              f"peak lr {cfg['lr'] * cfg['total_batch'] / 256:.3g} = {cfg['lr']:g} x "
              f"{cfg['total_batch']} / 256; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}"
              f"M parameters; {run.precision} on {d.device}"
              + (f'; resuming {path} at epoch {run.start_epoch} step {run.start_step}'
                 if path else ''), flush=True)
    total = cfg['epochs'] * run.steps_per_epoch
    run.bar = tqdm(total=total, initial=min(run.it, total), disable=not d.is_main, unit='step',
                   dynamic_ncols=True)
    return run


def resume(run, path):
    state = load_state(path)
    if state.get('stage') != run.stage:
        what = f"a {state['stage']!r}" if state.get('stage') else 'not a training'
        raise SystemExit(f'error: --resume {path} is {what} checkpoint, not a {run.stage!r} one; '
                         'give it as the initial weights (--finetune) and a fresh --output_dir '
                         'instead')
    try:
        run.model.load_state_dict(state['model'])
    except RuntimeError as e:
        raise SystemExit(f'error: --resume {path} does not fit the model these flags build '
                         f'(another size or shape flag?): {str(e)[:300]}') from None
    run.optimizer.load_state_dict(state['optimizer'])
    if run.scaler is not None and state.get('scaler'):
        run.scaler.load_state_dict(state['scaler'])
    ranks = state.get('rng_ranks') or [state['rng']]
    set_rng_state(ranks[run.dist.rank] if run.dist.rank < len(ranks) else state['rng'])
    run.start_epoch, run.start_step = state['epoch'], state['step_in_epoch']
    if run.start_step >= run.steps_per_epoch:  # saved after an epoch's last step
        run.start_epoch, run.start_step = run.start_epoch + 1, 0


def steps(run, epoch):
    """The optimiser steps of one epoch, resuming where a checkpoint left off. Between steps, a
    SIGTERM/SIGINT on any rank saves a mid-epoch checkpoint and exits 0 (cluster pre-emption)."""
    cfg, first = run.cfg, run.start_step if epoch == run.start_epoch else 0
    # the sampler skips what a resumed run already saw; leftovers that cannot fill a step never come
    run.loader.sampler.set_epoch(epoch, skip=first * cfg['accum_iter'] * cfg['batch_size'])
    run.batches, run.meter = iter(run.loader), StepMeter(run.clips_per_step)
    run.model.train()
    for step in range(first, run.steps_per_epoch):
        run.it = epoch * run.steps_per_epoch + step
        yield step
        if step + 1 < run.steps_per_epoch and run.preempt.should_stop(run.dist.device):
            stop(run, save(run, epoch, step + 1))


def stop(run, path):
    run.bar.close()
    if run.dist.is_main:
        print(f'{run.preempt.requested or "another rank was signalled"}: saved {path}; '
              'the same command resumes', flush=True)
    cleanup_distributed()
    raise SystemExit(0)


def train_step(run, loss_of):
    """One optimiser step over accum_iter micro-batches, checked finite before the update, logged.
    loss_of(batch, micro) -> the stage's loss of one micro-batch."""
    cfg, accum, dev = run.cfg, run.cfg['accum_iter'], run.dist.device
    scale, total = cfg['total_batch'] / 256, cfg['epochs'] * run.steps_per_epoch
    run.lr = cosine_schedule(run.it, total, cfg['warmup_epochs'] * run.steps_per_epoch,
                             cfg['lr'] * scale, cfg['min_lr'] * scale)
    for g in run.optimizer.param_groups:
        g['lr'] = run.lr * g.get('lr_scale', 1.0)  # layer decay scales every group but the head
    run.meter.start_step()
    loss_sum = torch.zeros((), device=dev)
    for micro in range(accum):
        batch = run.meter.next(run.batches)
        run.failures.update(batch['failed'])
        last = micro == accum - 1 or run.dist.world_size == 1
        with nullcontext() if last else run.net.no_sync():  # DDP all-reduces on the last only
            with run.autocast():
                loss = loss_of(batch, micro) / accum
            (run.scaler.scale(loss) if run.scaler else loss).backward()
        loss_sum += loss.detach().float()  # no host sync per micro-batch
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)  # the norm and the clip in true units
    params = [p for g in run.optimizer.param_groups for p in g['params'] if p.grad is not None]
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg['clip_grad']) if cfg['clip_grad'] else \
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    if dist.is_initialized():  # the mean over ranks, one sync per step: every rank stops alike
        dist.all_reduce(loss_sum)
        loss_sum /= dist.get_world_size()
    loss = loss_sum.item()
    if not math.isfinite(loss):
        raise SystemExit(f"error: the loss is {loss} at step {run.it + 1}; stopping before it "
                         f"reaches the weights. The last good checkpoint in {cfg['output_dir']} is "
                         "kept: resume from it with a lower --lr or --precision fp32")
    if run.scaler is None:
        run.optimizer.step()
    else:  # fp16: skips a step whose gradients overflowed
        run.scaler.step(run.optimizer)
        run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    speed = run.meter.end_step(loss)
    run.log.write('step', run.it + 1, epoch=run.it // run.steps_per_epoch, loss=loss, lr=run.lr,
                  grad_norm=gnorm.item(), **speed)
    run.bar.set_postfix_str(f"ep {run.it // run.steps_per_epoch + 1}/{cfg['epochs']} "
                            f"loss {loss:.4f} lr {run.lr:.2e} {speed['clips_per_s']:.1f} clips/s",
                            refresh=False)
    run.bar.update(1)
    return loss


def end_epoch(run, epoch, **metrics):
    """After the last step of `epoch` (0-based): the failure report, the epoch record (with the
    stage's metrics), the checkpoint; exits 0 if pre-empted. -> the path if kept for good."""
    cfg, m = run.cfg, run.meter
    run.failures.end_epoch(m.steps * cfg['total_batch'] // run.dist.world_size)
    if m.steps:  # nothing ran when resumed at the epoch's end
        s = dict(epoch=epoch + 1, lr=run.lr, **m.summary(), **metrics)
        run.log.write('epoch', (epoch + 1) * run.steps_per_epoch, **s)
        if run.dist.is_main:
            tqdm.write(f"epoch {epoch + 1}/{cfg['epochs']}  " + '  '.join(
                f'{k} {v:.4g}' for k, v in s.items() if k not in ('epoch', 'epoch_s')))
    path = save(run, epoch + 1, 0)
    kept = (epoch + 1) % cfg['save_ckpt_freq'] == 0 or epoch + 1 == cfg['epochs']
    if kept and run.dist.is_main:
        with open(os.path.join(cfg['output_dir'], 'log.jsonl')) as f:
            losses = [r['loss'] for r in map(json.loads, f) if r['kind'] == 'step']
        plot_curve(losses, os.path.join(cfg['output_dir'], 'loss.png'),
                   f'{run.stage}: loss per step')
    if run.preempt.should_stop(run.dist.device):
        stop(run, path)
    return path if kept else None


def save(run, epoch, step_in_epoch):
    """The checkpoint, with every rank's RNG (and weight sums: DDP keeps them equal); retention:
    the others go unless they end an epoch that is a multiple of --save_ckpt_freq."""
    weights = [v for v in run.model.state_dict().values() if v.is_floating_point()]
    mine = (rng_state(), torch.stack([v.double().sum() for v in weights]).tolist())
    ranks = [mine]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    ranks, sums = map(list, zip(*ranks))
    if run.dist.is_main and any(s != sums[0] for s in sums):
        print('warning: the ranks hold different weights (a module outside DDP?)', file=sys.stderr)
    path = os.path.join(run.cfg['output_dir'], checkpoint_name(epoch, step_in_epoch))
    if run.dist.is_main:
        state = {'model': run.model.state_dict(), 'optimizer': run.optimizer.state_dict(),
                 'scaler': run.scaler.state_dict() if run.scaler else None, 'config': run.cfg,
                 'stage': run.stage, 'epoch': epoch, 'step_in_epoch': step_in_epoch,
                 'rng': ranks[0], 'rng_ranks': ranks, 'rank_weight_sums': sums,
                 'classes': list(run.classes)}
        save_checkpoint(path, state)
        for (e, s), old in _checkpoints(run.cfg['output_dir']).items():
            if old != path and (s or e % run.cfg['save_ckpt_freq']):
                os.remove(old)
    return path


def log_result(cfg, is_main, kind, **metrics):
    """A final result (test scores, mAP) in log.jsonl and, with --log_dir, at the last step."""
    step = cfg['epochs'] * cfg.get('steps_per_epoch', 0)
    Log(cfg['output_dir'], is_main, cfg.get('log_dir'), step).write(kind, step, **metrics)


def plot_curve(values, path, title):
    """values (the step losses) as a PNG line plot, drawn with torchvision: a plateau or a
    divergence is seen at a glance. The labels give the range and the number of steps."""
    from torchvision.io import write_png
    from torchvision.utils import draw_bounding_boxes, draw_keypoints
    W, H, m = 640, 300, 48
    v = torch.tensor(values, dtype=torch.float)
    n, k = len(v), -(-len(v) // (W - 2 * m))           # the mean of every k steps: one per pixel
    v = v[:len(v) // k * k].view(-1, k).mean(1) if k > 1 else v
    lo, hi = float(v.min()), float(v.max())
    x = m + torch.linspace(0, W - 2 * m, len(v))
    y = H - m - (v - lo) / max(hi - lo, 1e-9) * (H - 2 * m)
    img = torch.full((3, H, W), 255, dtype=torch.uint8)
    img = draw_keypoints(img, torch.stack([x, y], 1)[None], colors='royalblue', radius=1,
                         connectivity=[(i, i + 1) for i in range(len(v) - 1)], width=1)
    # the frame, then white boxes that only carry labels: max, min, the step count, the title
    boxes = torch.tensor([[m, m, W - m, H - m], [2, m - 6, m - 2, m + 6],
                          [2, H - m - 6, m - 2, H - m + 6],
                          [W - m - 80, H - m + 4, W - m, H - m + 16], [m, 4, W - m, 16]],
                         dtype=torch.float)
    labels = ['', f'{hi:.2f}', f'{lo:.2f}', f'step {n}', title]
    img = draw_bounding_boxes(img, boxes, labels=labels, colors=['black'] + ['white'] * 4,
                              label_colors='black')
    write_png(img, path)


class Preemption:
    """SIGTERM/SIGINT set a flag the loop checks between steps. A second SIGINT stops at once."""

    def __init__(self):
        self.requested = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f'\n{self.requested}: saving a checkpoint after this step, then exiting',
              file=sys.stderr, flush=True)

    def should_stop(self, device):
        """True on every rank as soon as any rank was signalled (so all save at the same step)."""
        flag = torch.tensor(float(self.requested is not None), device=device)
        if dist.is_initialized():
            dist.all_reduce(flag)
        return bool(flag > 0)


class StepMeter:
    """Per optimiser step: wall time, the time blocked in next(loader) and clips/s; per epoch: mean
    loss, clips/s and the share of time waiting for data (large: more --num_workers would help)."""

    def __init__(self, clips_per_step):
        self.clips_per_step = clips_per_step
        self.steps = self.loss = self.wait_sum = self.time_sum = 0

    def start_step(self):
        self.t0, self.wait = time.perf_counter(), 0.0

    def next(self, batches):
        t = time.perf_counter()
        batch = next(batches)
        self.wait += time.perf_counter() - t
        return batch

    def end_step(self, loss):
        dt = time.perf_counter() - self.t0
        self.steps, self.loss = self.steps + 1, self.loss + loss
        self.wait_sum, self.time_sum = self.wait_sum + self.wait, self.time_sum + dt
        return dict(clips_per_s=round(self.clips_per_step / dt, 2), step_s=round(dt, 4),
                    data_wait_s=round(self.wait, 4))

    def summary(self):
        t = max(self.time_sum, 1e-9)
        return dict(loss=self.loss / max(self.steps, 1),
                    clips_per_s=round(self.steps * self.clips_per_step / t, 2),
                    data_wait=round(self.wait_sum / t, 3), epoch_s=round(self.time_sum, 2))


class Log:
    """log.jsonl in the output folder (rank 0, appended across resumes) and, with --log_dir,
    TensorBoard scalars at global step = optimiser steps done (a resume continues the curves)."""

    def __init__(self, output_dir, enabled=True, log_dir=None, step=0):
        self.path = os.path.join(output_dir, 'log.jsonl') if enabled else None
        self.tb = None
        if enabled and log_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit('error: --log_dir needs the tensorboard package: '
                                 'pip install tensorboard') from None
            self.tb = SummaryWriter(log_dir, purge_step=step + 1 if step else None)  # after resume

    def write(self, kind, step, **record):
        if not self.path:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps({'kind': kind, 'it': step, **record,
                                'time': round(time.time(), 3)}) + '\n')
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ('epoch', 'it'):
                    self.tb.add_scalar(f'{kind}/{k}', v, step)
            self.tb.flush()

    def image(self, tag, picture, step):
        """A (3, H, W) uint8 picture next to the curves (the reconstructions of pretrain.py)."""
        if self.tb:
            self.tb.add_image(tag, picture, step)
            self.tb.flush()


# --------------------------------------------------------------------------------------------------
# Evaluation (finetune.py, linprobe.py): the softmax scores of all views of a video are averaged.

class ViewMerger:
    """Per-video mean softmax over its views, keyed by dataset index: the padding duplicates that
    DistributedSampler adds on some ranks count once when the ranks are merged."""

    def __init__(self):
        self.items = {}

    def add(self, indices, view_logits, labels):
        """indices (B,), view_logits (B, V, C) for the V views of each video, labels (B,)."""
        probs = view_logits.float().softmax(-1).mean(1).cpu()
        for i, p, y in zip(indices.tolist(), probs, labels.tolist()):
            self.items.setdefault(i, (p, y))

    def gather(self):
        """All ranks' videos (call on every rank) -> (scores (N, C), labels (N,)) in index order."""
        items = dict(self.items)
        if dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, items)
            for part in parts:
                for i, v in part.items():
                    items.setdefault(i, v)
        if not items:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
        keys = sorted(items)
        return torch.stack([items[k][0] for k in keys]), torch.tensor([items[k][1] for k in keys])


def topk_accuracy(scores, labels, ks=(1, 5)):
    """Percent of videos whose label is among the k highest scores."""
    return {f'top{k}': 100.0 * (scores.topk(min(k, scores.shape[1]), 1).indices == labels[:, None])
            .any(1).float().mean().item() for k in ks}


def per_class_accuracy(scores, labels, classes):
    pred = scores.argmax(1)
    return [(name, int((labels == c).sum()), 100.0 * (pred[labels == c] == c).float().mean().item()
             if (labels == c).any() else float('nan')) for c, name in enumerate(classes)]


@torch.no_grad()
def evaluate(model_fn, loader, d, autocast, failures, classes, title, save_prefix=None,
             max_clips=None):
    """Every view of every video through model_fn (uint8 clips (n, 3, T, H, W) -> logits (n, C)), in
    chunks of max_clips (clips x crops views would multiply a batch's memory), merged over ranks ->
    {'top1', 'top5', 'videos'}. With save_prefix rank 0 also writes <prefix>-results.json and
    <prefix>-per-class.csv and prints the scores. Call on every rank: the gather is collective."""
    merger = ViewMerger()
    for batch in tqdm(loader, desc=title, disable=not d.is_main, leave=False, dynamic_ncols=True):
        failures.update(batch['failed'])
        video = batch['video'].to(d.device, non_blocking=True)  # (B, V, 3, T, H, W)
        clips, chunk = video.flatten(0, 1), max_clips or video.shape[0] * video.shape[1]
        with autocast():
            logits = torch.cat([model_fn(clips[i:i + chunk]).float()
                                for i in range(0, len(clips), chunk)])
        merger.add(batch['index'], logits.view(*video.shape[:2], -1), batch['label'])
    failures.end_epoch(len(loader.dataset))
    scores, labels = merger.gather()
    if len(labels) == 0:
        raise SystemExit('error: the evaluation saw no video (an empty split?)')
    metrics = {**topk_accuracy(scores, labels), 'videos': len(labels)}
    if save_prefix and d.is_main:
        rows = [[n, k, f'{a:.2f}'] for n, k, a in per_class_accuracy(scores, labels, classes)]
        with open(f'{save_prefix}-per-class.csv', 'w', newline='') as f:
            csv.writer(f).writerows([['class', 'videos', 'top1'], *rows])
        with open(f'{save_prefix}-results.json', 'w') as f:
            json.dump({**metrics, 'title': title}, f, indent=1)
        print(f"{title}: top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} over "
              f"{len(labels)} videos (per class: {save_prefix}-per-class.csv)", flush=True)
    return metrics


def load_weights(load, model, path, flag, is_main=True):
    """load(model, path) (model.load_checkpoint), its report printed; a misfit: one error line
    naming the flag."""
    try:
        report = load(model, path)
    except (ValueError, OSError, ImportError) as e:   # ImportError: pip install safetensors
        raise SystemExit(f'error: {flag} {path}: {e}') from None
    if is_main:
        print(f"loaded {path} ({report['source']}): missing {report['missing'][:6]}, unused "
              f"{report['unexpected'][:6]}" + ''.join(f'\n  {n}' for n in report['notes']))
    return report


def main(fn):
    """The command-line boundary: a missing file or folder, or a `user_error` exception (the user's
    data, e.g. data.DataError), ends in one `error:` line, exit 1; others are bugs: a traceback."""
    try:
        fn()
    except SystemExit as e:                     # 'error: ...' messages: on a line of their own,
        if not isinstance(e.code, str):         # below any progress bar
            raise
        tqdm.write(e.code, file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as e:
        if not (getattr(e, 'user_error', False) or isinstance(e, (
                FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError))):
            raise
        tqdm.write(f'error: {e}', file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # e.g. a second Ctrl-C (the first saves a checkpoint): quietly
        raise SystemExit(130) from None
