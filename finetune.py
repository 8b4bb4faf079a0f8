"""End-to-end fine-tuning of a VideoMAE encoder for action classification (Table 10 and § B).

    python finetune.py --finetune runs/pretrain-synthetic/checkpoint-00090.pth  # synthetic, CPU
    python finetune.py                         # no --finetune: the supervised from-scratch baseline
    torchrun --nproc_per_node=8 finetune.py --dataset ssv2 --data_path /data/ssv2 --model base \\
        --finetune videomae_base_ssv2_pretrain.pth                            # Table 10, SSv2
    python finetune.py --eval --resume runs/finetune-ssv2-base/checkpoint-00040.pth   # test only
    python finetune.py --predict a.mp4 b.webm --resume runs/finetune-ssv2-base/checkpoint-00040.pth
    python finetune.py --compare runs/A/test-per-class.csv runs/B/test-per-class.csv --margin 10

Read top to bottom: recipes, flags, mixup, the loop, evaluation (one view per video during
training, the § B multi-view protocol at the end), prediction, main(). Flags left unset take, in
order: the resumed checkpoint's config, the --finetune checkpoint's model shape, the recipe row.
"""
import argparse
import csv
import math
import os

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

import checkpoints
import data
import model as vmae
import utils

# Table 10 (SSv2, K400) and § B (UCF101, HMDB51). lr is the BASE lr (x total batch / 256, § B).
# Values the appendix does not give come from the official release (commented).
TABLE10 = dict(
    weight_decay=0.05, opt_betas=[0.9, 0.999], total_batch=512, warmup_epochs=5,  # Table 10
    num_sample=2, randaug=[9, 0.5], smoothing=0.1, mixup=0.8, cutmix=1.0,        # (repeated aug 2)
    min_lr=1e-6, random_erasing=0.25, init_scale=0.001, crop='resized',          # official defaults
    num_frames=16, input_size=224, short_side=224, batch_size=8, num_workers=10, save_ckpt_freq=10)
SSV2 = dict(TABLE10, flip=False, sampling='segment', sampling_rate=2,       # TSN segments, no flip
            test_clips=2, test_crops=3, fc_drop=0.0)                        # 2 x 3 views (§ B)
K400 = dict(TABLE10, flip=True, sampling='dense', sampling_rate=4,          # dense (§ B), flip
            test_clips=5, test_crops=3, lr=1e-3, fc_drop=0.0)               # 5 x 3; lr all sizes
UCF101 = dict(K400, total_batch=128, epochs=100, lr=5e-4, layer_decay=0.7,  # § B; fc_drop 0.5:
              drop_path=0.2, fc_drop=0.5)                                   # official script
HMDB51 = dict(K400, total_batch=128, epochs=50, lr=1e-3, layer_decay=0.7,   # § B, stride 2 as
              drop_path=0.2, sampling_rate=2, test_clips=10)                # its pre-training
RECIPES = {
    'ssv2-small': dict(SSV2, lr=1e-3, epochs=40, drop_path=0.1, layer_decay=0.7),              # T10
    'ssv2-base': dict(SSV2, lr=5e-4, epochs=40, drop_path=0.1, layer_decay=0.75),              # T10
    'ssv2-large': dict(SSV2, lr=5e-4, epochs=30, drop_path=0.2, layer_decay=0.75, fc_drop=0.5),
    # Table 10 has no huge model on SSv2: the large row, extended.
    'ssv2-huge': dict(SSV2, lr=5e-4, epochs=30, drop_path=0.2, layer_decay=0.75, fc_drop=0.5),
    'k400-small': dict(K400, epochs=150, drop_path=0.1, layer_decay=0.7),                      # T10
    'k400-base': dict(K400, epochs=75, drop_path=0.1, layer_decay=0.75),                       # T10
    'k400-large': dict(K400, epochs=50, drop_path=0.2, layer_decay=0.75, fc_drop=0.5),         # T10
    'k400-huge': dict(K400, epochs=50, drop_path=0.2, layer_decay=0.75, fc_drop=0.5),          # T10
    'ucf101': UCF101,                       # § B gives one row (ViT-B); every size uses it
    'hmdb51': HMDB51,
    # Not in the paper: pretrain.py's tiny synthetic model, on a laptop CPU in minutes. The K400
    # column except: no RandAugment, erasing, mixup or cutmix and one clip per video (they pay off
    # over long schedules, not 500 steps); a 32x higher base lr (peak 2e-3) and 2 warm-up epochs
    # for 25 epochs: a pre-trained encoder scores as after 50 at half that lr; one test crop
    # (square frames: three crops would coincide); no flip (it swaps MoveLeft and MoveRight: half
    # the clips would carry the opposite label); MultiScaleCrop, since
    # RandomResizedCrop's 8% area often cuts the motion out of a 64x64 frame.
    'synthetic': dict(K400, model='small', embed_dim=128, depth=4, num_heads=4, patch_size=8,
                      num_frames=8, input_size=64, short_side=64, sampling_rate=4, total_batch=16,
                      batch_size=16, lr=3.2e-2, min_lr=1e-5, epochs=25, warmup_epochs=2,
                      layer_decay=0.75, drop_path=0.1, randaug=[0, 0], random_erasing=0.0,
                      mixup=0.0, cutmix=0.0, num_sample=1, test_clips=2, test_crops=1, flip=False,
                      crop='multiscale', num_workers=2),
}
# From scratch (no --finetune), § B: "we follow the recipe in [21] and train from scratch for 100
# epochs" (SSv2), 200 (K400); no pre-trained lower layers to protect, so no layer decay.
SCRATCH = {'ssv2': dict(epochs=100), 'k400': dict(epochs=200)}


def recipe(cfg):
    """The row of --dataset and --model; your own list file or class folders take the K400 row."""
    dataset = 'k400' if cfg['dataset'] in ('list', 'folder') else cfg['dataset']
    size = cfg['model'] or RECIPES.get(dataset, {}).get('model', 'base')
    row = dict(RECIPES.get(f'{dataset}-{size}') or RECIPES[dataset], model=size)
    return row if cfg['finetune'] else dict(row, **SCRATCH.get(dataset, {}), layer_decay=1.0)


def build_parser():
    def r(key, text):
        return f'{text} ({utils.recipe_help(RECIPES, key)})'
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_data_flags(p, RECIPES, 'synthetic ucf101 hmdb51 k400 ssv2 list folder'.split())
    g = utils.add_shape_flags(p, RECIPES)
    g.add_argument('--finetune',
                   help='weights to start from: a pre-training checkpoint (ours or official); '
                        'absent: from scratch, 100 epochs on SSv2, 200 on K400 (§ B), '
                        'no layer decay')
    g.add_argument('--drop_path', type=float, help=r('drop_path', 'stochastic depth, last block'))
    g.add_argument('--fc_drop', type=float, help=r('fc_drop', 'dropout before the head'))
    g.add_argument('--init_scale', type=float, help=r('init_scale', 'head init scale'))
    utils.add_common_flags(p, RECIPES)
    g = p.add_argument_group('fine-tuning recipe (Table 10, § B)')
    g.add_argument('--smoothing', type=float, help=r('smoothing', 'label smoothing'))
    g.add_argument('--mixup', type=float, help=r('mixup', 'mixup alpha (0 = off)'))
    g.add_argument('--cutmix', type=float, help=r('cutmix', 'cutmix alpha (0 = off)'))
    g.add_argument('--num_sample', type=int,
                   help=r('num_sample', 'repeated augmentation: clips per decoded video'))
    g.add_argument('--crop', choices=['resized', 'multiscale'],
                   help=r('crop', 'RandomResizedCrop (area 8-100%%, aspect 3/4-4/3) '
                                  'or MultiScaleCrop'))
    g.add_argument('--flip', action=argparse.BooleanOptionalAction, help=r('flip', 'random flip'))
    g.add_argument('--randaug', type=float, nargs=2, metavar=('M', 'STD'),
                   help=r('randaug', 'RandAugment magnitude and its std; 0 0 = off'))
    g.add_argument('--random_erasing', type=float, help=r('random_erasing', 'erasing probability'))
    g.add_argument('--sampling', choices=['dense', 'segment'], help=r('sampling', 'frame sampling'))
    g.add_argument('--short_side', type=int, help=r('short_side', 'test: short side resized to'))
    g.add_argument('--test_clips', type=int, help=r('test_clips', 'test clips per video'))
    g.add_argument('--test_crops', type=int, help=r('test_crops', 'test crops per clip'))
    g = p.add_argument_group('what to run')
    g.add_argument('--val_freq', type=int, default=1,
                   help='one-view validation every N epochs (0: never)')
    g.add_argument('--save_freq', dest='save_ckpt_freq', type=int, help=argparse.SUPPRESS)
    g.add_argument('--eval', action='store_true',
                   help='only the test protocol, on --resume or --finetune')
    g.add_argument('--predict', nargs='+', metavar='FILE',
                   help='print the top-5 classes of these videos')
    g.add_argument('--export_hf', metavar='DIR', help='write the --resume checkpoint as a '
                   'transformers VideoMAEForVideoClassification folder, then exit')
    g.add_argument('--compare', nargs=2, metavar=('A.csv', 'B.csv'),
                   help='two per-class CSVs: where does one model win? (--margin points)')
    g.add_argument('--margin', type=float, default=5.0,
                   help='--compare: top-1 points that count as a win')
    return p


def resolve(argv=None):
    def output(c):
        size = '' if c['dataset'] == 'synthetic' else f"-{c['model']}"
        return f"finetune-{c['dataset']}{size}{'' if c['finetune'] else '-scratch'}"
    cfg = utils.resolve(build_parser(), argv, recipe, output, init_flag='finetune')
    utils.check_clip_flags(cfg)
    return cfg


def build_model(cfg, num_classes):
    return vmae.build_classifier(cfg['model'], num_classes, **utils.shape(cfg),
                                 init_scale=cfg['init_scale'], drop_path_rate=cfg['drop_path'],
                                 fc_drop_rate=cfg['fc_drop'])


def make_dataset(cfg, samples, mode):
    """'train': the recipe's crop, RandAugment, flip, erasing, num_sample clips per decode; 'val':
    one centre view; 'test': test_clips x test_crops views (§ B)."""
    return data.VideoDataset(
        samples, mode=mode, num_frames=cfg['num_frames'], sampling_rate=cfg['sampling_rate'],
        sampling=cfg['sampling'], input_size=cfg['input_size'], crop=cfg['crop'], flip=cfg['flip'],
        randaug=cfg['randaug'] if cfg['randaug'][0] > 0 else None,
        random_erasing=cfg['random_erasing'], num_sample=cfg['num_sample'],
        test_clips=cfg['test_clips'], test_crops=cfg['test_crops'], short_side=cfg['short_side'],
        seed=cfg['seed'])


# --------------------------------------------------------------------------------------------------
# Mixup / CutMix with label smoothing folded into the soft targets (official: timm's Mixup, batch
# mode, switch prob 0.5). torchvision's v2.MixUp/CutMix pair sample i with i-1 and take soft labels:
# soft = lam * smooth(y_i) + (1 - lam) * smooth(y_{i-1}). On a 5-D tv_tensors.Video CutMix cuts the
# same [..., y1:y2, x1:x2] box out of every frame.

def make_mixer(cfg):
    ops = [v2.MixUp(alpha=cfg['mixup'])] if cfg['mixup'] > 0 else []
    ops += [v2.CutMix(alpha=cfg['cutmix'])] if cfg['cutmix'] > 0 else []
    return v2.RandomChoice(ops) if len(ops) == 2 else (ops[0] if ops else None)


def mix_batch(video, labels, num_classes, smoothing, mixer):
    """video float (N, 3, T, H, W), labels (N,) -> (mixed video, soft targets (N, C)
    summing to 1)."""
    soft = F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + smoothing / num_classes
    if mixer is None or len(labels) < 2:
        return video, soft
    video, soft = mixer(tv_tensors.Video(video), soft)
    return video.as_subclass(torch.Tensor), soft


# --------------------------------------------------------------------------------------------------
# The loop.

def train(cfg, d, model, optimizer, train_set, val_set, classes):
    loader = data.make_loader(train_set, cfg['batch_size'], train=True,
                              num_workers=cfg['num_workers'], seed=cfg['seed'])
    run = utils.start(cfg, 'finetune', d, model, optimizer, loader, classes,
                      data.FailureLog(cfg['max_failed_ratio']), clips_per_video=cfg['num_sample'])
    mixer = make_mixer(cfg)

    def loss_of(batch, micro):
        video = data.normalize(batch['video'].to(d.device, non_blocking=True))  # (B, V, 3, T, H, W)
        # view-major (V*B): the mixing partner i-1 is another video, never a view of the same one
        V = video.shape[1]
        video, labels = video.transpose(0, 1).flatten(0, 1), batch['label'].to(d.device).repeat(V)
        video, soft = mix_batch(video, labels, len(classes), cfg['smoothing'], mixer)
        return torch.sum(-soft * F.log_softmax(run.net(video).float(), dim=-1), dim=-1).mean()

    for epoch in range(run.start_epoch, cfg['epochs']):
        for _ in utils.steps(run, epoch):
            utils.train_step(run, loss_of)
        m = evaluate(cfg, d, model, val_set, classes, run.autocast) if due(cfg, epoch) else {}
        utils.end_epoch(run, epoch, **{f'val_{k}': v for k, v in m.items()})
    run.bar.close()
    return run.autocast


def due(cfg, epoch):
    """One-view validation after this epoch? Every --val_freq epochs and after the last."""
    return cfg['val_freq'] and ((epoch + 1) % cfg['val_freq'] == 0 or epoch + 1 == cfg['epochs'])


def evaluate(cfg, d, model, dataset, classes, autocast, title='val (1 view)', prefix=None):
    """All views of every video, softmax-averaged per video; the ranks split the videos."""
    loader = data.make_loader(dataset, cfg['batch_size'], train=False,
                              num_workers=cfg['num_workers'])
    model.eval()
    return utils.evaluate(lambda clips: model(data.normalize(clips)), loader, d, autocast,
                          data.FailureLog(cfg['max_failed_ratio']), classes, title, prefix,
                          2 * cfg['batch_size'] * cfg.get('num_sample', 1))


def test(cfg, d, model, classes, autocast, dataset_fn):
    """The § B protocol on the test split -> output_dir/test-results.json, test-per-class.csv."""
    samples, _ = data.load_split(cfg['dataset'], cfg['data_path'], 'test', cfg['fold'])
    title = f"test ({cfg['test_clips']} clips x {cfg['test_crops']} crops)"
    m = evaluate(cfg, d, model, dataset_fn(cfg, samples, 'test'), classes, autocast, title,
                 os.path.join(cfg['output_dir'], 'test'))
    utils.log_result(cfg, d.is_main, 'test', **{f'test_{k}': v for k, v in m.items()})
    utils.cleanup_distributed()


def predict(cfg, d, model, classes, autocast):
    """The top-5 classes of each --predict file, the test protocol's views averaged."""
    model.eval()
    for f in cfg['predict']:
        try:
            views = make_dataset(cfg, [(f, 0)], 'test')[0]['video']       # (V, 3, T, S, S) uint8
        except (RuntimeError, data.DataError):   # every try of the dataset failed to decode
            raise SystemExit(f'error: --predict {f}: not a video PyAV can decode') from None
        with torch.no_grad(), autocast():
            probs = model(data.normalize(views.to(d.device))).float().softmax(-1).mean(0)
        p, i = probs.topk(min(5, len(probs)))
        print(f + ': ' + ', '.join(f'{classes[c]} {100 * q:.1f}%'
                                   for q, c in zip(p.tolist(), i.tolist())))


def compare_per_class(csv_a, csv_b, margin=5.0):
    """--compare: classes where A beats B (and B beats A) by more than margin points (appendix
    Figs. 7, 8), from two test-per-class.csv files."""
    def read(p):
        with open(p, newline='') as f:
            return {r['class']: float(r['top1']) for r in csv.DictReader(f)}
    a, b = read(csv_a), read(csv_b)
    common = [c for c in a if c in b and not (math.isnan(a[c]) or math.isnan(b[c]))]
    lines = [f'{len(common)} classes in both; margin {margin} points']
    for name, x, y in ((csv_a, a, b), (csv_b, b, a)):
        wins = sorted(((x[c] - y[c], c) for c in common if x[c] - y[c] > margin), reverse=True)
        lines.append(f'{"A" if x is a else "B"} ({name}) better on {len(wins)}:')
        lines += [f'  {c:<40} +{d:5.1f}  ({x[c]:.1f} vs {y[c]:.1f})' for d, c in wins]
    return '\n'.join(lines)


def main(argv=None):
    cfg = resolve(argv)
    if cfg['compare']:
        return print(compare_per_class(*cfg['compare'], margin=cfg['margin']))
    for f in cfg['predict'] or ():
        if not os.path.isfile(f):
            raise SystemExit(f'error: --predict {f}: no such file')
    d = utils.init_distributed(cfg['device'])
    utils.seed_everything(cfg['seed'] + d.rank)
    resume = cfg['resume'] if cfg['resume'] not in ('auto', '') else None
    only_test = cfg['eval'] or cfg['predict'] or cfg['export_hf']
    classes = utils.checkpoint_meta(resume)['classes'] if resume else []
    if not (classes and only_test):
        train_samples, classes = data.load_split(cfg['dataset'], cfg['data_path'], 'train',
                                                 cfg['fold'])
    model = build_model(cfg, len(classes)).to(d.device)
    if resume and only_test:                     # ours, official or a transformers folder
        checkpoints.load_weights(model, resume, '--resume', d.is_main)
    elif cfg['finetune'] and not resume:
        checkpoints.load_weights(model, cfg['finetune'], '--finetune', d.is_main)
    elif only_test and not resume:
        raise SystemExit('error: --eval, --predict and --export_hf need weights: --resume CKPT '
                         f"(or a checkpoint in {cfg['output_dir']}) or --finetune FINE_TUNED.pth")
    if cfg['export_hf']:
        return print('transformers folder:',
                     checkpoints.export_hf(model, cfg['export_hf'], classes))
    autocast = utils.amp_setup(d.device, cfg['precision'])[0]
    if cfg['predict']:
        return predict(cfg, d, model, classes, autocast)
    lock = utils.lock_output_dir(cfg['output_dir']) if d.is_main and cfg['eval'] else None
    if not cfg['eval']:
        groups = utils.param_groups(model, cfg['weight_decay'], cfg['layer_decay'],
                                    len(model.blocks))
        optimizer = utils.make_adamw(groups, cfg['lr'], cfg['opt_betas'], d.device)
        val_samples, _ = data.load_split(cfg['dataset'], cfg['data_path'], 'val', cfg['fold'])
        autocast = train(cfg, d, model, optimizer, make_dataset(cfg, train_samples, 'train'),
                         make_dataset(cfg, val_samples, 'val'), classes)
    test(cfg, d, model, classes, autocast, make_dataset)
    del lock


if __name__ == '__main__':
    utils.main(main)
