"""Training plumbing shared by pretrain.py, finetune.py, linprobe.py and detect.py.

Only what two or more stages need and that is not the method itself: recipes resolved against flags,
distributed setup, learning-rate schedules and parameter groups, mixed precision, atomic checkpoints
with exact resume, pre-emption, logging, and multi-view evaluation. No model, no data.
"""
import csv
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


# ----------------------------------------------------------------------------------------------------
# Recipes: the stage's table gives the defaults, explicit flags win.

def recipe_help(table, key, fmt=str):
    """'recipe: synthetic=8, ucf101=192, ...' for a flag's --help, so every default is visible."""
    vals = {}
    for name, row in table.items():
        if key in row:
            vals.setdefault(fmt(row[key]), []).append(name)
    if not vals:
        return ''
    if len(vals) == 1:
        return f'recipe default: {next(iter(vals))}'
    return 'recipe default: ' + ', '.join(f'{"/".join(names)} {v}' for v, names in vals.items())


def resolve_config(args, recipe):
    """Merge argparse flags (default None = not given) over a recipe row; returns a plain dict.

    Every recipe key must exist as a flag, so that each default can be overridden."""
    cfg = dict(vars(args))
    for key, value in recipe.items():
        if key not in cfg:
            raise KeyError(f'recipe key {key!r} has no command-line flag')
        if cfg[key] is None:
            cfg[key] = value
    return cfg


def format_config(cfg):
    width = max(len(k) for k in cfg)
    return '\n'.join(f'  {k:<{width}} {v}' for k, v in sorted(cfg.items()))


# ----------------------------------------------------------------------------------------------------
# Distributed: one code path for `python script.py` and `torchrun --nproc_per_node=N script.py`.

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device_arg=None):
    """Reads torchrun's environment. NCCL on GPUs, gloo on CPU. device_arg: 'cpu', 'cuda' or None (auto)."""
    use_cuda = torch.cuda.is_available() if device_arg in (None, 'auto') else device_arg.startswith('cuda')
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit('error: --device cuda was asked for but no CUDA device is visible')
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
    else:
        device = torch.device('cpu')
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if use_cuda else 'gloo',
                                device_id=device if use_cuda else None)
    return Dist(rank, world_size, local_rank, device)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(value, device):
    """Mean of a python float over ranks (for logging only)."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def all_reduce_sum(values, device):
    """Elementwise sum of a list of numbers over ranks."""
    t = torch.tensor([float(v) for v in values], device=device, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Batch size and learning rate (appendix § B: lr = base lr x total batch / 256).

def accumulation_steps(total_batch, batch_size, world_size):
    """Gradient-accumulation steps so that batch_size x world_size x steps == total_batch."""
    per_step = batch_size * world_size
    if total_batch % per_step:
        raise SystemExit(f'error: the total batch {total_batch} is not a multiple of --batch_size {batch_size} '
                         f'x {world_size} process(es) = {per_step}; change --batch_size or --total_batch')
    return total_batch // per_step


def cosine_schedule(step, total_steps, warmup_steps, base_value, final_value):
    """Per-iteration value: linear warm-up from 0 to base, then half a cosine down to final (official)."""
    if step < warmup_steps:
        return base_value * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * min(1.0, progress)))


NO_DECAY_NAMES = ('pos_embed', 'mask_token', 'cls_token')


def layer_id(name, depth):
    """Layer of a parameter for layer-wise lr decay: embedding 0, block i -> i + 1, the rest depth + 1."""
    name = name.removeprefix('module.').removeprefix('encoder.')
    if name.startswith(('patch_embed', 'pos_embed', 'mask_token', 'cls_token')):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return depth + 1


def param_groups(model, weight_decay, layer_decay=1.0, depth=None):
    """AdamW groups: no weight decay for biases, norms (1-D) and tokens; lr_scale = decay^(depth+1-layer).

    layer_decay 1.0 (pre-training) gives two groups with lr_scale 1."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith('.bias') or any(t in name for t in NO_DECAY_NAMES)
        layer = layer_id(name, depth) if layer_decay < 1.0 else 0
        scale = layer_decay ** (depth + 1 - layer) if layer_decay < 1.0 else 1.0
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {'params': [], 'names': [], 'weight_decay': 0.0 if no_decay else weight_decay,
                           'lr_scale': scale, 'layer': layer}
        groups[key]['params'].append(p)
        groups[key]['names'].append(name)
    return [groups[k] for k in sorted(groups)]


def make_adamw(groups, lr, betas, device):
    """AdamW (eps 1e-8 as the official code); the fused kernel on GPU and CPU (one pass over the parameters:
    on a 2-core CPU ~8x faster than the per-tensor loop for ViT-B's 94M parameters, same maths to 1 ulp)."""
    fused = device.type in ('cuda', 'cpu')
    opt_groups = [{k: v for k, v in g.items() if k != 'names'} for g in groups]
    return torch.optim.AdamW(opt_groups, lr=lr, betas=tuple(betas), eps=1e-8, fused=fused or None)


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g['lr'] = lr * g.get('lr_scale', 1.0)


def optimizer_step(optimizer, scaler):
    """One optimiser step; with an fp16 GradScaler it skips steps whose gradients overflowed. Then zero grads."""
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


def grad_norm(parameters):
    grads = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else 0.0


def unscaled_grad_norm(optimizer, scaler, max_norm=None):
    """L2 norm of the gradients of all the optimiser's parameters, in true units: an fp16 GradScaler's factor
    is divided out first (unscale_; scaler.step then does not divide again), so the logged norm means the
    same at every precision. With max_norm the gradients are clipped to it; the norm returned is the one
    before clipping (what clip_grad_norm_ returns). inf/nan when an fp16 step overflowed (the scaler skips it)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g['params']]
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    return grad_norm(params)


# ----------------------------------------------------------------------------------------------------
# Mixed precision.

def amp_setup(device, precision='auto'):
    """Returns (autocast context factory, GradScaler or None, name).

    auto: bf16 on GPUs that support it (no scaler needed), else fp16 with a dynamic loss scaler; fp32 on CPU
    (bf16 autocast on CPU is a flag away: --precision bf16)."""
    if precision == 'auto':
        if device.type == 'cuda':
            precision = 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
        else:
            precision = 'fp32'
    if precision not in ('fp32', 'bf16', 'fp16'):
        raise SystemExit(f'error: --precision must be auto, fp32, bf16 or fp16, not {precision!r}')
    if precision == 'fp16' and device.type != 'cuda':
        raise SystemExit('error: --precision fp16 needs a GPU; use bf16 or fp32 on CPU')
    if precision == 'fp32':
        return nullcontext, None, precision
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == 'fp16' else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler, precision


def check_finite(loss_value, step, output_dir):
    if not math.isfinite(loss_value):
        raise SystemExit(f'error: the loss is {loss_value} at step {step}; stopping. The last good checkpoint '
                         f'in {output_dir} is kept: resume from it with a lower --lr or --precision fp32.')


# ----------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, automatic resume, exact RNG restore.

def save_checkpoint(path, state):
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = os.fspath(path)
    tmp = f'{path}.tmp.{os.getpid()}'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_name(epoch, step_in_epoch=0):
    """checkpoint-00040.pth: 40 epochs done. checkpoint-00040-000123.pth: 123 steps into epoch 40 (pre-empted)."""
    return f'checkpoint-{epoch:05d}.pth' if step_in_epoch == 0 else f'checkpoint-{epoch:05d}-{step_in_epoch:06d}.pth'


def latest_checkpoint(output_dir):
    """The checkpoint with the highest (epoch, step) in output_dir, by file name; None if there is none."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            m = re.fullmatch(r'checkpoint-(\d+)(?:-(\d+))?\.pth', name)
            if m:
                found.append((int(m[1]), int(m[2] or 0), os.path.join(output_dir, name)))
    return max(found)[2] if found else None


def load_state(path):
    """Our own training checkpoint (weights_only: tensors, numbers, strings, lists, dicts only)."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SystemExit(f'error: cannot read checkpoint {path}: {e}') from None


def resolve_resume(resume, output_dir):
    """--resume auto | PATH | '' -> a checkpoint path or None."""
    if not resume:
        return None
    if resume == 'auto':
        return latest_checkpoint(output_dir)
    if not os.path.isfile(resume):
        raise SystemExit(f'error: --resume {resume}: no such file')
    return resume


def rng_state():
    """All RNG states as tensors and plain values, so checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {'python': list(random.getstate()[1]), 'python_version': random.getstate()[0],
             'numpy': torch.from_numpy(keys.astype(np.int64)), 'numpy_rest': [pos, has_gauss, gauss],
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate((state['python_version'], tuple(state['python']), None))
    pos, has_gauss, gauss = state['numpy_rest']
    np.random.set_state(('MT19937', state['numpy'].numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits.

    A second SIGINT interrupts at once (the user really wants out)."""

    def __init__(self):
        self.requested = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners)
                pass

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f'\n{self.requested} received: saving a checkpoint at the end of this step, then exiting',
              file=sys.stderr, flush=True)

    def should_stop(self, device):
        """True on every rank as soon as any rank was signalled (so all ranks save at the same step)."""
        flag = 1.0 if self.requested else 0.0
        if dist.is_available() and dist.is_initialized():
            flag = all_reduce_sum([flag], device)[0]
        return flag > 0


# ----------------------------------------------------------------------------------------------------
# Logging.

class JsonlLog:
    """Append-only JSON-lines log (rank 0 only); survives resumes."""

    def __init__(self, path, enabled=True):
        self.path = path if enabled else None

    def write(self, **record):
        if self.path:
            record.setdefault('time', round(time.time(), 3))
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')


class StepMeter:
    """Speed of a training loop, measured the same way in every stage. Per optimiser step: the wall time
    (step_s), the part of it the main process sat blocked in next(loader) (data_wait_s) and clips/s; per
    epoch: the mean loss, clips/s and the share of the time spent waiting for data (near 0: the model is the
    bottleneck; large: more --num_workers or faster storage would help).

    clips_per_step: clips through the model per optimiser step, all ranks together (total batch x clips
    per video). One meter per epoch: per step start_step(), batch = meter.next(batches) for every
    micro-batch, end_step(loss) after the optimiser step -> the step's log fields; summary() at the end."""

    def __init__(self, clips_per_step):
        self.clips_per_step = clips_per_step
        self.steps, self.loss_sum, self.wait_sum, self.time_sum = 0, 0.0, 0.0, 0.0

    def start_step(self):
        self.t0, self.wait = time.perf_counter(), 0.0

    def next(self, batches):
        """next(batches), timing how long the loader kept the step waiting."""
        t = time.perf_counter()
        batch = next(batches)
        self.wait += time.perf_counter() - t
        return batch

    def end_step(self, loss):
        """Call after the optimiser step (the loss .item() calls have synchronised the GPU, so the time is
        the step's, not the launch's). Returns dict(clips_per_s, step_s, data_wait_s) for the step record."""
        dt = time.perf_counter() - self.t0
        self.steps += 1
        self.loss_sum += loss
        self.wait_sum += self.wait
        self.time_sum += dt
        return dict(clips_per_s=round(self.clips_per_step / dt, 2), step_s=round(dt, 4),
                    data_wait_s=round(self.wait, 4))

    def summary(self):
        """The steps of this epoch: dict(loss (mean), clips_per_s, data_wait (share of the time), epoch_s)."""
        t = max(self.time_sum, 1e-9)
        return dict(loss=self.loss_sum / max(self.steps, 1),
                    clips_per_s=round(self.steps * self.clips_per_step / t, 2),
                    data_wait=round(self.wait_sum / t, 3), epoch_s=round(self.time_sum, 2))


def log_epoch(meter, log, is_main, epoch, lr, epochs):
    """End of epoch `epoch` (0-based), the same in every stage: an 'epoch' record in log.jsonl (epochs done,
    lr, StepMeter.summary()) and one printed line above the progress bar. Nothing when no step ran (a run
    resumed from a checkpoint taken at the epoch's end)."""
    if not meter.steps:
        return
    s = dict(epoch=epoch + 1, lr=lr, **meter.summary())
    log.write(kind='epoch', **s)
    if is_main:
        tqdm.write(f'epoch {s["epoch"]}/{epochs}  loss {s["loss"]:.4f}  lr {s["lr"]:.3g}  '
                   f'{s["clips_per_s"]} clips/s  waiting for data {s["data_wait"]:.0%}')


# ----------------------------------------------------------------------------------------------------
# Evaluation: the scores of all views of a video are averaged (softmax), then top-1 / top-5.

class ViewMerger:
    """Collects per-video summed softmax scores. Items are keyed by dataset index, so the padding duplicates
    that DistributedSampler adds on some ranks are counted once when the ranks are merged."""

    def __init__(self):
        self.scores, self.labels = {}, {}

    def add(self, indices, view_logits, labels):
        """indices (B,), view_logits (B, V, C) for the V views of each video, labels (B,)."""
        probs = view_logits.float().softmax(-1).mean(1).cpu()
        for i, p, y in zip(indices.tolist(), probs, labels.tolist()):
            self.scores.setdefault(i, p)  # a second copy of the same video (padding) is ignored
            self.labels[i] = y

    def gather(self):
        """Merge the collections of every rank (call on all ranks); returns (scores (N, C), labels (N,))."""
        items = {i: (self.scores[i], self.labels[i]) for i in self.scores}
        if dist.is_available() and dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, items)
            for part in parts:
                for i, v in part.items():
                    items.setdefault(i, v)
        keys = sorted(items)
        if not keys:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
        return torch.stack([items[k][0] for k in keys]), torch.tensor([items[k][1] for k in keys])


def topk_accuracy(scores, labels, ks=(1, 5)):
    """Percent of videos whose label is among the k highest scores."""
    out = {}
    for k in ks:
        k_eff = min(k, scores.shape[1])
        hit = (scores.topk(k_eff, dim=1).indices == labels[:, None]).any(1)
        out[f'top{k}'] = 100.0 * hit.float().mean().item()
    return out


def per_class_accuracy(scores, labels, classes):
    pred = scores.argmax(1)
    rows = []
    for c, name in enumerate(classes):
        sel = labels == c
        n = int(sel.sum())
        acc = 100.0 * (pred[sel] == c).float().mean().item() if n else float('nan')
        rows.append((name, n, acc))
    return rows


def write_per_class_csv(path, rows):
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['class', 'videos', 'top1'])
        for name, n, acc in rows:
            w.writerow([name, n, f'{acc:.2f}'])


def compare_per_class(csv_a, csv_b, margin=5.0):
    """Classes where model A beats B (and B beats A) by more than margin points (appendix Figures 7, 8)."""
    def read(p):
        with open(p, newline='') as f:
            return {r['class']: float(r['top1']) for r in csv.DictReader(f)}
    a, b = read(csv_a), read(csv_b)
    common = [c for c in a if c in b and not (math.isnan(a[c]) or math.isnan(b[c]))]
    a_wins = sorted(((a[c] - b[c], c) for c in common if a[c] - b[c] > margin), reverse=True)
    b_wins = sorted(((b[c] - a[c], c) for c in common if b[c] - a[c] > margin), reverse=True)
    lines = [f'{len(common)} classes in both; margin {margin} points',
             f'A ({csv_a}) better on {len(a_wins)}:']
    lines += [f'  {c:<40} +{d:5.1f}  ({a[c]:.1f} vs {b[c]:.1f})' for d, c in a_wins]
    lines.append(f'B ({csv_b}) better on {len(b_wins)}:')
    lines += [f'  {c:<40} +{d:5.1f}  ({b[c]:.1f} vs {a[c]:.1f})' for d, c in b_wins]
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------
# Classification stages (finetune.py, linprobe.py): one evaluation loop, one report, one checkpoint layout.

@torch.no_grad()
def evaluate(model_fn, loader, device, autocast=nullcontext, failures=None, max_clips=None, desc='eval',
             progress=True):
    """Every view of every video in loader through model_fn; returns a ViewMerger (then .gather() on all ranks).

    Batches: video uint8 (B, V, 3, T, H, W), label (B,), index (B,), failed (list of str).
    model_fn: uint8 clips (n, 3, T, H, W) on device -> logits (n, C) (it normalises). The B*V clips go through
    in chunks of at most max_clips: the V = clips x crops test views would otherwise multiply the memory of a
    batch by V. failures: anything with .update(batch['failed']) (data.FailureLog)."""
    from tqdm import tqdm
    merger = ViewMerger()
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        if failures is not None:
            failures.update(batch['failed'])
        video = batch['video'].to(device, non_blocking=True)
        B, V = video.shape[:2]
        clips = video.flatten(0, 1)                                      # (B*V, 3, T, H, W), views of a video adjacent
        chunk = max_clips or len(clips)
        with autocast():
            logits = torch.cat([model_fn(clips[i:i + chunk]).float() for i in range(0, len(clips), chunk)])
        merger.add(batch['index'], logits.view(B, V, -1), batch['label'])
    return merger


def classification_report(merger, classes, save_prefix=None, title='test'):
    """Top-1/top-5 over videos (softmax of the views averaged) -> dict. With save_prefix (pass it on rank 0
    only) also writes <prefix>-results.json and <prefix>-per-class.csv and prints the scores.
    Call on every rank: the gather is collective."""
    scores, labels = merger.gather()
    if len(labels) == 0:
        raise SystemExit('error: the evaluation saw no video (empty split?)')
    metrics = {**topk_accuracy(scores, labels), 'videos': len(labels)}
    if save_prefix:
        write_per_class_csv(f'{save_prefix}-per-class.csv', per_class_accuracy(scores, labels, classes))
        with open(f'{save_prefix}-results.json', 'w') as f:
            json.dump({**metrics, 'title': title}, f, indent=1)
        print(f"{title}: top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} over {len(labels)} videos "
              f"(per class: {save_prefix}-per-class.csv)")
    return metrics


def training_state(stage, model, cfg, epoch, step_in_epoch, optimizer, scaler, classes):
    """The checkpoint of the convention (api.md). Call on every rank (it gathers each rank's RNG state,
    so that a resume with the same world size continues every rank's random stream exactly)."""
    rng = rng_state()
    ranks = [rng]
    if dist.is_available() and dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, rng)
    return {'model': model.state_dict(), 'config': cfg, 'stage': stage, 'epoch': epoch,
            'step_in_epoch': step_in_epoch, 'optimizer': optimizer.state_dict(),
            'scaler': scaler.state_dict() if scaler is not None else None, 'rng': rng, 'rng_ranks': ranks,
            'classes': list(classes)}


def resume_training(path, stage, model, optimizer, scaler, rank=0):
    """Restore training_state(): weights (strict), optimizer, scaler, this rank's RNG. Returns the checkpoint."""
    state = load_state(path)
    if state.get('stage') != stage:
        raise SystemExit(f"error: --resume {path} is a {state.get('stage')!r} checkpoint, not a {stage!r} one; "
                         f"to start {stage} from it pass it as the initial weights and a fresh --output_dir")
    try:
        model.load_state_dict(state['model'])
    except RuntimeError as e:
        raise SystemExit(f'error: --resume {path} does not fit the model these flags build (a different size or '
                         f'shape flag?): {str(e)[:500]}') from None
    optimizer.load_state_dict(state['optimizer'])
    if scaler is not None and state.get('scaler'):
        scaler.load_state_dict(state['scaler'])
    ranks = state.get('rng_ranks') or []
    set_rng_state(ranks[rank] if rank < len(ranks) else state['rng'])
    return state


def checkpoint_meta(path):
    """{'config', 'classes', 'stage'} of one of our checkpoints without reading its tensors (mmap);
    empty values for an official file (it has none of them)."""
    import argparse  # official checkpoints pickle their argparse Namespace
    if not os.path.isfile(path):
        raise SystemExit(f'error: checkpoint {path}: no such file')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                obj = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SystemExit(f'error: cannot read checkpoint {path}: {e}') from None
    obj = obj if isinstance(obj, dict) else {}
    cfg = obj.get('config')
    return {'config': dict(cfg) if isinstance(cfg, dict) else {}, 'classes': list(obj.get('classes') or []),
            'stage': obj.get('stage')}
