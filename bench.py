"""The README's speed tables, as markdown: `python bench.py data|model|train [--help]`."""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
import masking
import model
import pretrain
import synthetic
import utils


def timed(fn, n, warmup=1):
    """-> seconds per fn() call: the median of n calls after `warmup` (robust on a shared box)."""
    stamps = [time.perf_counter()]
    for _ in range(warmup + n):
        fn()
        stamps.append(time.perf_counter())
    return float(np.median(np.diff(stamps)[warmup:]))


def table(title, columns, note=''):
    """Print the title, the machine, `note` and the header 'a | b | ...'. -> a row printer."""
    cpu = 'unknown CPU'
    with contextlib.suppress(OSError, StopIteration):  # no lscpu, or no model name in it
        lscpu = subprocess.run(['lscpu'], capture_output=True, text=True).stdout.splitlines()
        cpu = next(ln.split(':', 1)[1].strip() for ln in lscpu if ln.startswith('Model name'))
    load = ', '.join(f'{x:.2f}' for x in os.getloadavg())
    print(f'\n### {title}\n\nmachine: {cpu}, {os.cpu_count()} cores, load average {load} '
          f'(1/5/15 min); torch {torch.__version__}, {torch.get_num_threads()} threads{note}\n')
    print(f'| {columns} |\n' + '|---' * (columns.count('|') + 1) + '|')
    return lambda *cells: print('| ' + ' | '.join(map(str, cells)) + ' |', flush=True)


# ---- data ----------------------------------------------------------------------------------------
def _moving_texture(n, h, w, seed=0):
    """Textured frames with global and local motion, so the encoders make realistic P/B frames."""
    tex = np.random.default_rng(seed).integers(0, 256, (h // 8 + 4, w // 8 + 4, 3), dtype=np.uint8)
    tex = np.kron(tex, np.ones((8, 8, 1), np.uint8))
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        dy, dx = int(8 + 6 * np.sin(i / 20)), int(8 + 6 * np.cos(i / 30))
        out[i] = tex[dy:dy + h, dx:dx + w]
        y, x = (i * 3) % (h - 40), (i * 5) % (w - 40)
        out[i, y:y + 40, x:x + 40] = (i * 7) % 256
    return out


def naive_read(path, indices):
    """Decode every frame from the start, convert each to RGB, then pick (as read_video)."""
    import av
    with av.open(path) as c:
        c.streams.video[0].thread_type = 'AUTO'
        frames = [f.to_ndarray(format='rgb24') for f in c.decode(video=0)]
    return torch.from_numpy(np.stack([frames[min(i, len(frames) - 1)] for i in indices]))


def bench_data(args):
    """Decode + augment clips/s of ONE worker (one process, one op thread): our reader (seek to the
    keyframe before the window, RGB only for kept frames, stop after the last) against a naive one
    (decode and convert every frame from the start, as torchvision.io.read_video)."""
    torch.set_num_threads(1)  # one DataLoader worker = one op thread (as make_loader's workers)
    T, stride, size = args.num_frames, args.sampling_rate, args.input_size
    ours = data.decode_frames  # k: augmented clips per decode (0: decode only, counted as 1 clip)
    # (label, reader, k, windows): k clips of one window (pretrain.py --num_sample, V2), or one
    # clip from each of several windows of one decode (mae_st's --repeat_aug)
    configs = [('naive', naive_read, 1, 1), ('ours', ours, 1, 1), ('ours', ours, 2, 1),
               ('ours', ours, 4, 1), ('ours, 2 windows', ours, 1, 2),
               ('ours, 4 windows', ours, 1, 4),
               ("ours, FFmpeg's decode threads", lambda p, i: ours(p, i, threads=0), 1, 1),
               ('ours, decode only', ours, 0, 1), ('naive, decode only', naive_read, 0, 1)]
    row = table(f'data: decode + augment, one worker ({T} frames at stride {stride}, '
                f'MultiScaleCrop to {size})',
                'video | reader | clips per decode | ms per decode+augment | clips/s')
    for name, n, h, w, fps, gop in [
            ('Kinetics-like 340x256 H.264 MP4, 30 fps, 10 s, GOP 250', 300, 256, 340, 30, 250),
            ('UCF101-like 320x240 MPEG-4 AVI, 25 fps, 7 s, GOP 12', 175, 240, 320, 25, 12)]:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'video.mp4' if 'MP4' in name else 'video.avi')
            synthetic.encode_video(path, _moving_texture(n, h, w), fps=fps, gop=gop)
            starts = np.random.default_rng(0).integers(0, n - T * stride + 1, 1000).tolist()

            def run(reader, k, windows):
                idx = [s + j * stride for s in sorted(starts.pop() for _ in range(windows))
                       for j in range(T)]
                frames = reader(path, idx).permute(0, 3, 1, 2)
                for clip in frames.split(T):
                    for _ in range(k):
                        data.train_augment(clip, size, crop='multiscale')
            sec = {}
            for label, reader, k, win in configs:
                sec[label, k] = dt = timed(lambda: run(reader, k, win), args.repeats)
                clips = max(k, 1) * win
                row(name, label, clips, f'{dt * 1000:.1f}', f'{clips / dt:.1f}')
        row(name, f'**ours / naive = {sec["naive", 1] / sec["ours", 1]:.1f}x** (k = 1)', '', '', '')
        row(name, f'decoding cores one GPU at {args.model_rate} clips/s needs: ' + ', '.join(
            f'k={k} {args.model_rate * sec["ours", k] / k:.0f}' for k in (1, 2, 4)), '', '', '')


# ---- model / train (the pre-training step; owner of this section: pretrain.py) -------------------
def pretrain_flops(cfg, T, S, ratio, batch, decoder_ratio=0.0):
    """Analytic matmul FLOPs of a training step (3 x forward): cube embedding (visible cubes), qkv,
    QK^T, AV, proj, MLP of encoder (visible) and decoder (visible + mask tokens),
    encoder_to_decoder, head (mask tokens: the masked cubes, or with dual masking the cubes the
    running cell keeps)."""
    t, p, r = cfg['tubelet_size'], cfg['patch_size'], cfg['mlp_ratio']
    N, Nm = T // t * (S // p) ** 2, T // t * int(ratio * (S // p) ** 2)
    Nv, P, D, Dd = N - Nm, 3 * t * p * p, cfg['embed_dim'], cfg['decoder_embed_dim']
    Nm = N - N * int(4 * decoder_ratio) // 4 if decoder_ratio else Nm        # mask tokens
    block = lambda n, d: 2 * n * d * 4 * d + 4 * n * n * d + 2 * n * d * 2 * int(r * d)
    return 3 * batch * (2 * Nv * P * D + cfg['depth'] * block(Nv, D) + 2 * Nv * D * Dd
                        + cfg['decoder_depth'] * block(Nv + Nm, Dd) + 2 * Nm * Dd * P)


def peak_memory(device):
    """-> the peak memory cell (MB) since the last call: CUDA's peak or Linux's VmHWM."""
    if device.type == 'cuda':
        mb = f'{torch.cuda.max_memory_allocated() / 2**20:.0f} (GPU)'
        torch.cuda.reset_peak_memory_stats()
        return mb
    with open('/proc/self/status') as f:
        mb = f"{next(int(ln.split()[1]) for ln in f if ln.startswith('VmHWM')) / 1024:.0f}"
    with contextlib.suppress(OSError), open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM
    return mb


def pretrain_step_fn(net, batch, T, S, ratio, precision='fp32', device=torch.device('cpu'),
                     decoder_ratio=0.0):
    """-> a step as pretrain.py's: masks on the device, autocast forward, loss, backward, AdamW."""
    video = torch.randn(batch, 3, T, S, S, device=device)
    opt = utils.make_adamw(utils.param_groups(net, 0.05), 1e-4, (0.9, 0.95), device)
    g = torch.Generator(device=device).manual_seed(0)

    def step():
        grid = net.grid(video.shape)
        mask = masking.tube_masking(batch, grid, ratio, generator=g, device=device)
        drop = masking.running_cell_masking(batch, grid, decoder_ratio, g, device) \
            if decoder_ratio else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
            pred = net(video, mask, drop)
        model.pretrain_loss(pred, video, mask, net.patch_size, net.tubelet_size,
                            decoder_mask=drop).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == 'cuda':
            torch.cuda.synchronize()
    return step


def bench_model(args):
    """One pre-training step: time, FLOPs vs a measured matmul peak, memory; SDPA vs explicit."""
    device = torch.device(args.device)
    T, S, ratio, B = args.num_frames, args.input_size, args.mask_ratio, args.batch_size
    gflops = lambda a: 2 * a.shape[0] ** 3 / timed(lambda: a @ a, 3) / 1e9
    # only the precisions asked for: without avx512_bf16 (Zen 3, say) one bf16 4096^2 matmul is
    # slow enough to stall the run
    peaks = ({p: gflops(torch.randn(4096, 4096, dtype=dt)) for p, dt in
              (('fp32', torch.float32), ('bf16', torch.bfloat16)) if p in args.precisions}
             if device.type == 'cpu' else {})
    row = table(f'model: one pre-training step (forward, loss, backward, AdamW), {T}x{S}x{S}, '
                f'tube ratio {ratio}, batch {B}, {device}', 'model | precision | attention | '
                'decoder mask | '
                's / step | clips/s | GFLOP / step | GFLOP/s | % of matmul peak | peak RSS MB',
                '\nmeasured matmul peak (4096^2): ' + ', '.join(
                    f'{p} {v:.1f} GFLOP/s' for p, v in peaks.items()) if peaks else '')
    ours = model.attention  # model.Attention looks it up at each call
    for size in args.sizes:
        for precision in args.precisions:
            for attention, R in [(a, R) for a in args.attentions for R in args.decoder_mask_ratios]:
                model.attention = F.scaled_dot_product_attention if attention == 'sdpa' \
                    else model.explicit_attention
                torch.manual_seed(0)
                peak_memory(device)  # restart the peak
                net = model.build_pretrain(size, img_size=S, num_frames=T).to(device)
                sec = timed(pretrain_step_fn(net, B, T, S, ratio, precision, device, R),
                            args.repeats)
                flops = pretrain_flops(net.config, T, S, ratio, B, R)
                rate = flops / sec / 1e9
                frac = f'{100 * rate / peaks[precision]:.0f}%' if precision in peaks else ''
                row(size, precision, attention, R, f'{sec:.3f}', f'{B / sec:.2f}',
                    f'{flops / 1e9:.1f}', f'{rate:.1f}', frac, peak_memory(device))
                del net
    model.attention = ours
    if args.profile:  # one more SDPA step of the last size, first precision
        net = model.build_pretrain(args.sizes[-1], img_size=S, num_frames=T).to(device)
        step = pretrain_step_fn(net, B, T, S, ratio, args.precisions[0], device)
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        print(f'\nwhere the time goes ({args.sizes[-1]}, {args.precisions[0]}, SDPA; '
              f'torch.profiler, self CPU time):\n')
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12))


def bench_train(args):
    """pretrain.py end to end on the synthetic recipe, per number of decoding workers: clips/s and
    the share of the step waiting for data (from its log.jsonl), against the model-only step."""
    r = pretrain.RECIPES['synthetic']
    B, T, S = r['batch_size'], r['num_frames'], r['input_size']
    torch.manual_seed(0)
    net = pretrain.build_model({**dict.fromkeys(('tubelet_size', *pretrain.DECODER_KEYS)),
                                'drop_path': 0.0, 'use_checkpoint': False, **r})
    precision = utils.amp_setup(torch.device('cpu'))[2]  # pretrain.py's default, bf16 if native
    step = pretrain_step_fn(net, B, T, S, r['mask_ratio'], precision,
                            decoder_ratio=r['decoder_mask_ratio'])
    sec = timed(step, args.repeats)
    row = table(f'train: pretrain.py end to end (synthetic recipe: {T}x{S}x{S}, batch {B}, '
                'real AVI decoding)', 'what | s / step | clips/s | waiting for data')
    row(f'model step only (no data, {precision})', f'{sec:.3f}', f'{B / sec:.1f}', '-')
    for workers in args.workers:
        cmd = [sys.executable, pretrain.__file__, *(f'--epochs 1 --warmup_epochs 0 --max_videos '
               f'{B * (args.steps + 2)} --num_workers {workers} --vis_videos 1').split()]
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(cmd + ['--output_dir', tmp], check=True, capture_output=True)
            with open(os.path.join(tmp, 'log.jsonl')) as f:
                steps = [s for s in map(json.loads, f) if s['kind'] == 'step'][2:]  # 2: warm-up
        sec = float(np.median([s['step_s'] for s in steps]))
        wait = f"{sum(s['data_wait_s'] for s in steps) / sum(s['step_s'] for s in steps):.0%}"
        row(f'pretrain.py, {workers} decoding worker(s)', f'{sec:.3f}', f'{B / sec:.1f}', wait)


def bench_ava(args):
    """detect.py's start-up on a frame list of AVA's size (SlowFast layout: one row per frame;
    real AVA v2.2: 299 movies x 27,001 frames): seconds and peak memory to group it per video."""
    import resource
    import random
    import detect
    r = random.Random(0)
    vids = [''.join(r.choices('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_',
                              k=11)) for _ in range(args.movies)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'train.csv')
        with open(path, 'w') as f:
            f.write('original_vido_id video_id frame_id path labels\n')
            for k, v in enumerate(vids):
                f.writelines(f'{v} {k} {i} {v}/{v}_{i + 1:06d}.jpg ""\n'
                             for i in range(args.frames))
        gib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # noqa: E731
        rss, t = gib(), time.perf_counter()
        source = detect.FrameFolder(tmp, [path])
        sec, peak = time.perf_counter() - t, gib()
    row = table('ava: detect.py FrameFolder on a generated frame list', 'rows | movies | s | '
                'peak RSS GiB (before: GiB)')
    row(sum(map(len, source.paths.values())), len(source.paths), f'{sec:.1f}',
        f'{peak:.2f} ({rss:.2f})')


def main():
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest='section', required=True)
    for fn, flags in [  # flag: default (a list: one or more; repeats: timed runs, the median)
            (bench_data, dict(num_frames=16, sampling_rate=4, input_size=224, repeats=12,
                              model_rate=1000)),
            (bench_model, dict(sizes=['small', 'base'], precisions=['fp32', 'bf16'], device='cpu',
                               attentions=['sdpa', 'explicit'], decoder_mask_ratios=[0.0],
                               num_frames=16, input_size=224, mask_ratio=0.9, batch_size=1,
                               repeats=3, profile=False)),
            (bench_train, dict(workers=[0, 2], steps=10, repeats=5)),
            (bench_ava, dict(movies=299, frames=27001))]:
        s = sub.add_parser(fn.__name__[6:], help=fn.__doc__.split(':')[0], description=fn.__doc__)
        s.set_defaults(fn=fn)
        for k, v in flags.items():
            many = isinstance(v, list)
            s.add_argument(f'--{k}', **dict(action='store_true') if v is False else dict(
                default=v, type=type(v[0] if many else v), nargs='+' if many else None,
                help=f'default: {" ".join(map(str, v)) if many else v}'))
    args = p.parse_args()
    args.fn(args)
    print('\nload average after the run: ' + ', '.join(f'{x:.2f}' for x in os.getloadavg()))


if __name__ == '__main__':
    main()
