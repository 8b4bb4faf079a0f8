"""VideoMAE pre-training: hide ~90% of a clip's space-time cubes, reconstruct their pixels, learn an encoder.

    python pretrain.py                                  # tiny model, built-in synthetic videos, CPU, minutes
    python pretrain.py --dataset ucf101 --data_path /data/ucf101            # the paper's UCF101 recipe
    torchrun --nproc_per_node=8 pretrain.py --dataset k400 --data_path /data/k400 --model base

One step (the data walk of architecture.md): uint8 clips (B, 3, T, H, W) from data.make_loader -> device
-> data.normalize -> a tube mask (B, N) drawn on the device -> model(video, mask) -> predictions of the
masked cubes (B, N_masked, 3*2*16*16) -> MSE against the per-cube-normalised pixels -> AdamW.
Read top to bottom: recipes (appendix Table 9, § B), flags, setup, the training loop, the reconstruction
pictures (Figures 10, 11), main(). Shared plumbing (schedules, checkpoints, DDP) lives in utils.py.
"""
import argparse
import json
import os
import signal
from contextlib import nullcontext

import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import data
import masking
import model as videomae
import utils

# ----------------------------------------------------------------------------------------------------
# Recipes. Appendix Table 9 (SSv2, K400): AdamW, base lr 1.5e-4 (x total batch / 256), weight decay 0.05,
# betas (0.9, 0.95), batch 1024, cosine decay, 40 warm-up epochs, flip no (SSv2) / yes (K400), MultiScaleCrop;
# 800 epochs (§ B: "pre-trained for 800 epochs by default"). Mask ratio 0.9 and 16 frames at stride 2 (SSv2)
# or 4 (K400) as the paper's default setting and the official scripts. min lr 1e-5 (scaled like lr) and
# checkpoint every 20 epochs as the official scripts; per-GPU batch 32 as the official scripts (the rest of
# the total batch comes from more GPUs or gradient accumulation).
# Official-code differences kept out of the defaults (flags reproduce them): the scripts' total batch is 2048
# (--total_batch 2048) and their epoch counts are 801/1601/... (--epochs 801); their pre-training has no flip.
TABLE9 = dict(model='base', mask_type='tube', mask_ratio=0.9, normalize_target=True, num_frames=16,
              input_size=224, lr=1.5e-4, min_lr=1e-5, weight_decay=0.05, opt_betas=[0.9, 0.95],
              total_batch=1024, batch_size=32, warmup_epochs=40, epochs=800, save_ckpt_freq=20, num_workers=10,
              crop='multiscale')
# § B, UCF101 / HMDB51: "a similar recipe on Kinetics", mask ratio 0.75, batch 192, base lr 3e-4, 3200 / 4800
# epochs, 16 frames at stride 4 / 2. Per-GPU batch 24 = 192 on the paper's 8 GPUs (official UCF101 script,
# which also keeps a checkpoint every 100 epochs). Flip as Kinetics (Table 9: yes).
SECTION_B = dict(TABLE9, mask_ratio=0.75, total_batch=192, batch_size=24, lr=3e-4, save_ckpt_freq=100, flip=True)
RECIPES = {
    'ssv2': dict(TABLE9, sampling_rate=2, flip=False),                           # Table 9, Sth-Sth V2 column
    'k400': dict(TABLE9, sampling_rate=4, flip=True),                            # Table 9, Kinetics-400 column
    'ucf101': dict(SECTION_B, sampling_rate=4, epochs=3200),                     # § B, UCF101
    'hmdb51': dict(SECTION_B, sampling_rate=2, epochs=4800),                     # § B, HMDB51
    'list': dict(TABLE9, sampling_rate=4, flip=True),                            # your own list file: K400 row
    # Not in the paper: a tiny ViT (128 wide, 4 blocks; decoder 192 x 1) on 8-frame 64x64 synthetic clips with
    # 8x8 patches (4 x 8 x 8 = 256 cubes, 64 visible at ratio 0.75), so the whole run fits a laptop CPU in
    # about 13 minutes. Measured choices (README, "Does pre-training help?"):
    # - the decoder is wider than the encoder: at 96 wide the official 1-D sine positions give its queries too
    #   little resolution to find a hidden cube's neighbours (a 96 x 2 or 64 x 1 decoder stayed on the
    #   predict-the-mean plateau for 4000 steps on an earlier set).
    # - mask ratio 0.75, § B's for the small datasets (UCF101, HMDB51; 320 videos here): at Table 9's 0.9 the
    #   encoder learns motion only after a second loss plateau whose length depends on the seed (seed 1 left it
    #   at step ~2000 and its features probe at 32%; seed 0 had not left it at step 4000: 16-22%, random 21%).
    #   At 0.75 seed 0's features probe at 30-35% by step 1600 and 50-60% at the end (seed 1: 57-64%).
    # - the crop is the frame itself, not MultiScaleCrop: a random scale per clip changes every clip's apparent
    #   speed and size, and a pre-training with it learnt no motion a probe could read (in memory: 11-15%,
    #   against 27-40% without it, same steps). No flip: the motion classes are mirror pairs.
    # - 100 epochs of 40 steps (batch 8); the base lr is raised (peak 1.5e-3 = 4.8e-2 x 8 / 256) because the run
    #   is ~1000x shorter than the paper's (twice that, at ratio 0.9, kept seed 0 on the first plateau for 2000
    #   steps).
    'synthetic': dict(TABLE9, model='small', embed_dim=128, depth=4, num_heads=4, decoder_embed_dim=192,
                      decoder_num_heads=3, decoder_depth=1, patch_size=8, input_size=64, num_frames=8,
                      sampling_rate=4, mask_ratio=0.75, flip=False, crop='center', total_batch=8, batch_size=8,
                      lr=4.8e-2, min_lr=1.6e-3, epochs=100, warmup_epochs=1, save_ckpt_freq=20, num_workers=2),
}
# Model shape flags; those not given (and not in the recipe) take model.SIZES[--model].
ARCH_KEYS = ('embed_dim', 'depth', 'num_heads', 'decoder_embed_dim', 'decoder_num_heads', 'decoder_depth',
             'patch_size', 'tubelet_size', 'drop_path_rate', 'use_checkpoint')
MASKS = {'tube': masking.tube_masking, 'random': masking.random_masking, 'frame': masking.frame_masking}
VIS_RATIOS = (0.75, 0.9, 0.95)                                                # Figures 10 and 11


# ----------------------------------------------------------------------------------------------------
# Flags. Names follow the official run_mae_pretraining.py where the concept is the same, so its commands
# carry over. Defaults are None: the recipe of --dataset fills them, an explicit flag wins.

def model_name(value):
    """'base' or the official 'pretrain_videomae_base_patch16_224' -> 'base'."""
    name = value.removeprefix('pretrain_videomae_').removesuffix('_patch16_224')
    if name not in videomae.SIZES:
        raise argparse.ArgumentTypeError(f'unknown model {value!r}; choose from {", ".join(videomae.SIZES)} '
                                         f'(or the official pretrain_videomae_<size>_patch16_224)')
    return name


def build_parser():
    def R(key, text):                                         # help text + the recipe defaults of this flag
        rows = [name for name, row in RECIPES.items() if key in row]
        if len(rows) == len(RECIPES):
            return f'{text} ({utils.recipe_help(RECIPES, key)})'
        if rows:
            return f'{text} (recipe default: ' + ', '.join(f'{n} {RECIPES[n][key]}' for n in rows) + '; others: none)'
        return text
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='Every default marked "recipe" comes from the --dataset row of RECIPES '
                                       '(appendix Table 9, § B); explicit flags override it.')
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='synthetic', choices=list(RECIPES),
                   help='which recipe and reader (default: synthetic, generated on first use)')
    g.add_argument('--data_path', help='dataset root (layouts in README), or for --dataset list the list file '
                                       '/ folder of train.csv, test.csv; synthetic: the generated cache')
    g.add_argument('--fold', type=int, default=1, help='UCF101/HMDB51 split (default 1)')
    g.add_argument('--num_frames', type=int, help=R('num_frames', 'frames per clip'))
    g.add_argument('--sampling_rate', type=int, help=R('sampling_rate', 'temporal stride between sampled frames'))
    g.add_argument('--input_size', type=int, help=R('input_size', 'crop side in pixels'))
    g.add_argument('--flip', action=argparse.BooleanOptionalAction, help=R('flip', 'random horizontal flip'))
    g.add_argument('--crop', choices=['multiscale', 'center'],
                   help=R('crop', "training crop: MultiScaleCrop (Table 9) or the frame's central square"))
    g.add_argument('--num_workers', type=int, help=R('num_workers', 'decoding processes per GPU'))
    g.add_argument('--max_videos', type=int, help='use only the first N training videos (quick experiments)')
    g = p.add_argument_group('model')
    g.add_argument('--model', type=model_name, help=R('model', 'small | base | large | huge'))
    for key, text in [('embed_dim', 'encoder width'), ('depth', 'encoder blocks'), ('num_heads', 'encoder heads'),
                      ('decoder_embed_dim', 'decoder width'), ('decoder_num_heads', 'decoder heads'),
                      ('decoder_depth', 'decoder blocks (ablation, Table 2a)'),
                      ('patch_size', 'patch side in pixels'), ('tubelet_size', 'frames per cube')]:
        g.add_argument(f'--{key}', type=int, help=R(key, text).replace('none)', 'the --model size\'s)'))
    g.add_argument('--drop_path', dest='drop_path_rate', type=float, help='stochastic depth (official 0)')
    g.add_argument('--use_checkpoint', action='store_true', default=None,
                   help='gradient checkpointing: less memory, ~30%% slower (official for huge)')
    g = p.add_argument_group('masking and target (ablations of Table 2)')
    g.add_argument('--mask_type', choices=list(MASKS), help=R('mask_type', 'tube (paper), random or frame'))
    g.add_argument('--mask_ratio', type=float, help=R('mask_ratio', 'fraction of cubes hidden, in [0, 1)'))
    g.add_argument('--normalize_target', action=argparse.BooleanOptionalAction,
                   help=R('normalize_target', 'reconstruct per-cube-normalised pixels (--no-normalize_target: '
                                              'plain [0, 1] pixels)'))
    g = p.add_argument_group('optimisation')
    g.add_argument('--batch_size', type=int, help=R('batch_size', 'clips per GPU (per process) and step'))
    g.add_argument('--total_batch', type=int, help=R('total_batch', 'clips per optimiser step over all GPUs; '
                   'reached by gradient accumulation when batch_size x GPUs is smaller'))
    g.add_argument('--lr', type=float, help=R('lr', 'BASE learning rate, as the official --lr: the peak is '
                                                   'lr x total_batch / 256'))
    g.add_argument('--min_lr', type=float, help=R('min_lr', 'final lr of the cosine, scaled like --lr'))
    g.add_argument('--weight_decay', type=float, help=R('weight_decay', 'AdamW weight decay (none on biases, '
                                                                       'norms, mask token)'))
    g.add_argument('--opt_betas', type=float, nargs=2, help=R('opt_betas', 'AdamW betas'))
    g.add_argument('--clip_grad', type=float, help='clip the gradient norm (official default: no clipping)')
    g.add_argument('--warmup_epochs', type=int, help=R('warmup_epochs', 'linear warm-up from 0'))
    g.add_argument('--epochs', type=int, help=R('epochs', 'total epochs (the cosine spans all of them)'))
    g = p.add_argument_group('run')
    g.add_argument('--output_dir', help='checkpoints, log.jsonl, config.json, pictures (default runs/pretrain-DATASET)')
    g.add_argument('--save_ckpt_freq', type=int, help=R('save_ckpt_freq', 'keep a checkpoint (and pictures) every '
                   'N epochs; the latest epoch is always saved too'))
    g.add_argument('--resume', default='auto', help="'auto' (default): latest checkpoint in output_dir; a path; "
                                                    "'' to start fresh")
    g.add_argument('--seed', type=int, default=0, help='model init, sampling, augmentation, masks (default 0)')
    g.add_argument('--device', default='auto', help='auto (GPU if any), cpu or cuda')
    g.add_argument('--precision', default='auto', help='auto (bf16 on GPUs that have it, else fp16 + loss '
                                                       'scaling; fp32 on CPU), fp32, bf16, fp16')
    g.add_argument('--compile', action='store_true', help='torch.compile the model (faster long runs)')
    g.add_argument('--visualize', metavar='CHECKPOINT', help='only write reconstruction pictures of CHECKPOINT, '
                                                             'then exit')
    g.add_argument('--vis_videos', type=int, default=4, help='held-out videos in the pictures (default 4)')
    return p


def resolve(parser, argv=None):
    """Flags over the recipe, then every check that can fail before any work (exit code 2, parser style)."""
    args = parser.parse_args(argv)
    if args.visualize:                                        # the checkpoint's config, then the flags given
        with torch.serialization.safe_globals([argparse.Namespace]):      # official files pickle their args
            saved = utils.load_state(args.visualize).get('config') or {}   # (and have no config of ours)
        given = {k: v for k, v in vars(args).items() if v is not None and v != parser.get_default(k)}
        args = argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k in vars(args)}, **given})
    cfg = utils.resolve_config(args, RECIPES[args.dataset])
    cfg['output_dir'] = cfg['output_dir'] or os.path.join('runs', f'pretrain-{cfg["dataset"]}')
    world = int(os.environ.get('WORLD_SIZE', 1))
    shape = {**videomae.SIZES[cfg['model']], **videomae.DEFAULTS,
             **{k: cfg[k] for k in ARCH_KEYS if cfg.get(k) is not None}}
    t, p = shape['tubelet_size'], shape['patch_size']
    if not 0.0 <= cfg['mask_ratio'] < 1.0:
        parser.error(f'--mask_ratio {cfg["mask_ratio"]} must be in [0, 1): it is the fraction of cubes hidden '
                     f'(0.9 in the paper; 1 would leave the encoder nothing to see)')
    if cfg['num_frames'] % t:
        parser.error(f'--num_frames {cfg["num_frames"]} is not divisible by the tubelet size {t} '
                     f'(frames per cube); use a multiple of {t}, e.g. {max(t, cfg["num_frames"] // t * t)}')
    if cfg['input_size'] % p:
        parser.error(f'--input_size {cfg["input_size"]} is not divisible by the patch size {p}; use a multiple '
                     f'of {p}, e.g. {max(p, cfg["input_size"] // p * p)}')
    per_step = cfg['batch_size'] * world
    if cfg['batch_size'] < 1 or cfg['total_batch'] % per_step:
        parser.error(f'--total_batch {cfg["total_batch"]} is not a multiple of --batch_size {cfg["batch_size"]} x '
                     f'{world} process(es) = {per_step}; change --batch_size (per GPU) or --total_batch')
    hw = (cfg['input_size'] // p) ** 2
    if int(cfg['mask_ratio'] * hw) < 1:
        parser.error(f'--mask_ratio {cfg["mask_ratio"]} hides no cube of a {hw}-patch frame: nothing to reconstruct')
    for key in ('epochs', 'save_ckpt_freq', 'sampling_rate', 'num_frames'):
        if cfg[key] < 1:
            parser.error(f'--{key} must be at least 1, got {cfg[key]}')
    if cfg['warmup_epochs'] > cfg['epochs']:
        parser.error(f'--warmup_epochs {cfg["warmup_epochs"]} is longer than --epochs {cfg["epochs"]}')
    if cfg['dataset'] not in ('synthetic',) and not cfg['data_path']:
        parser.error(f'--dataset {cfg["dataset"]} needs --data_path (the folder you downloaded; see README)')
    # The model's own options, saved in every checkpoint: build_pretrain / build_classifier(**model_kwargs)
    # rebuilds the same encoder (finetune.py, linprobe.py).
    cfg['model_kwargs'] = {k: cfg[k] for k in ARCH_KEYS if cfg.get(k) is not None}
    cfg['model_kwargs'].update(img_size=cfg['input_size'], num_frames=cfg['num_frames'])
    cfg['opt_betas'] = list(cfg['opt_betas'])
    return cfg


# ----------------------------------------------------------------------------------------------------
# Setup.

def build_model(cfg, device):
    net = videomae.build_pretrain(cfg['model'], **cfg['model_kwargs']).to(device)
    return net


def lr_at(cfg, it, steps_per_epoch):
    """Learning rate of optimiser step `it`: appendix § B scaling (base lr x total batch / 256, min lr likewise),
    linear warm-up from 0 over warmup_epochs, then half a cosine to min lr, per iteration (official)."""
    scale = cfg['total_batch'] / 256
    return utils.cosine_schedule(it, cfg['epochs'] * steps_per_epoch, cfg['warmup_epochs'] * steps_per_epoch,
                                 cfg['lr'] * scale, cfg['min_lr'] * scale)


def mask_generator(cfg, epoch, step, micro, rank, device):
    """A generator seeded from (seed, epoch, step, micro-batch, rank): masks are a pure function of where the run
    is, so a resumed run draws exactly the masks the uninterrupted one would (hash of ints is not salted)."""
    g = torch.Generator(device=device)
    g.manual_seed(hash((cfg['seed'], epoch, step, micro, rank)) & (2**63 - 1))
    return g


def save(cfg, raw, optimizer, scaler, epoch, step_in_epoch, classes, dist_info):
    """Checkpoint of the convention (utils.training_state, on every rank), written by rank 0 atomically.
    Only every save_ckpt_freq-th epoch is kept; the one before, if not such, is removed once this one exists."""
    state = utils.training_state('pretrain', raw, cfg, epoch, step_in_epoch, optimizer, scaler, classes)
    path = os.path.join(cfg['output_dir'], utils.checkpoint_name(epoch, step_in_epoch))
    if dist_info.is_main:
        utils.save_checkpoint(path, state)
        for name in os.listdir(cfg['output_dir']):
            if name.startswith('checkpoint-') and name.endswith('.pth') and name != os.path.basename(path):
                parts = name[len('checkpoint-'):-len('.pth')].split('-')
                if len(parts) == 2 or int(parts[0]) % cfg['save_ckpt_freq']:
                    os.remove(os.path.join(cfg['output_dir'], name))
    # hidden hook for the resume test: die like a killed job right after this checkpoint exists
    if os.environ.get('VIDEOMAE_DEBUG_SIGKILL_AFTER_EPOCH') == str(epoch) and step_in_epoch == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


# ----------------------------------------------------------------------------------------------------
# Training.

def train(cfg, dist_info):
    device = dist_info.device
    utils.seed_everything(cfg['seed'])                        # same init on every rank (DDP also broadcasts)
    samples, classes = data.load_split(cfg['dataset'], cfg['data_path'], 'train', cfg['fold'])
    if cfg['max_videos']:
        samples = samples[:cfg['max_videos']]
    dataset = data.VideoDataset(samples, mode='train', num_frames=cfg['num_frames'],
                                sampling_rate=cfg['sampling_rate'], input_size=cfg['input_size'],
                                crop=cfg['crop'], flip=cfg['flip'], seed=cfg['seed'])
    loader = data.make_loader(dataset, cfg['batch_size'], train=True, num_workers=cfg['num_workers'], seed=cfg['seed'])
    accum = utils.accumulation_steps(cfg['total_batch'], cfg['batch_size'], dist_info.world_size)
    steps_per_epoch = loader.sampler.num_samples // cfg['batch_size'] // accum    # optimiser steps; drop_last
    if steps_per_epoch < 1:
        raise SystemExit(f'error: {len(samples)} training videos do not fill one step of --total_batch '
                         f'{cfg["total_batch"]}; lower --total_batch/--batch_size or add videos')
    total_steps = cfg['epochs'] * steps_per_epoch
    peak_lr = cfg['lr'] * cfg['total_batch'] / 256            # appendix § B: lr = base lr x batch / 256
    final_lr = cfg['min_lr'] * cfg['total_batch'] / 256
    cfg.update(world_size=dist_info.world_size, accumulation_steps=accum, steps_per_epoch=steps_per_epoch,
               peak_lr=peak_lr, final_lr=final_lr, train_videos=len(samples))

    raw = build_model(cfg, device)
    groups = utils.param_groups(raw, cfg['weight_decay'])     # no decay: biases, norms, mask token
    optimizer = utils.make_adamw(groups, peak_lr, cfg['opt_betas'], device)
    autocast, scaler, precision = utils.amp_setup(device, cfg['precision'])
    cfg['precision_used'] = precision
    start_epoch, start_step = 0, 0
    resume = utils.resolve_resume(cfg['resume'], cfg['output_dir'])
    if resume:
        old = utils.checkpoint_meta(resume)['config']          # mmap: no tensor is read
        if (old.get('model'), old.get('model_kwargs')) != (cfg['model'], cfg['model_kwargs']):
            raise SystemExit(f'error: {resume} was trained with model {old.get("model")} {old.get("model_kwargs")}, '
                             f'not {cfg["model"]} {cfg["model_kwargs"]}; use another --output_dir or --resume ""')
        state = utils.resume_training(resume, 'pretrain', raw, optimizer, scaler, dist_info.rank)
        start_epoch, start_step = state['epoch'], state['step_in_epoch']
    net = raw
    if dist_info.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == 'cuda' else None)
    fwd = torch.compile(net) if cfg['compile'] else net

    log = utils.JsonlLog(os.path.join(cfg['output_dir'], 'log.jsonl'), dist_info.is_main)
    if dist_info.is_main:
        print('configuration:\n' + utils.format_config(cfg), flush=True)
        with open(os.path.join(cfg['output_dir'], 'config.json'), 'w') as f:
            json.dump(cfg, f, indent=1, sort_keys=True)
        print(f'{len(samples)} training videos, {steps_per_epoch} steps per epoch; peak lr {peak_lr:.3g} = '
              f'{cfg["lr"]:g} x {cfg["total_batch"]} / 256; {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M '
              f'parameters; {precision} on {device}' + (f'; resuming {resume} at epoch {start_epoch} step {start_step}'
                                                         if resume else ''), flush=True)
        if accum > 1:
            print(f'gradient accumulation: {accum} micro-batches of {cfg["batch_size"]} x {dist_info.world_size} '
                  f'process(es) per step reach the recipe\'s total batch {cfg["total_batch"]}', flush=True)

    if start_epoch >= cfg['epochs'] and dist_info.is_main:
        print(f'{resume} already completed {start_epoch} of --epochs {cfg["epochs"]}: nothing to do '
              f'(raise --epochs to continue the cosine, or use another --output_dir)')
    preempt = utils.Preemption()
    failures = data.FailureLog()
    mask_fn = MASKS[cfg['mask_type']]
    p, t = raw.patch_size, raw.tubelet_size
    bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch + start_step, disable=not dist_info.is_main,
               dynamic_ncols=True, unit='step')
    for epoch in range(start_epoch, cfg['epochs']):
        first = start_step if epoch == start_epoch else 0
        loader.sampler.set_epoch(epoch, skip=first * accum * cfg['batch_size'])   # skip what a resumed run saw
        batches = iter(loader)
        raw.train()
        meter = utils.StepMeter(cfg['total_batch'])            # step time, data wait, clips/s
        for step in range(first, steps_per_epoch):            # guard: never the loader's extra batch (official bug)
            it = epoch * steps_per_epoch + step
            lr = lr_at(cfg, it, steps_per_epoch)
            utils.set_lr(optimizer, lr)
            meter.start_step()
            loss_sum = 0.0
            for micro in range(accum):
                batch = meter.next(batches)
                failures.update(batch['failed'])
                video = batch['video'].to(device, non_blocking=True).flatten(0, 1)   # (B, 3, T, H, W) uint8
                video = data.normalize(video)                                        # float32, ImageNet stats
                B = video.shape[0]
                mask = mask_fn(B, raw.grid(video.shape), cfg['mask_ratio'],
                               generator=mask_generator(cfg, epoch, step, micro, dist_info.rank, device), device=device)
                # DDP: all-reduce the gradients only on the last micro-batch of the step
                sync = net.no_sync() if (dist_info.world_size > 1 and micro < accum - 1) else nullcontext()
                with sync:
                    with autocast():
                        pred = fwd(video, mask)                                      # (B, N_masked, 3*t*p*p)
                    loss = videomae.pretrain_loss(pred, video, mask, p, t, cfg['normalize_target'])
                    (scaler.scale(loss / accum) if scaler else loss / accum).backward()
                loss_sum += loss.item() / accum
            gnorm = utils.unscaled_grad_norm(optimizer, scaler, cfg['clip_grad'])   # before clipping
            loss_value = utils.all_reduce_mean(loss_sum, device)          # same value on every rank
            utils.check_finite(loss_value, it, cfg['output_dir'])      # stop before a NaN reaches the weights
            utils.optimizer_step(optimizer, scaler)
            speed = meter.end_step(loss_value)
            log.write(kind='step', epoch=epoch, step=step, it=it, loss=loss_value, lr=lr, grad_norm=gnorm, **speed)
            bar.set_postfix_str(f'ep {epoch + 1}/{cfg["epochs"]} loss {loss_value:.4f} lr {lr:.2e} '
                                f'{speed["clips_per_s"]:.1f} clips/s', refresh=False)
            bar.update(1)
            if step + 1 < steps_per_epoch and preempt.should_stop(device):   # pre-empted mid-epoch
                path = save(cfg, raw, optimizer, scaler, epoch, step + 1, classes, dist_info)
                bar.close()
                if dist_info.is_main:
                    print(f'{preempt.requested or "stop"}: saved {path}; rerun the same command to resume', flush=True)
                return None
        failures.end_epoch(meter.steps * cfg['total_batch'] // dist_info.world_size)
        utils.log_epoch(meter, log, dist_info.is_main, epoch, lr, cfg['epochs'])
        path = save(cfg, raw, optimizer, scaler, epoch + 1, 0, classes, dist_info)
        if (epoch + 1) % cfg['save_ckpt_freq'] == 0 or epoch + 1 == cfg['epochs']:
            if dist_info.is_main:
                save_reconstructions(raw, cfg, device, autocast, os.path.join(
                    cfg['output_dir'], 'reconstructions', os.path.basename(path)[:-len('.pth')]))
        if preempt.should_stop(device):
            if dist_info.is_main:
                print(f'{preempt.requested}: saved {path}; rerun the same command to resume', flush=True)
            bar.close()
            return None
    bar.close()
    return raw


# ----------------------------------------------------------------------------------------------------
# Reconstruction pictures (appendix § E, Figures 10 and 11; official run_videomae_vis.py). For a few held-out
# videos, one PNG each: the original frames, then for each mask ratio the masked input (hidden cubes dark)
# and the reconstruction (visible cubes are the original; each predicted cube is un-normalised with the
# mean/std of the original cube, as the official visualisation does: its brightness comes from the truth).

# 3x5 pixel glyphs for the row labels (no font library needed): 15 bits, row by row.
GLYPHS = {c: g for c, g in zip('0123456789%.ACEGIKLMNORS ', (
    '111101101101111 010110010010111 111001111100111 111001111001111 101101111001001 111100111001111 '
    '111100111101111 111001001001001 111101111101111 111101111001111 101001010100101 000000000000010 '
    '010101111101101 011100100100011 111100110100111 011100101101011 111010010010111 101110100110101 '
    '100100100100111 101111111101101 110101101101101 010101101101010 110101110101101 011100010001110 '
    '000000000000000').split())}


def text_image(text, height, scale=2):
    """(3, height, width) float image of `text` in white on black, glyphs scaled up `scale` times."""
    w = 4 * scale * len(text) + 2 * scale
    img = torch.zeros(3, height, w)
    top = max(0, (height - 5 * scale) // 2)
    for i, ch in enumerate(text.upper()):
        bits = torch.tensor([int(b) for b in GLYPHS.get(ch, GLYPHS[' '])], dtype=torch.float).view(5, 3)
        glyph = bits.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        x = 2 * scale + 4 * scale * i
        img[:, top:top + 5 * scale, x:x + 3 * scale] = glyph
    return img


def cube_mask_pixels(mask, grid, t, p):
    """(B, N) cube mask -> (B, 1, T, H, W) pixel mask."""
    m = mask.view(mask.shape[0], 1, *grid)
    return m.repeat_interleave(t, 2).repeat_interleave(p, 3).repeat_interleave(p, 4)


@torch.no_grad()
def save_reconstructions(raw, cfg, device, autocast, out_dir, ratios=VIS_RATIOS):
    """Write out_dir/video-K.png for cfg['vis_videos'] held-out (test split) videos; returns the paths."""
    samples, classes = data.load_split(cfg['dataset'], cfg['data_path'], 'test', cfg['fold'])
    n = min(cfg['vis_videos'], len(samples))
    picks = sorted({round(i * (len(samples) - 1) / max(n - 1, 1)) for i in range(n)})   # spread over classes
    ds = data.VideoDataset([samples[i] for i in picks], mode='val', num_frames=cfg['num_frames'],
                           sampling_rate=cfg['sampling_rate'], input_size=cfg['input_size'], seed=cfg['seed'])
    os.makedirs(out_dir, exist_ok=True)
    was_training = raw.training
    raw.eval()
    p, t = raw.patch_size, raw.tubelet_size
    S, T = cfg['input_size'], cfg['num_frames']
    zoom = max(1, 128 // S)                                    # 64x64 frames shown at 128x128 (nearest)
    show = list(range(0, T, max(1, T // 8)))[:8]               # at most 8 frames: one per tubelet at T=16
    paths = []
    for k in range(len(ds)):
        clip = ds[k]['video'].to(device)                       # (1, 3, T, S, S) uint8
        original, video = clip.float() / 255, data.normalize(clip)
        grid = raw.grid(video.shape)
        rows = [('original', original)]
        for r in ratios:
            g = torch.Generator(device=device).manual_seed(cfg['seed'] * 1000 + k)   # same masks at every checkpoint
            mask = MASKS[cfg['mask_type']](1, grid, r, generator=g, device=device)
            with autocast():
                pred = raw(video, mask)
            rec = videomae.reconstruct(video, mask, pred.float(), p, t, cfg['normalize_target'])
            hidden = cube_mask_pixels(mask, grid, t, p)
            rows.append((f'mask {round(r * 100)}%', torch.where(hidden, torch.full_like(original, 0.2), original)))
            rows.append((f'recon {round(r * 100)}%', rec))
        label_w = text_image('recon 95%', S * zoom).shape[-1]
        lines = []
        for name, clip in rows:                               # clip (1, 3, T, S, S) in [0, 1]
            frames = [F.pad(clip[0, :, i].float().cpu().repeat_interleave(zoom, 1).repeat_interleave(zoom, 2),
                            (2, 2, 2, 2), value=1.0) for i in show]
            label = text_image(name, S * zoom + 4)
            label = F.pad(label, (0, label_w + 8 - label.shape[-1]))
            lines.append(torch.cat([label] + frames, dim=2))
        picture = (torch.cat(lines, dim=1).clamp(0, 1) * 255).round().to(torch.uint8)
        path = os.path.join(out_dir, f'video-{k}.png')
        torchvision.io.write_png(picture, path)
        paths.append(path)
    raw.train(was_training)
    return paths


def visualize_only(cfg):
    """--visualize CHECKPOINT: the model and data of the checkpoint's own config, write the pictures, exit."""
    device = utils.init_distributed(cfg['device']).device
    raw = videomae.build_pretrain(cfg['model'], **cfg['model_kwargs']).to(device)
    videomae.load_checkpoint(raw, cfg['visualize'])
    autocast, _, _ = utils.amp_setup(device, cfg['precision'])
    name = os.path.splitext(os.path.basename(cfg['visualize']))[0]
    out = os.path.join(os.path.dirname(os.path.abspath(cfg['visualize'])), 'reconstructions', name)
    for path in save_reconstructions(raw, cfg, device, autocast, out):
        print(path)


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = build_parser()
    cfg = resolve(parser, argv)
    if cfg['visualize']:
        return visualize_only(cfg)
    os.makedirs(cfg['output_dir'], exist_ok=True)
    dist_info = utils.init_distributed(cfg['device'])
    try:
        raw = train(cfg, dist_info)
        dump = os.environ.get('VIDEOMAE_DEBUG_PARAM_DUMP')    # hidden hook for the DDP test: every rank's weights
        if raw is not None and dump:
            torch.save(raw.state_dict(), f'{dump}-rank{dist_info.rank}.pt')
    finally:
        utils.cleanup_distributed()


if __name__ == '__main__':
    main()
