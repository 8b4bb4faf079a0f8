"""Benchmarks, one subcommand per part of the pipeline: `python bench.py data` (more sections,
e.g. model, train, are added as further subcommands with the same timing helper). Prints markdown
tables for README.

data: decode + augment clips/s of ONE worker (one process, one op thread) on generated
Kinetics-like (340x256 H.264 MP4, 10 s at 30 fps, keyframe every 250 frames) and UCF101-like
(320x240 MPEG-4 AVI, 25 fps, 7 s) videos: our reader (seek to the keyframe before the window, stop
after it, RGB only for kept frames) against the naive one (decode every frame from the start and
convert each to RGB, as torchvision.io.read_video did), and with k = 1, 2, 4 augmented clips per
decode (repeated augmentation).
"""
import argparse
import os
import platform
import subprocess
import tempfile
import time

import numpy as np
import torch


def timed(fn, n, warmup=1):
    """Run fn() warmup + n times; -> seconds per call (median of the n calls: robust to a shared
    machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def machine():
    try:
        lscpu = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        model = next(ln.split(':', 1)[1].strip() for ln in lscpu.splitlines()
                     if ln.startswith('Model name'))
    except Exception:
        model = platform.processor() or 'unknown CPU'
    load = ', '.join(f'{x:.2f}' for x in os.getloadavg())
    return f'{model}, {os.cpu_count()} cores, load average {load} (1/5/15 min)'


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def _moving_texture(n, h, w, seed=0):
    """Textured frames with global and local motion, so the encoders produce realistic P/B
    frames."""
    rng = np.random.default_rng(seed)
    tex = rng.integers(0, 256, (h // 8 + 4, w // 8 + 4, 3), dtype=np.uint8)
    tex = np.kron(tex, np.ones((8, 8, 1), np.uint8))
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        dy, dx = int(8 + 6 * np.sin(i / 20)), int(8 + 6 * np.cos(i / 30))
        out[i] = tex[dy:dy + h, dx:dx + w]
        y, x = (i * 3) % (h - 40), (i * 5) % (w - 40)
        out[i, y:y + 40, x:x + 40] = (i * 7) % 256
    return out


def naive_read(path, indices):
    """Decode every frame from the start and convert each to RGB, then pick
    (torchvision.io.read_video)."""
    import av
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = 'AUTO'
        frames = [f.to_ndarray(format='rgb24') for f in c.decode(s)]
    return torch.from_numpy(np.stack([frames[min(i, len(frames) - 1)] for i in indices]))


def bench_data(args):
    import data
    # one DataLoader worker = one op thread (make_loader's worker_init does this)
    torch.set_num_threads(1)
    T, stride, size = args.num_frames, args.sampling_rate, args.input_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        videos = {
            'Kinetics-like 340x256 H.264 MP4, 30 fps, 10 s, GOP 250':
                (os.path.join(tmp, 'k400.mp4'), 300, 256, 340, 30, 250),
            'UCF101-like 320x240 MPEG-4 AVI, 25 fps, 7 s, GOP 12':
                (os.path.join(tmp, 'ucf.avi'), 175, 240, 320, 25, 12),
        }
        for name, (path, n, h, w, fps, gop) in videos.items():
            data.encode_video(path, _moving_texture(n, h, w), fps=fps, gop=gop)
        for name, (path, n, h, w, fps, gop) in videos.items():
            rng = np.random.default_rng(0)
            starts = rng.integers(0, n - T * stride + 1, 1000).tolist()

            def clip_indices():
                s = starts.pop()
                return [s + k * stride for k in range(T)]

            def run(reader, k):
                frames = reader(path, clip_indices()).permute(0, 3, 1, 2)
                for _ in range(k):
                    data.train_augment(frames, size, crop='multiscale')

            results = {}
            readers = (('naive', naive_read), ('ours', data.decode_frames),
                       ('ours, 1 decode thread',
                        lambda p, i: data.decode_frames(p, i, threads=1)))
            for label, reader in readers:
                for k in (1, 2, 4):
                    if label != 'ours' and k > 1:
                        continue
                    sec = timed(lambda: run(reader, k), args.repeats)
                    results[(label, k)] = sec
                    rows.append((name, label, k, sec * 1000, k / sec))
            dec = timed(lambda: data.decode_frames(path, clip_indices()), args.repeats)
            rows.append((name, 'ours, decode only', 1, dec * 1000, 1 / dec))
            naive = timed(lambda: naive_read(path, clip_indices()), args.repeats)
            rows.append((name, 'naive, decode only', 1, naive * 1000, 1 / naive))
            speedup = results[('naive', 1)] / results[('ours', 1)]
            rows.append((name, f'**ours / naive = {speedup:.1f}x** (k = 1)', '', '', ''))
    print(f'\n### data: decode + augment, one worker ({T} frames at stride {stride}, '
          f'MultiScaleCrop to {size})\n')
    print(f'machine: {machine()}\n')
    print('| video | reader | clips per decode (k) | ms per decode+augment | clips/s |')
    print('|---|---|---|---|---|')
    for name, label, k, ms, cps in rows:
        ms = f'{ms:.1f}' if ms != '' else ''
        cps = f'{cps:.1f}' if cps != '' else ''
        print(f'| {name} | {label} | {k} | {ms} | {cps} |')
    print(f'\nload average after the run: {", ".join(f"{x:.2f}" for x in os.getloadavg())}')


# --------------------------------------------------------------------------------------------------
# model / train (pre-training step; owner of this section: pretrain.py)
# --------------------------------------------------------------------------------------------------
def pretrain_flops(cfg, T, S, ratio, batch):
    """Analytic FLOPs of one training step (forward x 3 for forward + backward) of the pre-training
    model: the matmuls of the cube embedding (visible cubes only), qkv, attention (QK^T and AV),
    proj, MLP in the encoder (visible tokens) and the decoder (all tokens), encoder_to_decoder, and
    the head (masked tokens)."""
    t, p, r = cfg['tubelet_size'], cfg['patch_size'], cfg['mlp_ratio']
    per_slice = (S // p) ** 2
    N = T // t * per_slice
    Nm = T // t * int(ratio * per_slice)
    Nv, P = N - Nm, 3 * t * p * p
    D, Dd = cfg['embed_dim'], cfg['decoder_embed_dim']
    block = lambda n, d: (2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d
                          + 2 * 2 * n * d * int(r * d))
    fwd = (2 * Nv * P * D + cfg['depth'] * block(Nv, D) + 2 * Nv * D * Dd
           + cfg['decoder_depth'] * block(N, Dd) + 2 * Nm * Dd * P)
    return 3 * fwd * batch


def matmul_peak(dtype=torch.float32, n=4096, repeats=3):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    sec = timed(lambda: a @ b, repeats)
    return 2 * n ** 3 / sec / 1e9


def explicit_attention(self, x):
    """softmax(q k^T / sqrt(d)) v written out (the materialised N x N matrix), to compare with
    SDPA."""
    import torch.nn.functional as F
    B, N, C = x.shape
    bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
    qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, C // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    x = attn.softmax(-1) @ v
    return self.proj(x.transpose(1, 2).reshape(B, N, C))


def peak_rss_reset():
    """Reset the process's peak resident memory (Linux /proc/self/clear_refs 5) so each config gets
    its own."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def peak_rss_mb():
    with open('/proc/self/status') as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith('VmHWM')) / 1024


def pretrain_step_fn(net, batch, T, S, ratio, precision, device):
    """One full pre-training step as pretrain.py does it: mask on the device, forward (autocast),
    loss, backward, AdamW. -> a function to time."""
    import masking
    import model as videomae
    import utils
    video = torch.randn(batch, 3, T, S, S, device=device)
    opt = utils.make_adamw(utils.param_groups(net, 0.05), 1e-4, (0.9, 0.95), device)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == 'bf16'
                else (lambda: torch.autocast(device.type, enabled=False)))
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        mask = masking.tube_masking(batch, net.grid(video.shape), ratio, generator=gen,
                                    device=device)
        with autocast():
            pred = net(video, mask)
        loss = videomae.pretrain_loss(pred, video, mask, net.patch_size, net.tubelet_size)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == 'cuda':
            torch.cuda.synchronize()
    return step


def bench_model(args):
    import model as videomae
    device = torch.device(args.device)
    T, S, ratio, B = args.num_frames, args.input_size, args.mask_ratio, args.batch_size
    peaks = ({'fp32': matmul_peak(torch.float32), 'bf16': matmul_peak(torch.bfloat16)}
             if device.type == 'cpu' else {})
    print(f'\n### model: one pre-training step (forward, loss, backward, AdamW), {T}x{S}x{S}, '
          f'tube ratio {ratio}, batch {B}, {device}\n')
    print(f'machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads')
    if peaks:
        print(f'measured matmul peak (4096^2): fp32 {peaks["fp32"]:.1f} GFLOP/s, '
              f'bf16 {peaks["bf16"]:.1f} GFLOP/s\n')
    print('| model | precision | attention | s / step | clips/s | GFLOP / step | GFLOP/s '
          '| % of matmul peak | peak RSS MB |')
    print('|---|---|---|---|---|---|---|---|---|')
    sdpa_forward = videomae.Attention.forward
    for size in args.sizes:
        for precision in args.precisions:
            for attention in ('sdpa', 'explicit'):
                videomae.Attention.forward = (sdpa_forward if attention == 'sdpa'
                                              else explicit_attention)
                torch.manual_seed(0)
                peak_rss_reset()
                net = videomae.build_pretrain(size, img_size=S, num_frames=T).to(device)
                sec = timed(pretrain_step_fn(net, B, T, S, ratio, precision, device), args.repeats)
                flops = pretrain_flops(net.config, T, S, ratio, B)
                rate = flops / sec / 1e9
                frac = f'{100 * rate / peaks[precision]:.0f}%' if precision in peaks else ''
                mem = f'{peak_rss_mb():.0f}' if device.type == 'cpu' else \
                    f'{torch.cuda.max_memory_allocated() / 2**20:.0f} (GPU)'
                print(f'| {size} | {precision} | {attention} | {sec:.3f} | {B / sec:.2f} | '
                      f'{flops / 1e9:.1f} | {rate:.1f} | {frac} | {mem} |', flush=True)
                del net
    videomae.Attention.forward = sdpa_forward
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        net = videomae.build_pretrain(args.sizes[-1], img_size=S, num_frames=T).to(device)
        step = pretrain_step_fn(net, B, T, S, ratio, args.precisions[0], device)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f'\nwhere the time goes ({args.sizes[-1]}, {args.precisions[0]}, SDPA; '
              f'torch.profiler, self CPU time):\n')
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12))
    print(f'\nload average after the run: {", ".join(f"{x:.2f}" for x in os.getloadavg())}')


def bench_train(args):
    """End to end: the real pretrain.py (synthetic recipe: decoding, augmentation, masking, step,
    logging) for a few steps per worker count, read back from its log.jsonl: clips/s and the share
    of the step spent waiting for data; against the model-only step of the same shape."""
    import json
    import sys
    import pretrain
    r = pretrain.RECIPES['synthetic']
    B, T, S = r['batch_size'], r['num_frames'], r['input_size']
    torch.manual_seed(0)
    cfg = {**dict.fromkeys(('tubelet_size', *pretrain.DECODER_KEYS)), 'drop_path': 0.0,
           'use_checkpoint': False, **r}
    net = pretrain.build_model(cfg)
    model_only = timed(pretrain_step_fn(net, B, T, S, r['mask_ratio'], 'fp32', torch.device('cpu')),
                       args.repeats)
    print(f'\n### train: pretrain.py end to end (synthetic recipe: {T}x{S}x{S}, batch {B}, '
          f'real AVI decoding)\n')
    print(f'machine: {machine()}\n')
    print('| what | s / step | clips/s | waiting for data |')
    print('|---|---|---|---|')
    print(f'| model step only (no data) | {model_only:.3f} | {B / model_only:.1f} | - |',
          flush=True)
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pretrain.py')
            cmd = [sys.executable, script,
                   '--epochs', '1', '--warmup_epochs', '0',
                   '--max_videos', str(B * (args.steps + 2)),
                   '--num_workers', str(workers), '--output_dir', tmp, '--vis_videos', '1']
            subprocess.run(cmd, check=True, capture_output=True)
            steps = [json.loads(ln) for ln in open(os.path.join(tmp, 'log.jsonl'))]
            # the first two warm up the workers
            steps = [s for s in steps if s['kind'] == 'step'][2:]
            sec = float(np.median([s['step_s'] for s in steps]))
            wait = sum(s['data_wait_s'] for s in steps) / sum(s['step_s'] for s in steps)
            print(f'| pretrain.py, {workers} decoding worker(s) | {sec:.3f} | {B / sec:.1f} | '
                  f'{wait:.0%} |', flush=True)
    print(f'\nload average after the run: {", ".join(f"{x:.2f}" for x in os.getloadavg())}')


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='section', required=True)
    d = sub.add_parser('data', help='decode + augment throughput of data.py against a naive reader')
    d.add_argument('--num_frames', type=int, default=16,
                   help='frames per clip (default 16, Table 9)')
    d.add_argument('--sampling_rate', type=int, default=4,
                   help='temporal stride (default 4, K400/UCF101)')
    d.add_argument('--input_size', type=int, default=224,
                   help='crop size after MultiScaleCrop (default 224)')
    d.add_argument('--repeats', type=int, default=12,
                   help='timed clips per configuration (median; default 12)')
    d.set_defaults(fn=bench_data)
    m = sub.add_parser('model', help='pre-training step time, memory, FLOP efficiency; '
                                     'SDPA vs explicit attention')
    m.add_argument('--sizes', nargs='+', default=['small', 'base'],
                   help='model sizes (default small base)')
    m.add_argument('--precisions', nargs='+', default=['fp32', 'bf16'],
                   help='fp32 and/or bf16 autocast')
    m.add_argument('--num_frames', type=int, default=16, help='frames (default 16)')
    m.add_argument('--input_size', type=int, default=224, help='frame side (default 224)')
    m.add_argument('--mask_ratio', type=float, default=0.9, help='tube mask ratio (default 0.9)')
    m.add_argument('--batch_size', type=int, default=1, help='clips per step (default 1)')
    m.add_argument('--repeats', type=int, default=3,
                   help='timed steps per configuration (median; default 3)')
    m.add_argument('--device', default='cpu', help='cpu or cuda (default cpu)')
    m.add_argument('--profile', action='store_true',
                   help='also print the top ops of one step of the last size')
    m.set_defaults(fn=bench_model)
    t = sub.add_parser('train', help='pretrain.py end to end on the synthetic recipe: clips/s, '
                                     'data wait share')
    t.add_argument('--workers', type=int, nargs='+', default=[0, 2],
                   help='decoding workers to try (default 0 2)')
    t.add_argument('--steps', type=int, default=10, help='steps per run (default 10)')
    t.add_argument('--repeats', type=int, default=5, help='timed model-only steps (default 5)')
    t.set_defaults(fn=bench_train)
    args = p.parse_args()
    args.fn(args)


if __name__ == '__main__':
    main()
