"""Linear probing of a frozen VideoMAE encoder (appendix Table 11): how linearly separable are its
features?

    python linprobe.py --finetune runs/pretrain-synthetic/checkpoint-00090.pth    # synthetic, CPU
    python linprobe.py --finetune runs/pretrain-synthetic/checkpoint-00090.pth --random_init
        # the baseline: the same encoder shape, random weights (also: no --finetune at all)
    torchrun --nproc_per_node=8 linprobe.py --dataset ssv2 --data_path /data/ssv2 \\
        --finetune vit_b.pth
    python linprobe.py --eval --resume runs/linprobe-ssv2/checkpoint-00100.pth     # test only

The encoder never changes: no gradient, no optimiser state, eval mode (no drop path). Its tokens
are mean-pooled, normalised by a BatchNorm1d without affine parameters, and one linear layer is
trained with SGD. Evaluation is fine-tuning's: one view per video during training, the § B protocol
at the end.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import data
import finetune
import model as vmae
import utils

# Table 11 gives SSv2 only: SGD, momentum 0.9, base lr 0.1 (x total batch / 256, § B), weight
# decay 0, batch 1024, cosine, 10 warm-up epochs, 100 epochs, MultiScaleCrop. The other datasets
# extend that row unchanged, with fine-tuning's clips and test views (§ B).
TABLE11 = dict(lr=0.1, momentum=0.9, weight_decay=0.0, total_batch=1024, warmup_epochs=10,
               epochs=100, min_lr=0.0, batch_size=64, num_frames=16, input_size=224,
               short_side=224, num_workers=10, save_ckpt_freq=100, sampling='dense',
               sampling_rate=4, test_clips=5, test_crops=3)
RECIPES = {
    'ssv2': dict(TABLE11, sampling='segment', sampling_rate=2, test_clips=2),  # Table 11; § B views
    'k400': TABLE11,                                                           # Table 11 extended
    'ucf101': TABLE11,
    'hmdb51': dict(TABLE11, sampling_rate=2, test_clips=10),
    'list': TABLE11,
    'folder': TABLE11,
    # Not in the paper: pretrain.py's tiny synthetic model on CPU. Table 11 except a batch the 320
    # training videos can fill, one test crop (square frames) and 20 epochs at an 8x base lr (peak
    # 0.1, warm-up 2): the head reads BatchNorm'd features, so the larger step is stable, and the
    # probe scores what 100 epochs at Table 11's lr did, in a fifth of the time.
    'synthetic': dict(TABLE11, model='small', embed_dim=128, depth=4, num_heads=4, patch_size=8,
                      num_frames=8, input_size=64, short_side=64, total_batch=32, batch_size=32,
                      lr=0.8, epochs=20, warmup_epochs=2, test_clips=2, test_crops=1,
                      num_workers=2),
}


def build_parser():
    def r(key, text):
        return f'{text} ({utils.recipe_help(RECIPES, key)})'
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_data_flags(p, RECIPES)
    g = utils.add_shape_flags(p, RECIPES)
    g.add_argument('--finetune', '--checkpoint',
                   help='encoder weights: a pre-training checkpoint, ours '
                        'or official (absent: a random encoder)')
    g.add_argument('--random_init', action='store_true',
                   help="baseline: --finetune's shape, not its weights")
    utils.add_common_flags(p, RECIPES)
    g = p.add_argument_group('probe (Table 11)')
    g.add_argument('--sampling', choices=['dense', 'segment'], help=r('sampling', 'frame sampling'))
    g.add_argument('--short_side', type=int, help=r('short_side', 'test: short side resized to'))
    g.add_argument('--test_clips', type=int, help=r('test_clips', 'test clips per video'))
    g.add_argument('--test_crops', type=int, help=r('test_crops', 'test crops per clip'))
    g.add_argument('--val_freq', type=int, default=1,
                   help='one-view validation every N epochs (0: never)')
    g.add_argument('--eval', action='store_true',
                   help='only the test protocol, on the resumed probe')
    return p


def resolve(argv=None):
    def output(c):
        return (f"linprobe-{c['dataset']}"
                f"{'-random' if c['random_init'] or not c['finetune'] else ''}")
    cfg = utils.resolve(build_parser(), argv,
                        lambda c: dict(RECIPES[c['dataset']], model=c['model'] or
                                       RECIPES[c['dataset']].get('model', 'base')),
                        output, init_flag='finetune')
    utils.check_clip_flags(cfg)
    return cfg


class LinearProbe(nn.Module):
    """Frozen encoder -> mean over tokens -> BatchNorm1d(affine=False) -> Linear."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)          # build_classifier(..., num_classes=0)
        self.bn = nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)    # as MAE's linear probe
        nn.init.zeros_(self.head.bias)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()                                   # always: no drop path, frozen
        return self

    def forward(self, video):                                 # (B, 3, T, H, W) -> (B, classes)
        with torch.no_grad():
            feats = self.encoder.forward_features(video).mean(1)   # (B, N, D) -> (B, D)
        return self.head(self.bn(feats.float()))


def build_probe(cfg, num_classes):
    encoder = vmae.build_classifier(cfg['model'], 0, **utils.shape(cfg))
    if cfg['finetune'] and not cfg['random_init']:
        checkpoints.load_weights(encoder, cfg['finetune'], '--finetune')
    return LinearProbe(encoder, num_classes)


def make_dataset(cfg, samples, mode):
    """train: MultiScaleCrop (Table 11), one clip per video, no flip; val: one centre view;
    test: § B."""
    return data.VideoDataset(samples, mode=mode, num_frames=cfg['num_frames'], crop='multiscale',
                             sampling_rate=cfg['sampling_rate'], sampling=cfg['sampling'],
                             input_size=cfg['input_size'], test_clips=cfg['test_clips'],
                             test_crops=cfg['test_crops'], short_side=cfg['short_side'],
                             seed=cfg['seed'])


def main(argv=None):
    cfg = resolve(argv)
    d = utils.init_distributed(cfg['device'])
    utils.seed_everything(cfg['seed'] + d.rank)
    train_samples, classes = data.load_split(cfg['dataset'], cfg['data_path'], 'train', cfg['fold'])
    probe = build_probe(cfg, len(classes)).to(d.device)
    # only the linear layer learns: the encoder has no gradient and no optimiser state
    sgd = torch.optim.SGD(probe.head.parameters(), lr=cfg['lr'], momentum=cfg['momentum'],
                          weight_decay=cfg['weight_decay'])
    autocast = utils.amp_setup(d.device, cfg['precision'])[0]
    resume = cfg['resume'] not in ('auto', '')
    if cfg['eval']:
        if not resume:
            raise SystemExit(f"error: --eval needs a trained probe: --resume CHECKPOINT or one in "
                             f"{cfg['output_dir']}")
        probe.load_state_dict(utils.load_state(cfg['resume'])['model'])
        lock = utils.lock_output_dir(cfg['output_dir']) if d.is_main else None
    else:
        val_samples, _ = data.load_split(cfg['dataset'], cfg['data_path'], 'val', cfg['fold'])
        loader = data.make_loader(make_dataset(cfg, train_samples, 'train'), cfg['batch_size'],
                                  train=True, num_workers=cfg['num_workers'], seed=cfg['seed'])
        run = utils.start(cfg, 'linprobe', d, probe, sgd, loader, classes,
                          data.FailureLog(cfg['max_failed_ratio']))
        autocast, lock, val_set = run.autocast, run.lock, make_dataset(cfg, val_samples, 'val')

        def loss_of(batch, micro):
            video = data.normalize(batch['video'].to(d.device, non_blocking=True).flatten(0, 1))
            return F.cross_entropy(run.net(video).float(), batch['label'].to(d.device))

        for epoch in range(run.start_epoch, cfg['epochs']):
            for _ in utils.steps(run, epoch):
                utils.train_step(run, loss_of)
            m = (finetune.evaluate(cfg, d, probe, val_set, classes, autocast)
                 if finetune.due(cfg, epoch) else {})
            utils.end_epoch(run, epoch, **{f'val_{k}': v for k, v in m.items()})
        run.bar.close()
    finetune.test(cfg, d, probe, classes, autocast, make_dataset)
    del lock


if __name__ == '__main__':
    utils.main(main)
