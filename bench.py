"""Benchmarks, one subcommand per part of the pipeline: `python bench.py data` (more sections, e.g. model,
train, are added as further subcommands with the same timing helper). Prints markdown tables for README.

data: decode + augment clips/s of ONE worker (one process, one op thread) on generated Kinetics-like
(340x256 H.264 MP4, 10 s at 30 fps, keyframe every 250 frames) and UCF101-like (320x240 MPEG-4 AVI, 25 fps,
7 s) videos: our reader (seek to the keyframe before the window, stop after it, RGB only for kept frames)
against the naive one (decode every frame from the start and convert each to RGB, as
torchvision.io.read_video did), and with k = 1, 2, 4 augmented clips per decode (repeated augmentation).
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
    """Run fn() warmup + n times; -> seconds per call (median of the n calls: robust to a shared machine)."""
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
        model = next(ln.split(':', 1)[1].strip() for ln in subprocess.run(['lscpu'], capture_output=True,
                     text=True).stdout.splitlines() if ln.startswith('Model name'))
    except Exception:
        model = platform.processor() or 'unknown CPU'
    load = ', '.join(f'{x:.2f}' for x in os.getloadavg())
    return f'{model}, {os.cpu_count()} cores, load average {load} (1/5/15 min)'


# ------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------
def _moving_texture(n, h, w, seed=0):
    """Textured frames with global and local motion, so the encoders produce realistic P/B frames."""
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
    """Decode every frame from the start and convert each to RGB, then pick (torchvision.io.read_video)."""
    import av
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = 'AUTO'
        frames = [f.to_ndarray(format='rgb24') for f in c.decode(s)]
    return torch.from_numpy(np.stack([frames[min(i, len(frames) - 1)] for i in indices]))


def bench_data(args):
    import data
    torch.set_num_threads(1)  # one DataLoader worker = one op thread (make_loader's worker_init does this)
    T, stride, size = args.num_frames, args.sampling_rate, args.input_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        videos = {
            'Kinetics-like 340x256 H.264 MP4, 30 fps, 10 s, GOP 250': (os.path.join(tmp, 'k400.mp4'), 300, 256, 340, 30, 250),
            'UCF101-like 320x240 MPEG-4 AVI, 25 fps, 7 s, GOP 12': (os.path.join(tmp, 'ucf.avi'), 175, 240, 320, 25, 12),
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
            for label, reader in (('naive', naive_read), ('ours', data.decode_frames),
                                  ('ours, 1 decode thread', lambda p, i: data.decode_frames(p, i, threads=1))):
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
    print(f'\n### data: decode + augment, one worker ({T} frames at stride {stride}, MultiScaleCrop to {size})\n')
    print(f'machine: {machine()}\n')
    print('| video | reader | clips per decode (k) | ms per decode+augment | clips/s |')
    print('|---|---|---|---|---|')
    for name, label, k, ms, cps in rows:
        ms = f'{ms:.1f}' if ms != '' else ''
        cps = f'{cps:.1f}' if cps != '' else ''
        print(f'| {name} | {label} | {k} | {ms} | {cps} |')
    print(f'\nload average after the run: {", ".join(f"{x:.2f}" for x in os.getloadavg())}')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='section', required=True)
    d = sub.add_parser('data', help='decode + augment throughput of data.py against a naive reader')
    d.add_argument('--num_frames', type=int, default=16, help='frames per clip (default 16, Table 9)')
    d.add_argument('--sampling_rate', type=int, default=4, help='temporal stride (default 4, K400/UCF101)')
    d.add_argument('--input_size', type=int, default=224, help='crop size after MultiScaleCrop (default 224)')
    d.add_argument('--repeats', type=int, default=12, help='timed clips per configuration (median; default 12)')
    d.set_defaults(fn=bench_data)
    args = p.parse_args()
    args.fn(args)


if __name__ == '__main__':
    main()
