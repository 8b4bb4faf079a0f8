"""End-to-end fine-tuning of a VideoMAE encoder for action classification (appendix Table 10 and § B).

One file, top to bottom: the recipe table (the appendix rows, cited), argparse, setup, the training loop,
evaluation (a quick one-view validation during training, the full multi-view test protocol at the end),
prediction, main().

  python finetune.py --finetune runs/pretrain-synthetic/checkpoint-00100.pth     # synthetic data, CPU, minutes
  torchrun --nproc_per_node=8 finetune.py --dataset ssv2 --data_path /data/ssv2 --size base
      --finetune videomae_base_ssv2_pretrain.pth                                 # (one line) Table 10, SSv2
  python finetune.py --dataset k400 --data_path /data/k400 --size base           # no --finetune: supervised
      from-scratch baseline of § B (the epochs switch to 200 on K400, 100 on SSv2; layer decay off)
  python finetune.py --eval --resume runs/finetune-ssv2-base/checkpoint-00040.pth  # test protocol only
  python finetune.py --predict a.mp4 b.webm --resume runs/finetune-ssv2-base/checkpoint-00040.pth
  python finetune.py --compare runs/A/test-per-class.csv runs/B/test-per-class.csv --margin 10

Flags left unset take, in this order: the checkpoint being resumed or evaluated (its saved config), the
pre-training checkpoint given with --finetune (model size and shape), the recipe row.
"""
import argparse
import json
import os
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

import data
import model as vmae
import utils

# ----------------------------------------------------------------------------------------------------
# Recipes. Table 10 (SSv2, K400) and § B (UCF101, HMDB51) of the appendix; lr is the BASE lr, scaled by
# total_batch / 256 (§ B). Values the appendix does not give come from the official release (commented).

TABLE10 = dict(
    weight_decay=0.05, betas=(0.9, 0.999), total_batch=512, warmup_epochs=5,   # Table 10
    num_sample=2, randaug=(9, 0.5), smoothing=0.1, mixup=0.8, cutmix=1.0,      # Table 10 (repeated aug 2)
    min_lr=1e-6, random_erasing=0.25, init_scale=0.001, crop='resized',        # official defaults (not in Table 10)
    num_frames=16, input_size=224, short_side=224, batch_size=8)               # 16x224^2 (§ B); batch per GPU
SSV2 = dict(TABLE10, flip=False, sampling='segment', sampling_rate=2,          # TSN segments (§ B); no flip
            test_clips=2, test_crops=3, fc_drop=0.0)                            # 2 clips x 3 crops (§ B)
K400 = dict(TABLE10, flip=True, sampling='dense', sampling_rate=4,             # dense sampling (§ B); flip
            test_clips=5, test_crops=3, lr=1e-3, fc_drop=0.0)                   # 5 x 3 (§ B); lr 1e-3 all sizes
UCF101 = dict(K400, total_batch=128, epochs=100, lr=5e-4, layer_decay=0.7,     # § B ("a similar recipe on
              drop_path=0.2, fc_drop=0.5)                                       # Kinetics"); fc_drop 0.5: official script
HMDB51 = dict(K400, total_batch=128, epochs=50, lr=1e-3, layer_decay=0.7,      # § B
              drop_path=0.2, sampling_rate=2, test_clips=10)                    # stride 2 as its pre-training (§ B); 10 x 3

RECIPES = {
    'ssv2-small': dict(SSV2, lr=1e-3, epochs=40, drop_path=0.1, layer_decay=0.7),                  # Table 10
    'ssv2-base': dict(SSV2, lr=5e-4, epochs=40, drop_path=0.1, layer_decay=0.75),                  # Table 10
    'ssv2-large': dict(SSV2, lr=5e-4, epochs=30, drop_path=0.2, layer_decay=0.75, fc_drop=0.5),    # Table 10
    # Table 10 has no huge model on SSv2: the large row extended (drop path 0.2 is the table's L,H value).
    'ssv2-huge': dict(SSV2, lr=5e-4, epochs=30, drop_path=0.2, layer_decay=0.75, fc_drop=0.5),
    'k400-small': dict(K400, epochs=150, drop_path=0.1, layer_decay=0.7),                          # Table 10
    'k400-base': dict(K400, epochs=75, drop_path=0.1, layer_decay=0.75),                           # Table 10
    'k400-large': dict(K400, epochs=50, drop_path=0.2, layer_decay=0.75, fc_drop=0.5),             # Table 10
    'k400-huge': dict(K400, epochs=50, drop_path=0.2, layer_decay=0.75, fc_drop=0.5),              # Table 10
    # § B gives one row (ViT-B) for UCF101 and for HMDB51; every size uses it (the paper fine-tunes no other).
    'ucf101': UCF101,
    'hmdb51': HMDB51,
    # Not in the paper: pretrain.py's tiny synthetic model (128 wide, 4 blocks, 8x8 patches, 8 frames of
    # 64x64 at stride 4) so that a run fits a laptop CPU in minutes. Otherwise the K400 column, except:
    # no RandAugment / random erasing / mixup / cutmix and one clip per video (they pay off over long
    # schedules, not over 1000 steps), a higher base lr (peak 1e-3 = 1.6e-2 x 16 / 256) and a 2-epoch warm-up
    # (the run is ~100x shorter), and one test crop (square frames: the three crops along the long side
    # would coincide). 50 epochs = 1000 steps, because measured: from scratch the model leaves chance after
    # ~540 steps, and a 20-epoch cosine ends before any init does (README, "Does pre-training help?"). No flip: it swaps MoveLeft/MoveRight and the two rotations, i.e. relabels
    # half of those clips as the opposite class. The crop is pre-training's MultiScaleCrop (sides 66-100%):
    # RandomResizedCrop's 8% area would often cut the moving shapes out of a 64x64 frame.
    'synthetic': dict(K400, size='small', embed_dim=128, depth=4, num_heads=4, patch_size=8, num_frames=8,
                      input_size=64, short_side=64, sampling_rate=4, total_batch=16, batch_size=16, lr=1.6e-2,
                      min_lr=1e-5, epochs=50, warmup_epochs=2, layer_decay=0.75, drop_path=0.1, randaug=None,
                      random_erasing=0.0, mixup=0.0, cutmix=0.0, num_sample=1, test_clips=2, test_crops=1,
                      flip=False, crop='multiscale'),
}
# Supervised training from scratch (no --finetune), § B: "we follow the recipe in [21] and train from scratch
# for 100 epochs" (SSv2), "200 epochs" (K400). There is no pre-trained lower layer to protect, so no layer
# decay. The appendix gives no from-scratch epochs for UCF101/HMDB51: their fine-tuning epochs are kept.
SCRATCH = {'ssv2': dict(epochs=100, layer_decay=1.0), 'k400': dict(epochs=200, layer_decay=1.0),
           'ucf101': dict(layer_decay=1.0), 'hmdb51': dict(layer_decay=1.0), 'synthetic': dict(layer_decay=1.0)}
ARCH = ('embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'patch_size', 'tubelet_size')  # model shape flags


def recipe_row(dataset, size):
    """The table row; a custom 'list' dataset takes the K400 row (dense sampling, flip, 5 x 3 test)."""
    dataset = 'k400' if dataset == 'list' else dataset
    return RECIPES.get(f'{dataset}-{size}') or RECIPES[dataset]


# ----------------------------------------------------------------------------------------------------
# Command line. Every default is None: the recipe fills it (and --help shows the recipe's values).

def yes_no(text):
    if text.lower() in ('1', 'yes', 'true', 'on'):
        return True
    if text.lower() in ('0', 'no', 'false', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected yes or no, got {text!r}')


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r = lambda key, text: f'{text} ({utils.recipe_help(RECIPES, key)})'  # noqa: E731
    g = p.add_argument_group('what to run')
    g.add_argument('--dataset', choices=['synthetic', 'ucf101', 'hmdb51', 'k400', 'ssv2', 'list'],
                   help='dataset (default: synthetic, generated on first use)')
    g.add_argument('--data_path', help='dataset root as downloaded (see README); synthetic: generated cache')
    g.add_argument('--fold', type=int, default=1, help='UCF101/HMDB51 split (1-3)')
    g.add_argument('--size', choices=list(vmae.SIZES), help='model size (default: the --finetune checkpoint\'s, else base)')
    g.add_argument('--finetune', help='pre-training checkpoint to start from (ours or official); absent: from scratch')
    g.add_argument('--output_dir', help='default runs/finetune-<dataset>[-<size>][-scratch]')
    g.add_argument('--resume', default='auto', help="'auto' (latest checkpoint in --output_dir), a path, or '' (none)")
    g.add_argument('--eval', action='store_true', help='only run the test protocol on the resumed (or --finetune) weights')
    g.add_argument('--predict', nargs='+', metavar='FILE', help='print the top-5 classes of these videos and exit')
    g.add_argument('--compare', nargs=2, metavar=('A.csv', 'B.csv'), help='per-class CSVs: where does one model win?')
    g.add_argument('--margin', type=float, default=5.0, help='--compare: points of top-1 that count as a win')
    g = p.add_argument_group('optimisation (Table 10 / § B)')
    g.add_argument('--epochs', type=int, help=r('epochs', 'epochs') + '; from scratch: 100 SSv2, 200 K400 (§ B)')
    g.add_argument('--warmup_epochs', type=int, help=r('warmup_epochs', 'linear warm-up epochs'))
    g.add_argument('--lr', type=float, help=r('lr', 'base lr; actual lr = lr x total_batch / 256'))
    g.add_argument('--min_lr', type=float, help=r('min_lr', 'final cosine lr (scaled like --lr)'))
    g.add_argument('--weight_decay', type=float, help=r('weight_decay', 'AdamW weight decay'))
    g.add_argument('--betas', type=float, nargs=2, help=r('betas', 'AdamW betas'))
    g.add_argument('--layer_decay', type=float, help=r('layer_decay', 'layer-wise lr decay; 1 = off (from scratch)'))
    g.add_argument('--total_batch', type=int, help=r('total_batch', 'videos per optimizer step, all GPUs'))
    g.add_argument('--batch_size', type=int, help=r('batch_size', 'videos per GPU per forward; the rest is accumulation'))
    g = p.add_argument_group('regularisation and augmentation (Table 10)')
    g.add_argument('--drop_path', type=float, help=r('drop_path', 'stochastic depth, last block'))
    g.add_argument('--fc_drop', type=float, help=r('fc_drop', 'dropout before the head'))
    g.add_argument('--smoothing', type=float, help=r('smoothing', 'label smoothing'))
    g.add_argument('--mixup', type=float, help=r('mixup', 'mixup alpha (0 = off)'))
    g.add_argument('--cutmix', type=float, help=r('cutmix', 'cutmix alpha (0 = off)'))
    g.add_argument('--num_sample', type=int, help=r('num_sample', 'repeated augmentation: clips per decoded video'))
    g.add_argument('--crop', choices=['resized', 'multiscale'],
                   help=r('crop', 'training crop: RandomResizedCrop (area 8-100%%, aspect 3/4-4/3) or MultiScaleCrop'))
    g.add_argument('--flip', type=yes_no, help=r('flip', 'random horizontal flip (yes/no)'))
    g.add_argument('--randaug', type=float, nargs=2, metavar=('M', 'STD'),
                   help=r('randaug', 'RandAugment magnitude and its std; 0 0 = off'))
    g.add_argument('--random_erasing', type=float, help=r('random_erasing', 'random erasing probability'))
    g.add_argument('--init_scale', type=float, help=r('init_scale', 'head init scale'))
    g = p.add_argument_group('clips and test protocol (§ B)')
    g.add_argument('--sampling', choices=['dense', 'segment'], help=r('sampling', 'frame sampling'))
    g.add_argument('--sampling_rate', type=int, help=r('sampling_rate', 'dense sampling stride'))
    g.add_argument('--num_frames', type=int, help=r('num_frames', 'frames per clip'))
    g.add_argument('--input_size', type=int, help=r('input_size', 'crop size'))
    g.add_argument('--short_side', type=int, help=r('short_side', 'test: short side resized to this'))
    g.add_argument('--test_clips', type=int, help=r('test_clips', 'test clips per video'))
    g.add_argument('--test_crops', type=int, help=r('test_crops', 'test crops per clip'))
    g = p.add_argument_group('model shape (default: the checkpoint\'s, else --size)')
    for k, t in zip(ARCH, (int, int, int, float, int, int)):
        g.add_argument(f'--{k}', type=t, help=f'override the size\'s {k} ({utils.recipe_help(RECIPES, k)})')
    g = p.add_argument_group('machinery')
    g.add_argument('--device', default='auto', help='auto, cpu or cuda')
    g.add_argument('--precision', default='auto', help='auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16, fp16')
    g.add_argument('--num_workers', type=int, default=min(8, os.cpu_count() or 1), help='loader processes per GPU')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--val_freq', type=int, default=1, help='one-view validation every N epochs (0 = never)')
    g.add_argument('--save_freq', type=int, default=10, help='keep every N-th epoch checkpoint (the latest is always kept)')
    return p


def resolve(args):
    """flags > the resumed checkpoint's config > the --finetune checkpoint's model shape > the recipe."""
    def unset(config, keys):
        for k in keys:
            if getattr(args, k) is None and config.get(k) is not None:
                setattr(args, k, config[k])
    if args.resume not in ('auto', ''):            # resuming or evaluating: the run's own configuration
        unset(utils.checkpoint_meta(args.resume)['config'], [k for k in vars(args) if k != 'output_dir'])
        args.output_dir = args.output_dir or os.path.dirname(os.path.abspath(args.resume))
    if args.finetune:                              # ours: its size and shape (pre-training: model_kwargs); official: {}
        pre = utils.checkpoint_meta(args.finetune)['config']   # pretrain.py names the size 'model'
        unset({'size': pre.get('model'), **pre, **pre.get('model_kwargs', {})}, ('size',) + ARCH)
    args.dataset = args.dataset or 'synthetic'
    row = dict(recipe_row(args.dataset, args.size or 'base'))
    args.size = args.size or row.pop('size', 'base')
    row.pop('size', None)
    if not args.finetune:
        row.update(SCRATCH.get(args.dataset, SCRATCH['k400']))
    cfg = utils.resolve_config(args, row)
    if cfg['output_dir'] is None:
        size = '' if cfg['dataset'] == 'synthetic' else f"-{cfg['size']}"
        cfg['output_dir'] = f"runs/finetune-{cfg['dataset']}{size}{'' if cfg['finetune'] else '-scratch'}"
    found = utils.latest_checkpoint(cfg['output_dir']) if args.resume == 'auto' else None
    if found:                                      # --resume auto found one: resolve again with its config
        args.resume = found
        return resolve(args)
    cfg['randaug'] = tuple(cfg['randaug']) if cfg['randaug'] and cfg['randaug'][0] > 0 else None
    cfg['betas'] = tuple(cfg['betas'])
    return cfg


# ----------------------------------------------------------------------------------------------------
# Model and data.

def build_model(cfg, num_classes):
    shape = {k: cfg[k] for k in ARCH if cfg[k] is not None}
    return vmae.build_classifier(cfg['size'], num_classes, img_size=cfg['input_size'], num_frames=cfg['num_frames'],
                                 drop_path_rate=cfg['drop_path'], fc_drop_rate=cfg['fc_drop'],
                                 init_scale=cfg['init_scale'], **shape)


def make_dataset(cfg, samples, mode):
    """mode 'train': resized (or multiscale) crop + RandAug + flip + erasing, num_sample clips; 'val': one
    centre view; 'test': test_clips x test_crops views (§ B)."""
    return data.VideoDataset(
        samples, mode=mode, num_frames=cfg['num_frames'], sampling_rate=cfg['sampling_rate'],
        sampling=cfg['sampling'], input_size=cfg['input_size'], crop=cfg['crop'], flip=cfg['flip'],
        randaug=cfg['randaug'], random_erasing=cfg['random_erasing'], num_sample=cfg['num_sample'],
        test_clips=cfg['test_clips'], test_crops=cfg['test_crops'], short_side=cfg['short_side'], seed=cfg['seed'])


# ----------------------------------------------------------------------------------------------------
# Mixup / CutMix with label smoothing folded into the soft targets (official: timm Mixup, batch mode,
# switch prob 0.5). torchvision's v2.MixUp/CutMix pair sample i with i-1 (roll) and accept soft labels:
# soft = lam * smooth(y_i) + (1 - lam) * smooth(y_{i-1}). On a 5-D batch wrapped as tv_tensors.Video
# CutMix reads H, W from the last two dims and cuts [..., y1:y2, x1:x2]: the same box in every frame
# (tests/test_finetune_mixup.py checks it; the official code cut (T, H) before 2022-07).

def make_mixer(cfg):
    ops = [v2.MixUp(alpha=cfg['mixup'])] if cfg['mixup'] > 0 else []
    ops += [v2.CutMix(alpha=cfg['cutmix'])] if cfg['cutmix'] > 0 else []
    return v2.RandomChoice(ops) if len(ops) == 2 else (ops[0] if ops else None)


def mix_batch(video, labels, num_classes, smoothing, mixer):
    """video float (N, 3, T, H, W), labels (N,) -> (mixed video, soft targets (N, C) summing to one)."""
    soft = F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + smoothing / num_classes
    if mixer is None or len(labels) < 2:
        return video, soft
    video, soft = mixer(tv_tensors.Video(video), soft)
    return video.as_subclass(torch.Tensor), soft


def soft_cross_entropy(logits, soft):
    return torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


# ----------------------------------------------------------------------------------------------------
# Training.

def train(cfg, dd, model, train_set, val_set, classes, optimizer, scaler, autocast, start):
    """The loop: per-iteration cosine lr with warm-up, gradient accumulation to total_batch, checkpoints at
    every epoch end and on SIGTERM (then exit), optional one-view validation. log.jsonl gets pretrain.py's
    records: one per step (loss, lr, grad_norm, clips_per_s, step_s, data_wait_s), one per epoch."""
    log = utils.JsonlLog(os.path.join(cfg['output_dir'], 'log.jsonl'), dd.is_main)
    accum = utils.accumulation_steps(cfg['total_batch'], cfg['batch_size'], dd.world_size)
    loader = data.make_loader(train_set, cfg['batch_size'], train=True, num_workers=cfg['num_workers'], seed=cfg['seed'])
    steps = loader.sampler.num_samples // cfg['batch_size'] // accum   # optimizer steps per epoch
    if steps == 0:
        raise SystemExit(f"error: {len(train_set)} training videos make no step of --total_batch {cfg['total_batch']}")
    scale = cfg['total_batch'] / 256                                   # § B linear scaling (num_sample not in it)
    lr, min_lr, total, warmup = cfg['lr'] * scale, cfg['min_lr'] * scale, cfg['epochs'] * steps, cfg['warmup_epochs'] * steps
    net = DDP(model, device_ids=[dd.device.index] if dd.device.type == 'cuda' else None) if dd.world_size > 1 else model
    mixer, failures, preempt = make_mixer(cfg), data.FailureLog(), utils.Preemption()
    epoch, step0 = start
    for epoch in range(epoch, cfg['epochs']):
        loader.sampler.set_epoch(epoch, skip=step0 * accum * cfg['batch_size'])
        batches, model_loss = iter(loader), 0.0
        net.train()
        # repeated augmentation: every video of the total batch goes through the model num_sample times
        meter = utils.StepMeter(cfg['total_batch'] * cfg['num_sample'])
        bar = tqdm(range(step0, steps), desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=not dd.is_main,
                   dynamic_ncols=True)
        for step in bar:
            it = epoch * steps + step
            step_lr = utils.cosine_schedule(it, total, warmup, lr, min_lr)  # the head's; layer decay scales the rest
            utils.set_lr(optimizer, step_lr)
            meter.start_step()
            for micro in range(accum):
                batch = meter.next(batches)
                failures.update(batch['failed'])
                video = data.normalize(batch['video'].to(dd.device, non_blocking=True))  # (B, V, 3, T, H, W)
                # view-major (V*B): the mixing partner (i-1) is another video, never a repeat of the same one
                V = video.shape[1]
                video = video.transpose(0, 1).flatten(0, 1)
                labels = batch['label'].to(dd.device).repeat(V)
                video, soft = mix_batch(video, labels, len(classes), cfg['smoothing'], mixer)
                sync = micro == accum - 1 or dd.world_size == 1
                with (nullcontext() if sync else net.no_sync()), autocast():
                    loss = soft_cross_entropy(net(video), soft) / accum
                (scaler.scale(loss) if scaler else loss).backward()
                model_loss += loss.item()
            gnorm = utils.unscaled_grad_norm(optimizer, scaler)           # the whole model's (the recipe does not clip)
            model_loss = utils.all_reduce_mean(model_loss, dd.device)       # every rank stops together
            utils.check_finite(model_loss, it, cfg['output_dir'])           # before the step: no NaN in weights
            utils.optimizer_step(optimizer, scaler)                         # fp16: skips steps with inf grads
            speed = meter.end_step(model_loss)
            log.write(kind='step', epoch=epoch, step=step, it=it, loss=model_loss, lr=step_lr, grad_norm=gnorm, **speed)
            bar.set_postfix_str(f"loss {model_loss:.4f} lr {step_lr:.2e} {speed['clips_per_s']:.1f} clips/s",
                                refresh=False)
            model_loss = 0.0
            if preempt.should_stop(dd.device):
                save(cfg, dd, model, optimizer, scaler, classes, epoch, step + 1)
                print(f'{preempt.requested or "another rank"}: checkpoint saved at epoch {epoch} step {step + 1}; '
                      'the same command resumes', flush=True)
                raise SystemExit(0)                                          # pre-emption is a clean exit
        step0 = 0
        failures.end_epoch(meter.steps * accum * cfg['batch_size'])
        utils.log_epoch(meter, log, dd.is_main, epoch, step_lr, cfg['epochs'])
        if cfg['val_freq'] and ((epoch + 1) % cfg['val_freq'] == 0 or epoch + 1 == cfg['epochs']):
            metrics = run_eval(cfg, dd, model, val_set, classes, autocast, 'val')
            log.write(kind='val', epoch=epoch, val_top1=metrics['top1'], val_top5=metrics['top5'],
                      val_videos=metrics['videos'])
            if dd.is_main:
                print(f"epoch {epoch + 1}/{cfg['epochs']}: val (1 view) top-1 {metrics['top1']:.2f} "
                      f"top-5 {metrics['top5']:.2f}")
        save(cfg, dd, model, optimizer, scaler, classes, epoch + 1, 0)


def save(cfg, dd, model, optimizer, scaler, classes, epoch, step_in_epoch):
    """Atomic checkpoint; the previous epoch's is removed unless it is a --save_freq multiple."""
    state = utils.training_state('finetune', model, cfg, epoch, step_in_epoch, optimizer, scaler, classes)
    if not dd.is_main:
        return
    previous = utils.latest_checkpoint(cfg['output_dir'])
    path = os.path.join(cfg['output_dir'], utils.checkpoint_name(epoch, step_in_epoch))
    utils.save_checkpoint(path, state)
    name = os.path.basename(previous or '')          # checkpoint-00040.pth or checkpoint-00040-000123.pth
    if previous and name < os.path.basename(path) and (len(name) > 20 or int(name[11:16]) % cfg['save_freq']):
        os.remove(previous)


# ----------------------------------------------------------------------------------------------------
# Evaluation: 'val' = one centre view per video (quick, during training); 'test' = the § B protocol.

def run_eval(cfg, dd, model, dataset, classes, autocast, title, save_prefix=None):
    """All views of every video of dataset, softmax-averaged per video; ranks split the videos."""
    loader = data.make_loader(dataset, cfg['batch_size'], train=False, num_workers=cfg['num_workers'], seed=cfg['seed'])
    loader.sampler.set_epoch(0)
    failures = data.FailureLog()
    model.eval()
    merger = utils.evaluate(lambda clips: model(data.normalize(clips)), loader, dd.device, autocast, failures,
                            max_clips=2 * cfg['batch_size'] * cfg['num_sample'], desc=title, progress=dd.is_main)
    failures.end_epoch(len(dataset))
    return utils.classification_report(merger, classes, save_prefix if dd.is_main else None, title)


def test(cfg, dd, model, classes, autocast):
    """The § B protocol on the test split -> output_dir/test-results.json, test-per-class.csv, log.jsonl."""
    samples, _ = data.load_split(cfg['dataset'], cfg['data_path'], 'test', fold=cfg['fold'])
    title = f"test ({cfg['test_clips']} clips x {cfg['test_crops']} crops)"
    metrics = run_eval(cfg, dd, model, make_dataset(cfg, samples, 'test'), classes, autocast, title,
                       os.path.join(cfg['output_dir'], 'test'))
    utils.JsonlLog(os.path.join(cfg['output_dir'], 'log.jsonl'), dd.is_main).write(
        **{f'test_{k}': v for k, v in metrics.items()})
    return metrics


def predict(cfg, dd, model, classes, files, autocast):
    """Top-5 classes of each file, the test protocol's views averaged."""
    dataset = make_dataset(cfg, [(f, 0) for f in files], 'test')
    loader = data.make_loader(dataset, 1, train=False, num_workers=0)
    loader.sampler.set_epoch(0)
    model.eval()
    failures = data.FailureLog()
    merger = utils.evaluate(lambda clips: model(data.normalize(clips)), loader, dd.device, autocast, failures,
                            max_clips=2 * cfg['batch_size'], desc='predict', progress=False)
    if failures.paths:                               # the dataset replaced it by another file: no answer for it
        raise SystemExit('error: cannot decode ' + ', '.join(sorted(set(failures.paths))))
    scores, _ = merger.gather()
    for f, s in zip(files, scores) if dd.is_main else ():
        top = s.topk(min(5, len(s)))
        print(f + ': ' + ', '.join(f'{classes[i]} {100 * p:.1f}%' for p, i in zip(top.values.tolist(), top.indices.tolist())))


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.compare:
        print(utils.compare_per_class(*args.compare, margin=args.margin))
        return
    for f in args.predict or ():
        if not os.path.isfile(f):
            raise SystemExit(f'error: --predict {f}: no such file')
    cfg = resolve(args)
    dd = utils.init_distributed(cfg['device'])
    utils.seed_everything(cfg['seed'] + dd.rank)
    os.makedirs(cfg['output_dir'], exist_ok=True)
    resume = utils.resolve_resume(cfg['resume'], cfg['output_dir'])
    meta = utils.checkpoint_meta(resume) if resume else {'classes': []}
    classes = meta['classes']
    if not classes or not (cfg['eval'] or cfg['predict']):
        train_samples, classes = data.load_split(cfg['dataset'], cfg['data_path'], 'train', fold=cfg['fold'])
    model = build_model(cfg, len(classes)).to(dd.device)
    autocast, scaler, precision = utils.amp_setup(dd.device, cfg['precision'])
    groups = utils.param_groups(model, cfg['weight_decay'], cfg['layer_decay'], depth=len(model.blocks))
    optimizer = utils.make_adamw(groups, cfg['lr'], cfg['betas'], dd.device)
    start = (0, 0)
    if resume:
        state = utils.resume_training(resume, 'finetune', model, optimizer, scaler, dd.rank)
        start = (state['epoch'], state['step_in_epoch'])
        print(f'resumed {resume}: epoch {start[0]} step {start[1]}') if dd.is_main else None
    elif cfg['finetune']:
        report = vmae.load_checkpoint(model, cfg['finetune'])
        if dd.is_main:
            print(f"loaded {cfg['finetune']} ({report['source']}): missing {len(report['missing'])} "
                  f"{report['missing'][:6]}, unexpected {len(report['unexpected'])} {report['unexpected'][:6]}")
            print('\n'.join(f'  {n}' for n in report['notes']))
    elif cfg['eval'] or cfg['predict']:
        raise SystemExit(f"error: --eval/--predict need weights: --resume CHECKPOINT (or a checkpoint in "
                         f"{cfg['output_dir']}) or --finetune FINE_TUNED.pth")
    if cfg['predict']:
        predict(cfg, dd, model, classes, cfg['predict'], autocast)
        return utils.cleanup_distributed()
    if dd.is_main:
        print(f'fine-tuning ({precision}, {dd.world_size} process(es), {len(classes)} classes, '
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters):\n" + utils.format_config(cfg))
        with open(os.path.join(cfg['output_dir'], 'config.json'), 'w') as f:
            json.dump(cfg, f, indent=1)
    if not cfg['eval'] and start[0] < cfg['epochs']:
        val_samples, _ = data.load_split(cfg['dataset'], cfg['data_path'], 'val', fold=cfg['fold'])
        train(cfg, dd, model, make_dataset(cfg, train_samples, 'train'), make_dataset(cfg, val_samples, 'val'),
              classes, optimizer, scaler, autocast, start)
    test(cfg, dd, model, classes, autocast)
    utils.cleanup_distributed()


if __name__ == '__main__':
    sys.exit(main())
