"""VideoMAE pre-training: hide ~90% of a clip's space-time cubes, reconstruct their pixels.

    python pretrain.py                                         # tiny ViT, synthetic videos, CPU
    python pretrain.py --dataset ucf101 --data_path /data/ucf101              # § B, UCF101
    torchrun --nproc_per_node=8 pretrain.py --dataset k400 --data_path /data/k400 --model base

One step (train(), loss_of): uint8 clips (B, 3, T, H, W) -> device -> ImageNet-normalised -> a tube
mask (B, N), True = hidden -> model(video, mask) -> predictions of the hidden cubes
(B, N_masked, 3*t*p*p) -> MSE against their per-cube-normalised pixels -> AdamW.
Read top to bottom: recipes (appendix Table 9, § B), flags, the loop, the pictures (Figures 10, 11).
The run plumbing (accumulation, DDP, checkpoints, resume, logs) is utils.py's.
"""
import argparse
import os

import torch
import torchvision

import checkpoints
import data
import masking
import model as videomae
import utils

# Table 9 (SSv2, K400): AdamW, base lr 1.5e-4 (x total batch / 256), weight decay 0.05, betas (0.9,
# 0.95), batch 1024, cosine, 40 warm-up epochs, MultiScaleCrop, 800 epochs (§ B). Tube ratio 0.9, 16
# frames. From the official scripts: min lr 1e-5, a checkpoint every 20 epochs, 32 clips per GPU.
# The scripts' own total batch 2048 and 801 epochs are a flag away
# (--total_batch 2048 --epochs 801).
TABLE9 = dict(model='base', mask_type='tube', mask_ratio=0.9, normalize_target=True, num_frames=16,
              input_size=224, lr=1.5e-4, min_lr=1e-5, weight_decay=0.05, opt_betas=[0.9, 0.95],
              total_batch=1024, batch_size=32, warmup_epochs=40, epochs=800, save_ckpt_freq=20,
              num_workers=10, crop='multiscale', flip=True, decoder_mask_ratio=0.0, num_sample=1)
# § B, UCF101 / HMDB51: "a similar recipe on Kinetics" with ratio 0.75, batch 192, base lr 3e-4;
# 24 clips per GPU and a checkpoint every 100 epochs as the official UCF101 script.
SECTION_B = dict(TABLE9, mask_ratio=0.75, total_batch=192, batch_size=24, lr=3e-4,
                 save_ckpt_freq=100)
RECIPES = {
    'ssv2': dict(TABLE9, sampling_rate=2, flip=False),            # Table 9, SSv2 column (no flip)
    'k400': dict(TABLE9, sampling_rate=4),                        # Table 9, Kinetics-400 column
    'ucf101': dict(SECTION_B, sampling_rate=4, epochs=3200),      # § B
    'hmdb51': dict(SECTION_B, sampling_rate=2, epochs=4800),      # § B
    'list': dict(TABLE9, sampling_rate=4),                        # your own list file: the K400 row
    'folder': dict(TABLE9, sampling_rate=4),  # class folders (ImageFolder layout): the K400 row
    # Not in the paper: a tiny ViT (128 x 4, decoder 192 x 1) on 8 frames of 64x64 with 8x8 patches
    # (256 cubes), so the run fits a laptop CPU. Each setting is measured (README, "results"):
    # - a decoder wider than the encoder: 1-D sine positions at 96 wide are too coarse for the
    #   decoder's queries to find a hidden cube's neighbours, and it stays on the predict-the-mean
    #   plateau;
    # - ratio 0.75 (§ B's for small datasets): at 0.9 the encoder learns motion only after a second
    #   plateau whose length depends on the seed;
    # - the whole frame instead of MultiScaleCrop: a random scale changes every clip's apparent
    #   speed, and no motion is learnt; no flip: the motion classes are mirror pairs;
    # - a base lr 30x Table 9's: the run is ~1000x shorter than the paper's (1.5x or 0.5x of it
    #   stays longer on the plateaus);
    # - VideoMAE V2's dual masking at 0.5 (the decoder skips half of the hidden cubes): the step
    #   takes 0.6x the time, and the loss leaves the 0.85 shelf no later (seed 0: 0.75 vs 0.85 at
    #   step 1300). --precision auto takes bf16 on a CPU with native bf16: a step 1.4-1.7x faster,
    #   so 90 epochs fit 5 min there; at 80, seed 1 rested on a third shelf (loss 0.72, probe
    #   40.6%; at 90: 0.43, 69.8%);
    # - decoding in the main process: a clip takes 2 ms, and on 2 cores a worker would take a core
    #   from the model's two threads (0.066-0.073 s a step, 0.082-0.092 with 2 workers).
    'synthetic': dict(TABLE9, model='small', embed_dim=128, depth=4, num_heads=4,
                      decoder_embed_dim=192, decoder_num_heads=3, decoder_depth=1,
                      patch_size=8, input_size=64, num_frames=8, sampling_rate=4,
                      mask_ratio=0.75, decoder_mask_ratio=0.5, flip=False, crop='center',
                      total_batch=8, batch_size=8, lr=4.8e-2, min_lr=1.6e-3, epochs=90,
                      warmup_epochs=1, save_ckpt_freq=20, num_workers=0),
}
# --model giant: VideoMAE V2's ViT-g/14 row (its scripts/pretrain/vit_g_hybrid_pt.sh, 64 GPUs x 32):
# dual masking (tube 0.9 for the encoder, running cell 0.5 for the decoder), 4 clips per decoded
# video with their own crops and masks, clip_grad 0.02. Its "epochs" and its lr scaling count
# videos, not clips: one epoch decodes every video once and trains on 4 clips of each.
V2_GIANT = dict(model='giant', mask_ratio=0.9, decoder_mask_ratio=0.5, num_sample=4,
                total_batch=2048, batch_size=32, lr=6e-4, clip_grad=0.02, warmup_epochs=30,
                epochs=300, save_ckpt_freq=5, sampling_rate=4)
DECODER_KEYS = ('decoder_embed_dim', 'decoder_num_heads', 'decoder_depth')
MASKS = {'tube': masking.tube_masking, 'random': masking.random_masking,
         'frame': masking.frame_masking}
VIS_RATIOS = (0.75, 0.9, 0.95)                                    # Figures 10 and 11


def build_parser():
    def r(key, text):
        return f'{text} ({utils.recipe_help(RECIPES, key)})'
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = utils.add_data_flags(p, RECIPES)
    g.add_argument('--max_videos', type=int, help='only the first N training videos (quick trials)')
    g.add_argument('--crop', choices=['multiscale', 'center'],
                   help=r('crop', "MultiScaleCrop (Table 9) or the frame's central square"))
    g.add_argument('--flip', action=argparse.BooleanOptionalAction, help=r('flip', 'random flip'))
    g = utils.add_shape_flags(p, RECIPES)
    for key, text in [('decoder_embed_dim', 'decoder width'),
                      ('decoder_num_heads', 'decoder heads'),
                      ('decoder_depth', 'decoder blocks (Table 2a)')]:
        g.add_argument(f'--{key}', type=int,
                       help=f"{text} ({utils.recipe_help(RECIPES, key)}; others: "
                            "the --model size's)")
    g.add_argument('--drop_path', type=float, default=0.0, help='stochastic depth (official: 0)')
    g.add_argument('--use_checkpoint', action=argparse.BooleanOptionalAction,
                   help='gradient checkpointing: less memory')
    g = p.add_argument_group('masking and target (the ablations of Table 2)')
    g.add_argument('--mask_type', choices=list(MASKS), help=r('mask_type', 'tube, random or frame'))
    g.add_argument('--mask_ratio', type=float, help=r('mask_ratio', 'fraction of cubes hidden'))
    g.add_argument('--decoder_mask_ratio', type=float, help=r('decoder_mask_ratio', 'VideoMAE V2 '
                   "dual masking: the share of cubes the decoder skips (running cell; V2: 0.5)"))
    g.add_argument('--num_sample', type=int, help=r('num_sample', 'clips per decoded video, each '
                   'with its own crop and mask (V2: 4); the lr scales with videos, not clips'))
    g.add_argument('--normalize_target', action=argparse.BooleanOptionalAction,
                   help=r('normalize_target', 'per-cube-normalised pixels; --no-: plain pixels'))
    utils.add_common_flags(p, RECIPES)
    p.add_argument('--visualize', metavar='CHECKPOINT',
                   help='only write the reconstruction pictures '
                        'of CHECKPOINT (its own configuration), then exit')
    p.add_argument('--export_hf', metavar='DIR', help='write the --resume checkpoint as a '
                   'transformers VideoMAEForPreTraining folder, then exit')
    p.add_argument('--vis_videos', type=int, default=4, help='held-out videos in the pictures (4)')
    return p


def resolve(parser, argv=None):
    """Flags over the recipe, then every check that can fail before any work (exit 2)."""
    def recipe(c):                                      # --model giant: V2's row on top
        return {**RECIPES[c['dataset']], **(V2_GIANT if c['model'] == 'giant' else {})}
    cfg = utils.resolve(parser, argv, recipe, lambda c: f"pretrain-{c['dataset']}",
                        init_flag='visualize', init_keys=None)
    if not 0.0 <= cfg['mask_ratio'] < 1.0:
        utils.flag_error(f"--mask_ratio {cfg['mask_ratio']} must be in [0, 1): the fraction of "
                         'cubes hidden (0.9 in the paper; 1 leaves the encoder nothing to see)')
    patch = utils.check_clip_flags(cfg, videomae.SIZES[cfg['model']].get('patch_size', 16))
    side, r = cfg['input_size'] // patch, cfg['decoder_mask_ratio']
    if r and (not 0 < int(4 * r) < 4 or side % 2):
        utils.flag_error(f'--decoder_mask_ratio {r}: the running cell skips a quarter, half or '
                         'three quarters of an even patch grid (V2: 0.5; 0: off)')
    if int(cfg['mask_ratio'] * side ** 2) < 1:
        utils.flag_error(f"--mask_ratio {cfg['mask_ratio']} hides no cube of a frame: "
                         'nothing to learn')
    return cfg


def build_model(cfg):
    kw = {k: cfg[k] for k in DECODER_KEYS if cfg[k] is not None}
    if cfg['use_checkpoint'] is not None:               # else the size's default (huge, giant: on)
        kw['use_checkpoint'] = cfg['use_checkpoint']
    return videomae.build_pretrain(cfg['model'], **utils.shape(cfg), **kw,
                                   drop_path_rate=cfg['drop_path'])


# --------------------------------------------------------------------------------------------------
# The loop.

def train(cfg, d):
    utils.seed_everything(cfg['seed'])                  # the same init on every rank
    samples, classes = data.load_split(cfg['dataset'], cfg['data_path'], 'train', cfg['fold'])
    samples = samples[:cfg['max_videos']] if cfg['max_videos'] else samples
    dataset = data.VideoDataset(samples, mode='train', num_frames=cfg['num_frames'],
                                sampling_rate=cfg['sampling_rate'], input_size=cfg['input_size'],
                                crop=cfg['crop'], flip=cfg['flip'], seed=cfg['seed'],
                                num_sample=cfg['num_sample'])   # K crops of one decoded window
    loader = data.make_loader(dataset, cfg['batch_size'], train=True,
                              num_workers=cfg['num_workers'], seed=cfg['seed'])
    model = build_model(cfg).to(d.device)
    # no decay: biases, norms, mask token
    groups = utils.param_groups(model, cfg['weight_decay'])
    optimizer = utils.make_adamw(groups, cfg['lr'], cfg['opt_betas'], d.device)
    run = utils.start(cfg, 'pretrain', d, model, optimizer, loader, classes,
                      data.FailureLog(cfg['max_failed_ratio']), clips_per_video=cfg['num_sample'])
    p, t, make_mask = model.patch_size, model.tubelet_size, MASKS[cfg['mask_type']]

    def loss_of(batch, micro):                          # the VideoMAE step
        # (B, K, 3, T, H, W) uint8 -> (B*K, 3, T, H, W) float: every clip gets its own mask
        video = data.normalize(batch['video'].to(d.device, non_blocking=True).flatten(0, 1))
        # the masks are a pure function of (seed, step, micro-batch, rank): a resumed run draws the
        # same masks as an uninterrupted one
        g = torch.Generator(d.device).manual_seed(
            hash((cfg['seed'], run.it, micro, d.rank)) % 2**62)
        B, grid, r = len(video), model.grid(video.shape), cfg['decoder_mask_ratio']
        mask = make_mask(B, grid, cfg['mask_ratio'], g, d.device)  # (B, N), True = hidden
        # VideoMAE V2's dual masking: the cubes the decoder skips (B, N); None: the paper's v1
        drop = masking.running_cell_masking(B, grid, r, g, d.device) if r else None
        pred = run.net(video, mask, drop)               # (B, N_masked or N_kept, 3*t*p*p)
        return videomae.pretrain_loss(pred, video, mask, p, t, cfg['normalize_target'], drop)

    for epoch in range(run.start_epoch, cfg['epochs']):
        for _ in utils.steps(run, epoch):
            utils.train_step(run, loss_of)
        kept = utils.end_epoch(run, epoch)
        if kept and d.is_main:
            out = os.path.join(cfg['output_dir'], 'reconstructions', os.path.basename(kept)[:-4])
            for k, picture in enumerate(reconstructions(model, cfg, d.device, run.autocast, out)):
                run.log.image(f'reconstruction/video-{k}', picture, run.it + 1)
    run.bar.close()
    return model


# --------------------------------------------------------------------------------------------------
# Reconstruction pictures (appendix § E, Figures 10 and 11). One PNG per held-out video, rows from
# top to bottom: the original frames, then for each ratio of VIS_RATIOS the masked input (hidden
# cubes grey) and the reconstruction (visible cubes original; each predicted cube un-normalised with
# the mean/std of the original cube, as the official visualisation: its brightness comes from the
# truth). Under dual masking too the decoder predicts every hidden cube here: a mask token stands
# for a position, so one trained on a subset of them serves all.

@torch.no_grad()
def reconstructions(model, cfg, device, autocast, out_dir):
    """Write out_dir/video-K.png for cfg['vis_videos'] test videos -> the (3, H, W) uint8
    pictures."""
    samples, _ = data.load_split(cfg['dataset'], cfg['data_path'], 'test', cfg['fold'])
    n = min(cfg['vis_videos'], len(samples))
    picks = sorted({round(i * (len(samples) - 1) / max(n - 1, 1)) for i in range(n)})  # spread out
    ds = data.VideoDataset([samples[i] for i in picks], mode='val', num_frames=cfg['num_frames'],
                           sampling_rate=cfg['sampling_rate'], input_size=cfg['input_size'])
    os.makedirs(out_dir, exist_ok=True)
    was_training, (p, t) = model.training, (model.patch_size, model.tubelet_size)
    model.eval()
    T, zoom = cfg['num_frames'], max(1, 128 // cfg['input_size'])      # small frames shown larger
    show = list(range(0, T, max(1, T // 8)))[:8]                      # at most 8 frames per row
    pictures = []
    for k in range(len(ds)):
        clip = ds[k]['video'].to(device)                              # (1, 3, T, S, S) uint8
        original, video = clip.float() / 255, data.normalize(clip)
        grid, rows = model.grid(video.shape), [original]
        for ratio in VIS_RATIOS:                  # the same masks at every checkpoint: seeded by k
            g = torch.Generator(device).manual_seed(cfg['seed'] * 1000 + k)
            mask = MASKS[cfg['mask_type']](1, grid, ratio, g, device)
            with autocast():
                pred = model(video, mask)
            hidden = mask.view(1, 1, *grid).repeat_interleave(t, 2).repeat_interleave(p, 3) \
                .repeat_interleave(p, 4)                              # (1, 1, T, S, S) pixels
            rows += [original.masked_fill(hidden, 0.5),
                     videomae.reconstruct(video, mask, pred.float(), p, t, cfg['normalize_target'])]
        frames = torch.cat([r[0, :, show].transpose(0, 1) for r in rows]).cpu()  # (rows*F, 3, S, S)
        frames = frames.repeat_interleave(zoom, 2).repeat_interleave(zoom, 3)
        picture = torchvision.utils.make_grid(frames, nrow=len(show), padding=2, pad_value=1.0)
        picture = (picture.clamp(0, 1) * 255).round().to(torch.uint8)
        torchvision.io.write_png(picture, os.path.join(out_dir, f'video-{k}.png'))
        pictures.append(picture)
    model.train(was_training)
    return pictures


def main(argv=None):
    cfg = resolve(build_parser(), argv)
    d = utils.init_distributed(cfg['device'])
    if cfg['export_hf']:                      # a transformers VideoMAEForPreTraining folder
        model, ckpt = build_model(cfg), cfg['resume'] if cfg['resume'] != 'auto' else ''
        if not ckpt:
            raise SystemExit('error: --export_hf needs a checkpoint: --resume CKPT (or one in '
                             f"{cfg['output_dir']})")
        checkpoints.load_weights(model, ckpt, '--resume')
        return print('transformers folder:', checkpoints.export_hf(model, cfg['export_hf']))
    if cfg['visualize']:                      # next to the checkpoint: reconstructions/<its name>/
        model = build_model(cfg).to(d.device)
        checkpoints.load_weights(model, cfg['visualize'], '--visualize')
        name = os.path.splitext(os.path.basename(cfg['visualize']))[0]
        out = os.path.join(os.path.dirname(os.path.abspath(cfg['visualize'])), 'reconstructions',
                           name)
        reconstructions(model, cfg, d.device, utils.amp_setup(d.device, cfg['precision'])[0], out)
        return print(f'pictures in {out}')
    train(cfg, d)
    utils.cleanup_distributed()


if __name__ == '__main__':
    utils.main(main)
