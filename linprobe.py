"""Linear probing of a frozen VideoMAE encoder (appendix Table 11): how linearly separable are its features?

One file, top to bottom: the recipe table (cited), argparse, setup, the training loop, evaluation, main().
The encoder never changes: requires_grad False, no optimizer state, torch.no_grad() around it, eval mode
(no drop path, no dropout). Its tokens are mean-pooled (forward_features(...).mean(1)), normalised by a
BatchNorm1d without affine parameters, and a single linear layer is trained with SGD.

  python linprobe.py --checkpoint runs/pretrain-synthetic/checkpoint-00100.pth   # synthetic data, CPU
  python linprobe.py --checkpoint runs/pretrain-synthetic/checkpoint-00100.pth --random_init
      # the baseline: the same encoder shape, random weights (also: no --checkpoint at all)
  torchrun --nproc_per_node=8 linprobe.py --dataset ssv2 --data_path /data/ssv2 --checkpoint vit_b_ssv2_pretrain.pth
  python linprobe.py --eval --resume runs/linprobe-ssv2/checkpoint-00100.pth     # the test protocol only

Evaluation and reporting are fine-tuning's (finetune.py): one centre view per video during training, the
§ B test protocol (clips x crops, softmax averaged per video) at the end, top-1/top-5 and a per-class CSV.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import model as vmae
import utils

# ----------------------------------------------------------------------------------------------------
# Recipes. Table 11 gives SSv2 only: SGD, momentum 0.9, base lr 0.1 (x total batch / 256, § B), weight
# decay 0, batch 1024, cosine decay, 10 warm-up epochs, 100 epochs, MultiScaleCrop. The other datasets
# extend that row unchanged; their clips and test protocol are fine-tuning's (§ B).

TABLE11 = dict(lr=0.1, momentum=0.9, weight_decay=0.0, total_batch=1024, warmup_epochs=10, epochs=100,
               min_lr=0.0, batch_size=64, num_frames=16, input_size=224, short_side=224)
RECIPES = {
    'ssv2': dict(TABLE11, sampling='segment', sampling_rate=2, test_clips=2, test_crops=3),     # Table 11; § B views
    'k400': dict(TABLE11, sampling='dense', sampling_rate=4, test_clips=5, test_crops=3),      # Table 11 extended
    'ucf101': dict(TABLE11, sampling='dense', sampling_rate=4, test_clips=5, test_crops=3),    # Table 11 extended
    'hmdb51': dict(TABLE11, sampling='dense', sampling_rate=2, test_clips=10, test_crops=3),   # Table 11 extended
    # Not in the paper: pretrain.py's tiny synthetic model on CPU in minutes. Table 11 except a batch
    # the 320 training videos can fill (lr scaled with it) and one test crop (the frames are square: three
    # crops along the long side would coincide). Table 11's 100 epochs are kept (1000 steps): the earlier
    # 5-epoch row gave the head 50 SGD steps at lr <= 0.0125, too few to move it off chance, so every
    # encoder, pre-trained or random, probed at chance (README, "Does pre-training help?").
    'synthetic': dict(TABLE11, size='small', embed_dim=128, depth=4, num_heads=4, patch_size=8, num_frames=8,
                      input_size=64, short_side=64, sampling='dense', sampling_rate=4, total_batch=32,
                      batch_size=32, test_clips=2, test_crops=1),
}
RECIPES['list'] = RECIPES['k400']                    # your own list file: the Kinetics row
ARCH = ('embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'patch_size', 'tubelet_size')


# ----------------------------------------------------------------------------------------------------
# Command line: defaults None, the recipe fills them; --help shows the recipe values.

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r = lambda key, text: f'{text} ({utils.recipe_help(RECIPES, key)})'  # noqa: E731
    p.add_argument('--dataset', choices=[k for k in RECIPES], help='dataset (default: synthetic)')
    p.add_argument('--data_path', help='dataset root as downloaded (see README); synthetic: generated cache')
    p.add_argument('--fold', type=int, default=1, help='UCF101/HMDB51 split (1-3)')
    p.add_argument('--checkpoint', '--finetune', dest='checkpoint',
                   help='encoder weights: a pre-training checkpoint, ours or official (absent: random encoder)')
    p.add_argument('--random_init', action='store_true',
                   help="baseline: keep --checkpoint's model shape but not its weights")
    p.add_argument('--size', choices=list(vmae.SIZES), help="model size (default: the checkpoint's, else base)")
    for k, t in zip(ARCH, (int, int, int, float, int, int)):
        p.add_argument(f'--{k}', type=t, help=f"override the size's {k} ({utils.recipe_help(RECIPES, k)})")
    p.add_argument('--output_dir', help='default runs/linprobe-<dataset>[-random]')
    p.add_argument('--resume', default='auto', help="'auto' (latest in --output_dir), a path, or '' (none)")
    p.add_argument('--eval', action='store_true', help='only the test protocol, on the resumed probe')
    p.add_argument('--epochs', type=int, help=r('epochs', 'epochs'))
    p.add_argument('--warmup_epochs', type=int, help=r('warmup_epochs', 'linear warm-up epochs'))
    p.add_argument('--lr', type=float, help=r('lr', 'base lr; actual = lr x total_batch / 256'))
    p.add_argument('--min_lr', type=float, help=r('min_lr', 'final cosine lr (scaled like --lr)'))
    p.add_argument('--momentum', type=float, help=r('momentum', 'SGD momentum'))
    p.add_argument('--weight_decay', type=float, help=r('weight_decay', 'weight decay of the linear layer'))
    p.add_argument('--total_batch', type=int, help=r('total_batch', 'videos per step, all GPUs'))
    p.add_argument('--batch_size', type=int, help=r('batch_size', 'videos per GPU per forward (rest: accumulation)'))
    p.add_argument('--sampling', choices=['dense', 'segment'], help=r('sampling', 'frame sampling'))
    p.add_argument('--sampling_rate', type=int, help=r('sampling_rate', 'dense sampling stride'))
    p.add_argument('--num_frames', type=int, help=r('num_frames', 'frames per clip'))
    p.add_argument('--input_size', type=int, help=r('input_size', 'crop size'))
    p.add_argument('--short_side', type=int, help=r('short_side', 'test: short side resized to this'))
    p.add_argument('--test_clips', type=int, help=r('test_clips', 'test clips per video'))
    p.add_argument('--test_crops', type=int, help=r('test_crops', 'test crops per clip'))
    p.add_argument('--device', default='auto', help='auto, cpu or cuda')
    p.add_argument('--precision', default='auto', help='auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16, fp16')
    p.add_argument('--num_workers', type=int, default=min(8, os.cpu_count() or 1), help='loader processes per GPU')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--val_freq', type=int, default=1, help='one-view validation every N epochs (0 = never)')
    return p


def resolve(args):
    """flags > the resumed probe's config > the encoder checkpoint's model shape > the recipe."""
    def fill(config, keys):
        for k in keys:
            if getattr(args, k, None) is None and config.get(k) is not None:
                setattr(args, k, config[k])
    if args.resume not in ('auto', ''):
        fill(utils.checkpoint_meta(args.resume)['config'], [k for k in vars(args) if k != 'output_dir'])
        args.output_dir = args.output_dir or os.path.dirname(os.path.abspath(args.resume))
    if args.checkpoint:                   # pretrain.py: 'model' (size) and 'model_kwargs'; official files: nothing
        enc = utils.checkpoint_meta(args.checkpoint)['config']
        fill({'size': enc.get('model'), **enc, **enc.get('model_kwargs', {})}, ('size',) + ARCH)
    args.dataset = args.dataset or 'synthetic'
    row = dict(RECIPES[args.dataset])
    args.size = args.size or row.get('size', 'base')
    row.pop('size', None)
    cfg = utils.resolve_config(args, row)
    baseline = cfg['random_init'] or not cfg['checkpoint']
    cfg['output_dir'] = cfg['output_dir'] or f"runs/linprobe-{cfg['dataset']}{'-random' if baseline else ''}"
    found = utils.latest_checkpoint(cfg['output_dir']) if args.resume == 'auto' else None
    if found:
        args.resume = found
        return resolve(args)
    return cfg


# ----------------------------------------------------------------------------------------------------
# The probe: frozen encoder -> mean over tokens -> BatchNorm1d(affine=False) -> Linear.

class LinearProbe(nn.Module):
    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)          # a build_classifier(..., num_classes=0) model
        self.bn = nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)    # as MAE's linear probe
        nn.init.zeros_(self.head.bias)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()                                   # always: frozen statistics, no drop path
        return self

    def forward(self, video):                                 # (B, 3, T, H, W) normalised -> (B, classes)
        with torch.no_grad():
            feats = self.encoder.forward_features(video).mean(1)   # (B, N, D) -> (B, D)
        return self.head(self.bn(feats.float()))


def build_probe(cfg, num_classes):
    shape = {k: cfg[k] for k in ARCH if cfg[k] is not None}
    encoder = vmae.build_classifier(cfg['size'], 0, img_size=cfg['input_size'], num_frames=cfg['num_frames'], **shape)
    if cfg['checkpoint'] and not cfg['random_init']:
        report = vmae.load_checkpoint(encoder, cfg['checkpoint'])
        print(f"encoder from {cfg['checkpoint']} ({report['source']}): {len(report['missing'])} missing "
              f"{report['missing'][:4]}, {len(report['unexpected'])} unused {report['unexpected'][:4]}")
    return LinearProbe(encoder, num_classes)


def clips(cfg, samples, mode):
    """train: MultiScaleCrop (Table 11), one clip per video, no flip; val: one centre view; test: § B views."""
    return data.VideoDataset(samples, mode=mode, num_frames=cfg['num_frames'], sampling_rate=cfg['sampling_rate'],
                             sampling=cfg['sampling'], input_size=cfg['input_size'], crop='multiscale',
                             test_clips=cfg['test_clips'], test_crops=cfg['test_crops'],
                             short_side=cfg['short_side'], seed=cfg['seed'])


# ----------------------------------------------------------------------------------------------------
# Training: only probe.head learns (probe.bn keeps running statistics). Per-iteration cosine lr with
# linear warm-up; checkpoints at epoch ends and on SIGTERM; exact resume. log.jsonl gets pretrain.py's
# records: one per step (loss, lr, grad_norm of the head, clips_per_s, step_s, data_wait_s), one per epoch.

def train_step(net, sgd, scaler, autocast, micro_batches, accum, device, it, output_dir):
    """One SGD step of the head over the `accum` micro-batches of a total batch (loader batches: video uint8
    (B, 1, 3, T, H, W), label (B,)) -> (loss averaged over ranks, the head's gradient norm).

    fp16 (scaler not None): the head's matmul runs in half precision, and the gradient of a cross entropy
    averaged over a big batch ((p - y) / 1024 per logit in Table 11) underflows to 0 there; so the loss is
    multiplied by the scaler's factor before backward, the head's fp32 gradients are divided by it again
    before the norm and the step, and a step whose gradients overflowed is skipped (the factor then shrinks)."""
    total = 0.0
    for batch in micro_batches:                             # DDP syncs each backward: the head is tiny
        x = data.normalize(batch['video'].to(device, non_blocking=True).flatten(0, 1))
        with autocast():
            loss = F.cross_entropy(net(x).float(), batch['label'].to(device)) / accum
        (scaler.scale(loss) if scaler else loss).backward()
        total += loss.item()
    gnorm = utils.unscaled_grad_norm(sgd, scaler)          # sgd holds the head only: the head's norm
    total = utils.all_reduce_mean(total, device)
    utils.check_finite(total, it, output_dir)              # before the step: no NaN reaches the head
    utils.optimizer_step(sgd, scaler)
    return total, gnorm


def fit(cfg, dd, probe, splits, classes, sgd, scaler, autocast, start):
    train_set, val_set = splits
    accum = utils.accumulation_steps(cfg['total_batch'], cfg['batch_size'], dd.world_size)
    loader = data.make_loader(train_set, cfg['batch_size'], train=True, num_workers=cfg['num_workers'], seed=cfg['seed'])
    per_epoch = loader.sampler.num_samples // (cfg['batch_size'] * accum)
    if per_epoch < 1:
        raise SystemExit(f"error: {len(train_set)} training videos make no step of --total_batch {cfg['total_batch']}")
    peak, floor = cfg['lr'] * cfg['total_batch'] / 256, cfg['min_lr'] * cfg['total_batch'] / 256
    net = DDP(probe, device_ids=[dd.device.index] if dd.device.type == 'cuda' else None) if dd.world_size > 1 else probe
    jsonl, failures, stop = utils.JsonlLog(os.path.join(cfg['output_dir'], 'log.jsonl'), dd.is_main), data.FailureLog(), utils.Preemption()
    first_epoch, first_step = start
    for epoch in range(first_epoch, cfg['epochs']):
        skip = first_step if epoch == first_epoch else 0
        loader.sampler.set_epoch(epoch, skip=skip * accum * cfg['batch_size'])
        stream = iter(loader)
        net.train()
        meter = utils.StepMeter(cfg['total_batch'])         # one clip per video
        bar = tqdm(range(skip, per_epoch), desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=not dd.is_main,
                   dynamic_ncols=True)
        for step in bar:
            n = epoch * per_epoch + step
            lr = utils.cosine_schedule(n, cfg['epochs'] * per_epoch, cfg['warmup_epochs'] * per_epoch, peak, floor)
            utils.set_lr(sgd, lr)
            meter.start_step()

            def micro_batches():                            # fetched one at a time: one batch in host memory
                for _ in range(accum):
                    batch = meter.next(stream)              # the time blocked on the loader is data wait
                    failures.update(batch['failed'])
                    yield batch
            total, gnorm = train_step(net, sgd, scaler, autocast, micro_batches(), accum, dd.device, n,
                                      cfg['output_dir'])
            speed = meter.end_step(total)
            jsonl.write(kind='step', epoch=epoch, step=step, it=n, loss=total, lr=lr, grad_norm=gnorm, **speed)
            bar.set_postfix_str(f"loss {total:.4f} lr {lr:.2e} {speed['clips_per_s']:.1f} clips/s", refresh=False)
            if stop.should_stop(dd.device):
                checkpoint(cfg, dd, probe, sgd, scaler, classes, epoch, step + 1)
                print(f'{stop.requested or "another rank"}: saved at epoch {epoch} step {step + 1}; the same command '
                      'resumes', flush=True)
                raise SystemExit(0)                                          # pre-emption is a clean exit
        failures.end_epoch(meter.steps * accum * cfg['batch_size'])
        utils.log_epoch(meter, jsonl, dd.is_main, epoch, lr, cfg['epochs'])
        if cfg['val_freq'] and ((epoch + 1) % cfg['val_freq'] == 0 or epoch + 1 == cfg['epochs']):
            top = score(cfg, dd, probe, val_set, classes, autocast, 'val')
            jsonl.write(kind='val', epoch=epoch, val_top1=top['top1'], val_top5=top['top5'])
        checkpoint(cfg, dd, probe, sgd, scaler, classes, epoch + 1, 0)


def checkpoint(cfg, dd, probe, sgd, scaler, classes, epoch, step_in_epoch):
    """The whole probe (encoder included: a probe checkpoint evaluates on its own) and the fp16 loss scale;
    only the latest is kept."""
    state = utils.training_state('linprobe', probe, cfg, epoch, step_in_epoch, sgd, scaler, classes)
    if dd.is_main:
        old = utils.latest_checkpoint(cfg['output_dir'])
        utils.save_checkpoint(os.path.join(cfg['output_dir'], utils.checkpoint_name(epoch, step_in_epoch)), state)
        if old and os.path.basename(old) != utils.checkpoint_name(epoch, step_in_epoch):
            os.remove(old)


# ----------------------------------------------------------------------------------------------------
# Evaluation: utils.evaluate over the views, utils.classification_report for the numbers.

def score(cfg, dd, probe, dataset, classes, autocast, title, save_prefix=None):
    loader = data.make_loader(dataset, cfg['batch_size'], train=False, num_workers=cfg['num_workers'])
    loader.sampler.set_epoch(0)
    unreadable = data.FailureLog()
    probe.eval()
    views = utils.evaluate(lambda v: probe(data.normalize(v)), loader, dd.device, autocast, unreadable,
                           max_clips=2 * cfg['batch_size'], desc=title, progress=dd.is_main)
    unreadable.end_epoch(len(dataset))
    return utils.classification_report(views, classes, save_prefix if dd.is_main else None, title)


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = resolve(build_parser().parse_args(argv))
    dd = utils.init_distributed(cfg['device'])
    utils.seed_everything(cfg['seed'] + dd.rank)
    os.makedirs(cfg['output_dir'], exist_ok=True)
    train_samples, classes = data.load_split(cfg['dataset'], cfg['data_path'], 'train', fold=cfg['fold'])
    probe = build_probe(cfg, len(classes)).to(dd.device)
    # fp16 (a GPU without bf16, or --precision fp16) comes with a loss scaler: train_step uses it, checkpoints keep it
    autocast, scaler, precision = utils.amp_setup(dd.device, cfg['precision'])
    # Only the linear layer is optimised: the encoder has no gradient and no optimizer state.
    sgd = torch.optim.SGD(probe.head.parameters(), lr=cfg['lr'], momentum=cfg['momentum'], weight_decay=cfg['weight_decay'])
    resume, start = utils.resolve_resume(cfg['resume'], cfg['output_dir']), (0, 0)
    if resume:
        state = utils.resume_training(resume, 'linprobe', probe, sgd, scaler, dd.rank)
        start = (state['epoch'], state['step_in_epoch'])
    elif cfg['eval']:
        raise SystemExit(f"error: --eval needs a trained probe: --resume CHECKPOINT or one in {cfg['output_dir']}")
    if dd.is_main:
        print(f"linear probing ({precision}, {dd.world_size} process(es), {len(classes)} classes, encoder "
              f"{'random' if cfg['random_init'] or not cfg['checkpoint'] else cfg['checkpoint']}"
              f"{f', resumed at epoch {start[0]} step {start[1]}' if resume else ''}):\n" + utils.format_config(cfg))
        with open(os.path.join(cfg['output_dir'], 'config.json'), 'w') as f:
            json.dump(cfg, f, indent=1)
    if not cfg['eval'] and start[0] < cfg['epochs']:
        val_samples, _ = data.load_split(cfg['dataset'], cfg['data_path'], 'val', fold=cfg['fold'])
        fit(cfg, dd, probe, (clips(cfg, train_samples, 'train'), clips(cfg, val_samples, 'val')), classes, sgd, scaler,
            autocast, start)
    test_samples, _ = data.load_split(cfg['dataset'], cfg['data_path'], 'test', fold=cfg['fold'])
    title = f"test ({cfg['test_clips']} clips x {cfg['test_crops']} crops)"
    top = score(cfg, dd, probe, clips(cfg, test_samples, 'test'), classes, autocast, title, os.path.join(cfg['output_dir'], 'test'))
    utils.JsonlLog(os.path.join(cfg['output_dir'], 'log.jsonl'), dd.is_main).write(**{f'test_{k}': v for k, v in top.items()})
    utils.cleanup_distributed()


if __name__ == '__main__':
    sys.exit(main())
