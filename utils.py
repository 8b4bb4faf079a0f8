"""The run mechanism shared by pretrain.py, finetune.py, linprobe.py and detect.py: what two or more
stages need and that is not the method itself (no model, no data). A stage's loop reads:

    run = utils.start(cfg, 'finetune', d, model, opt, loader, classes, failures)  # amp, resume, DDP
    for epoch in range(run.start_epoch, cfg['epochs']):
        for step in utils.steps(run, epoch):           # pre-emption: save mid-epoch, exit 0
            utils.train_step(run, loss_of)             # lr, accumulation, autocast, clip, step, log
        utils.end_epoch(run, epoch)                    # epoch log, checkpoint, retention

where loss_of(batch, micro) is the stage's own loss of one micro-batch.
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
# every stage's config names the shape so: a checkpoint of one stage rebuilds its encoder in another
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
    if len(vals) == 1 and len(next(iter(vals.values()))) == len(table):  # one for all rows
        return f'recipe default: {next(iter(vals))}'
    listed = ', '.join(f'{"/".join(n)} {v}' for v, n in vals.items())
    return f'recipe default: {listed}' if vals else ''


def recipe_flags(group, recipes, otherwise='no recipe default'):
    """-> add(key, type, text, *aliases): --key in group, its recipe defaults in its help."""
    def add(key, type, text, *aliases, **kw):
        group.add_argument(f'--{key}', *aliases, type=type, **kw,
                           help=f'{text} ({recipe_help(recipes, key) or otherwise})')
    return add


def add_common_flags(p, recipes):
    """Every stage's flags; the optimiser's own (--opt_betas etc.) where the recipes set them."""
    g = p.add_argument_group('optimisation (recipe defaults)')
    add, has = recipe_flags(g, recipes), {k for row in recipes.values() for k in row}
    if 'opt_betas' in has:
        add('opt_betas', float, 'AdamW betas', '--betas', nargs=2)
    if 'layer_decay' in has:
        add('layer_decay', float, 'layer-wise lr decay; 1 = off')
    if 'momentum' in has:
        add('momentum', float, 'SGD momentum')
    add('epochs', int, 'epochs; the cosine spans all of them')
    add('warmup_epochs', int, 'linear warm-up from 0')
    add('lr', float, 'BASE lr: the peak is lr x total_batch / 256')
    add('min_lr', float, 'final lr of the cosine, scaled like --lr')
    add('weight_decay', float, 'weight decay')
    add('total_batch', int, 'clips per optimiser step, all processes; by gradient accumulation')
    add('batch_size', int, 'clips per process and forward; unset: the largest up to it that '
        'splits --total_batch over the processes')
    g.add_argument('--clip_grad', type=float, help='clip the gradient norm (default: off)')
    g = p.add_argument_group('run')
    g.add_argument('--output_dir', help='checkpoints, logs, config.json (default runs/<stage>-..)')
    g.add_argument('--resume', default='auto', help="'auto' (default): the latest checkpoint in "
                   "--output_dir; a path; '' to start fresh")
    add = recipe_flags(g, recipes)
    add('save_ckpt_freq', int, "keep every N-th epoch's checkpoint; the latest is always kept")
    add('num_workers', int, 'decoding processes per process')
    g.add_argument('--max_failed_ratio', type=float, default=0.05, help="stop when more of an "
                   "epoch's videos fail to decode (default 0.05); fewer are replaced and counted")
    g.add_argument('--seed', type=int, default=0, help='init, sampling, augmentation (default 0)')
    g.add_argument('--device', default='auto', help='auto (default: a GPU if any), cpu or cuda')
    g.add_argument('--precision', default='auto', choices=['auto', 'fp32', 'bf16', 'fp16'],
                   help='auto (default): bf16, on older GPUs fp16 + loss scaling, on CPU bf16 '
                   'if native (AVX512-BF16, AMX), else fp32')
    g.add_argument('--compile', action='store_true', help='torch.compile the model (long runs)')
    g.add_argument('--log_dir', help='also write TensorBoard curves here (needs `tensorboard`)')


def add_shape_flags(p, recipes):
    g = p.add_argument_group("model shape (default: the initial checkpoint's, else the recipe's)")
    g.add_argument('--model', type=model_name,
                   help=f'{", ".join(SIZES)} ({recipe_help(recipes, "model")})')
    add = recipe_flags(g, recipes, otherwise="default: the --model size's")
    for key, text in [('embed_dim', 'encoder width'), ('depth', 'encoder blocks'),
                      ('num_heads', 'encoder heads'), ('patch_size', 'patch side in pixels'),
                      ('tubelet_size', 'frames per cube')]:
        add(key, int, text)
    return g


def add_data_flags(p, recipes, datasets=None):
    """--dataset (datasets: default the recipe rows), --data_path and the clip flags."""
    g = p.add_argument_group('data')
    g.add_argument('--dataset', choices=datasets or list(recipes),
                   help='which recipe row and reader (default: synthetic, generated on first use)')
    g.add_argument('--data_path', help='the dataset folder as downloaded (README: datasets); a '
                   'list file or its folder for --dataset list; root/train/<class>/<video> and '
                   'root/val/ for --dataset folder; synthetic: the generated cache')
    g.add_argument('--fold', type=int, default=1, help='UCF101/HMDB51 split, 1-3 (default 1)')
    add = recipe_flags(g, recipes)
    for key, text in [('num_frames', 'frames per clip'), ('sampling_rate', 'stride between frames'),
                      ('input_size', 'crop side in pixels')]:
        add(key, int, text)
    return g


def check_clip_flags(cfg, size_patch=16):
    """Clips must cut into whole cubes (size_patch: the --model size's patch side, 14 for giant); a
    real dataset needs its folder. -> the patch side."""
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
    """Flags > the resumed checkpoint's config > the initial weights' config (init_flag, e.g.
    --finetune: its init_keys; None: all, the run is that checkpoint's: no auto-resume) > the recipe
    row recipe_of(cfg). --resume auto resolves again with the output folder's latest checkpoint.
    -> a plain dict, checked before any work."""
    args = parser.parse_args(argv)
    saved = checkpoint_meta(args.resume)['config'] if args.resume not in ('auto', '') else {}
    init = init_flag and getattr(args, init_flag)
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
        flag_error(f"--warmup_epochs {cfg['warmup_epochs']} is longer than "
                   f"--epochs {cfg['epochs']}")
    world = int(os.environ.get('WORLD_SIZE', 1))
    cfg['batch_size'], cfg['accum_iter'] = fit_batch(cfg['total_batch'], cfg['batch_size'], world,
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
    cuda = torch.cuda.is_available() if device_arg == 'auto' else device_arg.startswith('cuda')
    if cuda and not torch.cuda.is_available():
        raise SystemExit('error: --device cuda was asked for but no CUDA device is visible')
    d = Dist(int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)))
    if cuda:
        d.device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(d.device)
    if d.world_size > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if cuda else 'gloo', device_id=d.device if cuda else None)
    return d


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_ranks(obj):
    """[rank 0's obj, rank 1's, ...]; collective: call on every rank."""
    if not dist.is_initialized():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


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


def param_groups(model, weight_decay, layer_decay=1.0, depth=None):
    """AdamW groups: no weight decay on biases, norms and tokens (1-D); lr_scale =
    layer_decay^(depth + 1 - layer): layer 0 the embeddings, i + 1 block i, depth + 1 the head."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith('.bias') or 'token' in name or 'pos_embed' in name
        name, layer = name.removeprefix('encoder.'), 0
        if layer_decay < 1.0 and not name.startswith(('patch_embed', 'pos_embed', 'mask_token',
                                                      'cls_token')):
            layer = int(name.split('.')[1]) + 1 if name.startswith('blocks.') else depth + 1
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
    if precision == 'auto':  # a CPU with native bf16 (AVX512-BF16, AMX) steps 1.7x faster in it
        precision = ('bf16' if torch.cpu._is_avx512_bf16_supported() else 'fp32') \
            if device.type != 'cuda' else 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
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
                         f'disk full? The earlier checkpoints in {os.path.dirname(path)} are kept; '
                         'free space and rerun the same command to resume') from None


def checkpoint_name(epoch, step_in_epoch=0):
    """checkpoint-00040.pth: 40 epochs done; checkpoint-00040-000123.pth: 123 steps in epoch 41."""
    return f'checkpoint-{epoch:05d}' + (f'-{step_in_epoch:06d}' if step_in_epoch else '') + '.pth'


def checkpoints(folder):
    """{(epoch, step): path} of the checkpoints in folder."""
    found = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        m = re.fullmatch(r'checkpoint-(\d+)(?:-(\d+))?\.pth', name)
        if m:
            found[int(m[1]), int(m[2] or 0)] = os.path.join(folder, name)
    return found


def latest_checkpoint(folder):
    found = checkpoints(folder)
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
    # set by start(), it (optimiser steps done) also by steps(), which sets the StepMeter and the
    # batch iterator; lr by train_step(); signalled: the names of the SIGTERM/SIGINT received
    precision, start_epoch, start_step, clips_per_step, it, lr = 'fp32', 0, 0, 0, 0, 0.0
    lock = log = bar = meter = batches = signalled = None


def start(cfg, stage, d, model, optimizer, loader, classes, failures, net=None, clips_per_video=1):
    """Everything before the first step: lock, mixed precision, resume, DDP, the logs, the signal
    handlers, the config printed and saved. net: what the loop calls, if not `model` (detect.py)."""
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

    run.signalled = signalled = []  # the handler holds this list, not the run (and its lock)

    def on_signal(signum, frame):  # the loop checks run.signalled between steps
        if signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        signalled.append(signal.Signals(signum).name)
        print(f'\n{signalled[0]}: saving a checkpoint after this step, then exiting',
              file=sys.stderr, flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
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
                         'give it as the initial weights (--finetune) with a fresh --output_dir')
    try:
        run.model.load_state_dict(state['model'])
    except RuntimeError as e:
        raise SystemExit(f'error: --resume {path} does not fit the model these flags build '
                         f'(another size or shape flag?): {str(e)[:300]}') from None
    run.optimizer.load_state_dict(state['optimizer'])
    if run.scaler and state['scaler']:
        run.scaler.load_state_dict(state['scaler'])
    ranks = state['rng_ranks']  # more processes than saved: the new ones take rank 0's
    set_rng_state(ranks[run.dist.rank] if run.dist.rank < len(ranks) else ranks[0])
    run.start_epoch, run.start_step = state['epoch'], state['step_in_epoch']
    if run.start_step >= run.steps_per_epoch:  # saved after an epoch's last step
        run.start_epoch, run.start_step = run.start_epoch + 1, 0


def stop_if_preempted(run, epoch, step, path=None):
    """Once any rank was signalled, all save at this step (path: saved already) and exit 0."""
    flag = torch.tensor(float(bool(run.signalled)), device=run.dist.device)
    if dist.is_initialized():
        dist.all_reduce(flag)
    if flag > 0:
        path = path or save(run, epoch, step)
        run.bar.close()
        if run.dist.is_main:
            print(f'{(run.signalled or ["another rank was signalled"])[0]}: saved {path}; '
                  'the same command resumes', flush=True)
        cleanup_distributed()
        raise SystemExit(0)


def steps(run, epoch):
    """The optimiser steps of one epoch, from where a checkpoint left off; pre-emption between."""
    cfg, first = run.cfg, run.start_step if epoch == run.start_epoch else 0
    # the sampler skips what a resumed run already saw; leftovers that cannot fill a step never come
    run.loader.sampler.set_epoch(epoch, skip=first * cfg['accum_iter'] * cfg['batch_size'])
    run.batches, run.meter = iter(run.loader), StepMeter(run.clips_per_step)
    run.model.train()
    for step in range(first, run.steps_per_epoch):
        run.it = epoch * run.steps_per_epoch + step
        yield step
        if step + 1 < run.steps_per_epoch:  # the last step's checkpoint is end_epoch's
            stop_if_preempted(run, epoch, step + 1)


def train_step(run, loss_of):
    """One optimiser step of accum_iter micro-batches, checked finite before the update, logged."""
    cfg, accum, per_epoch = run.cfg, run.cfg['accum_iter'], run.steps_per_epoch
    scale = cfg['total_batch'] / 256
    run.lr = cosine_schedule(run.it, cfg['epochs'] * per_epoch, cfg['warmup_epochs'] * per_epoch,
                             cfg['lr'] * scale, cfg['min_lr'] * scale)
    for g in run.optimizer.param_groups:
        g['lr'] = run.lr * g.get('lr_scale', 1.0)  # layer decay scales every group but the head
    t0, wait, loss_sum = time.perf_counter(), 0.0, torch.zeros((), device=run.dist.device)
    for micro in range(accum):
        t = time.perf_counter()
        batch = next(run.batches)
        wait += time.perf_counter() - t
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
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg['clip_grad'] or math.inf)  # inf: no clip
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
    speed, epoch = run.meter.end_step(loss, time.perf_counter() - t0, wait), run.it // per_epoch
    run.log.write('step', run.it + 1, epoch=epoch, loss=loss, lr=run.lr, grad_norm=gnorm.item(),
                  **speed)
    run.bar.set_postfix_str(f"ep {epoch + 1}/{cfg['epochs']} loss {loss:.4f} lr {run.lr:.2e} "
                            f"{speed['clips_per_s']:.1f} clips/s", refresh=False)
    run.bar.update(1)
    return loss


def end_epoch(run, epoch, **metrics):
    """After the last step of `epoch` (0-based): the failure report, the epoch record (with the
    stage's metrics), the checkpoint and loss plot; pre-emption. -> the path if kept for good."""
    cfg, m, done = run.cfg, run.meter, epoch + 1
    run.failures.end_epoch(m.steps * cfg['total_batch'] // run.dist.world_size)
    if m.steps:  # nothing ran when resumed at the epoch's end
        s = dict(epoch=done, lr=run.lr, **m.summary(), **metrics)
        run.log.write('epoch', done * run.steps_per_epoch, **s)
        if run.dist.is_main:
            tqdm.write(f"epoch {done}/{cfg['epochs']}  " + '  '.join(
                f'{k} {v:.4g}' for k, v in s.items() if k not in ('epoch', 'epoch_s')))
    path = save(run, done, 0)
    kept = done % cfg['save_ckpt_freq'] == 0 or done == cfg['epochs']
    if kept and run.dist.is_main:
        plot_loss(cfg['output_dir'], f'{run.stage}: loss per step')
    stop_if_preempted(run, done, 0, path)
    return path if kept else None


def save(run, epoch, step_in_epoch):
    """The checkpoint, with every rank's RNG (and weight sums: DDP keeps them equal); retention:
    the others go unless they end an epoch that is a multiple of --save_ckpt_freq."""
    weights = [v for v in run.model.state_dict().values() if v.is_floating_point()]
    sums = torch.stack([v.double().sum() for v in weights]).tolist()
    rngs, sums = map(list, zip(*all_ranks((rng_state(), sums))))
    if run.dist.is_main and any(s != sums[0] for s in sums):
        print('warning: the ranks hold different weights (a module outside DDP?)', file=sys.stderr)
    path = os.path.join(run.cfg['output_dir'], checkpoint_name(epoch, step_in_epoch))
    if run.dist.is_main:
        save_checkpoint(path, {
            'model': run.model.state_dict(), 'optimizer': run.optimizer.state_dict(),
            'scaler': run.scaler.state_dict() if run.scaler else None, 'config': run.cfg,
            'stage': run.stage, 'epoch': epoch, 'step_in_epoch': step_in_epoch, 'rng': rngs[0],
            'rng_ranks': rngs, 'rank_weight_sums': sums, 'classes': list(run.classes)})
        for (e, s), old in checkpoints(run.cfg['output_dir']).items():
            if old != path and (s or e % run.cfg['save_ckpt_freq']):
                os.remove(old)
    return path


def plot_loss(folder, title):
    """The step losses of folder/log.jsonl as folder/loss.png, drawn with torchvision: a plateau or
    a divergence is seen at a glance. The labels give the range and the number of steps."""
    from torchvision.io import write_png
    from torchvision.utils import draw_bounding_boxes, draw_keypoints
    with open(os.path.join(folder, 'log.jsonl')) as f:
        v = torch.tensor([r['loss'] for r in map(json.loads, f) if r['kind'] == 'step'])
    W, H, m = 640, 300, 48
    n, k = len(v), -(-len(v) // (W - 2 * m))           # the mean of every k steps: one per pixel
    v = v[:n // k * k].view(-1, k).mean(1)
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
    img = draw_bounding_boxes(img, boxes, labels=['', f'{hi:.2f}', f'{lo:.2f}', f'step {n}', title],
                              colors=['black'] + ['white'] * 4, label_colors='black')
    write_png(img, os.path.join(folder, 'loss.png'))


class StepMeter:
    """Per optimiser step: clips/s, wall time and the time blocked in next(loader); per epoch: mean
    loss, clips/s and the share of time waiting for data (large: more --num_workers would help)."""

    def __init__(self, clips_per_step):
        self.clips_per_step = clips_per_step
        self.steps = self.loss = self.wait = self.time = 0

    def end_step(self, loss, seconds, wait):
        self.steps, self.loss = self.steps + 1, self.loss + loss
        self.wait, self.time = self.wait + wait, self.time + seconds
        return dict(clips_per_s=round(self.clips_per_step / seconds, 2), step_s=round(seconds, 4),
                    data_wait_s=round(wait, 4))

    def summary(self):
        return dict(loss=self.loss / self.steps,
                    clips_per_s=round(self.steps * self.clips_per_step / self.time, 2),
                    data_wait=round(self.wait / self.time, 3), epoch_s=round(self.time, 2))


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


def log_result(cfg, is_main, kind, **metrics):
    """A final result (test scores, mAP) in log.jsonl and, with --log_dir, at the last step."""
    step = cfg['epochs'] * cfg.get('steps_per_epoch', 0)
    Log(cfg['output_dir'], is_main, cfg.get('log_dir'), step).write(kind, step, **metrics)


# --------------------------------------------------------------------------------------------------
# Evaluation (finetune.py, linprobe.py): the softmax scores of all views of a video are averaged.

class ViewMerger(dict):
    """Dataset index -> (the mean softmax over the video's views, label): the padding duplicates
    that DistributedSampler adds on some ranks count once when the ranks are merged."""

    def add(self, indices, view_logits, labels):
        """indices (B,), view_logits (B, V, C) for the V views of each video, labels (B,)."""
        probs = view_logits.float().softmax(-1).mean(1).cpu()
        for i, p, y in zip(indices.tolist(), probs, labels.tolist()):
            self.setdefault(i, (p, y))

    def gather(self):
        """All ranks' videos (call on every rank) -> (scores (N, C), labels (N,)) in index order."""
        items = {}
        for part in all_ranks(dict(self)):
            items = {**part, **items}  # a video's first copy counts
        if not items:
            raise SystemExit('error: the evaluation saw no video (an empty split?)')
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
    """Every view of every video through model_fn (uint8 clips (n, 3, T, H, W) -> logits (n, C)) in
    chunks of max_clips (views multiply a batch's memory), merged over ranks (call on every rank) ->
    {'top1', 'top5', 'videos'}; with save_prefix, rank 0 prints them and writes
    <prefix>-results.json and <prefix>-per-class.csv."""
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
