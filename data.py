"""Video data for VideoMAE: video files on disk -> uint8 clips and labels. Six steps: 1. decoding
(exactly the frames asked for); 2. temporal sampling (appendix B); 3. spatial augmentation of
uint8 (T, 3, H, W) clips and the test views; 4. VideoDataset (one decode a video; unreadable ones
replaced and counted); 5. make_loader (augmentation a pure function of (seed, epoch, index),
whatever the workers, rank or resume point); 6. the dataset readers, in the layouts users
download (load_split). Clips stay uint8 on the host; stages normalize() them on the device."""
import atexit
import contextlib
import csv
import json
import multiprocessing
import os
import signal
import warnings
from fractions import Fraction

import av
import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms as T1
import torchvision.transforms.v2 as T2
import torchvision.transforms.v2.functional as TF

import synthetic

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIDEO_EXTS = ('.mp4', '.avi', '.mkv', '.webm', '.mov')


class DataError(ValueError):
    """Bad user data, named with the fix; utils.main prints it as one line `error: <message>`."""
    user_error = True


# -- 1. Decoding -----------------------------------------------------------------------------------
class VideoDecodeError(RuntimeError):
    """A video that cannot be opened, has no video stream, or has fewer frames than needed."""


def _open(path, threads=1):
    """-> (container, stream, fps, frame count): the header's, else duration x fps (WebM/MKV
    have none); an estimate, as AVI headers can claim more frames than the file holds."""
    try:
        container = av.open(path)
    except Exception as e:  # FileNotFoundError, av.InvalidDataError, ...
        raise VideoDecodeError(f'{path}: cannot be opened by PyAV ({type(e).__name__}: {e})') from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f'{path}: has no video stream')
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'  # 1 thread: the workers are the parallelism; FFmpeg's own (0),
    stream.codec_context.thread_count = threads  # started per open, cost 1.2-2.3x (bench.py data)
    fps = stream.average_rate or stream.guessed_rate or stream.base_rate or Fraction(25)
    seconds = (stream.duration * stream.time_base if stream.duration
               else container.duration / av.time_base)
    return container, stream, fps, stream.frames or max(1, round(float(seconds * fps)))


def _decode_wanted(container, stream, wanted, fps, seek):
    """Decode the sorted unique frame indices `wanted` -> {index: (H, W, 3) uint8}. seek=True jumps
    to the keyframe before wanted[0] and names frames by pts; None where that cannot be trusted (no
    pts, a seek past the window, pts that disagree with counting): then count from the start."""
    tb, start, per_pts = stream.time_base, stream.start_time or 0, float(stream.time_base * fps)
    if seek:  # half a frame early, so that rounding never puts the target after the wanted frame
        target = start + int((wanted[0] - 0.5) / float(fps) / float(tb))
        container.seek(max(target, start), backward=True, any_frame=False, stream=stream)
    out, want, idx = {}, set(wanted), None if seek else 0
    for frame in container.decode(stream):
        if seek:
            if frame.pts is None:
                return None
            pts_idx = round((frame.pts - start) * per_pts)  # a float: Fraction maths was slow
            if (pts_idx > wanted[0]) if idx is None else (pts_idx != idx):
                return None  # the seek overshot, or variable frame rate / broken pts
            idx = pts_idx
        if idx in want:  # RGB only for kept frames, on one swscale thread (FFmpeg's default starts
            # a thread pool per frame: 3/4 of a 64x64 conversion); the workers are the parallelism
            out[idx] = frame.to_ndarray(format='rgb24', threads=1)
            if len(out) == len(want):
                break  # stop after the last wanted frame
        idx += 1
    else:  # the video ended before the last wanted frame: keep its last frame under its own index
        if idx and idx - 1 not in out:
            out[idx - 1] = frame.to_ndarray(format='rgb24', threads=1)
    return out


def decode_frames(path, indices, *, threads=1, tail_slack=0):
    """Frames `indices` (0-based, display order, repeats allowed; or a function of the frame count
    estimate returning them: one open a video) of `path` -> uint8 (len, H, W, 3) RGB. Indices up to
    `tail_slack` past the real end get the last frame; other failures raise VideoDecodeError."""
    container, stream, fps, num = _open(path, threads)
    try:
        indices = [int(i) for i in (indices(num) if callable(indices) else indices)]
        wanted = sorted(set(indices))
        got = None
        if wanted[0] > 0:  # seeking pays only past the first keyframe; try it, verify, else count
            with contextlib.suppress(av.FFmpegError):
                got = _decode_wanted(container, stream, wanted, fps, seek=True)
            if got is None:  # re-opened: a failed seek can leave the demuxer anywhere
                container.close()
                container, stream, _, _ = _open(path, threads)
        got = _decode_wanted(container, stream, wanted, fps, seek=False) if got is None else got
    except Exception as e:
        raise VideoDecodeError(f'{path}: decoding failed ({type(e).__name__}: {e})') from e
    finally:
        container.close()
    if not got:
        raise VideoDecodeError(f'{path}: no frame could be decoded (header claims {num} frames)')
    last = max(got)  # the last frame of the video when decoding ran to the end
    missing = [i for i in wanted if i not in got]
    if missing and (min(missing) < last or max(missing) - last > tail_slack):
        raise VideoDecodeError(f'{path}: has fewer frames than claimed: frame {max(missing)} '
                               f'asked, decoding ended after frame {last} (header says {num})')
    got.update({i: got[last] for i in missing})  # within tail_slack: the last frame stands in
    return torch.from_numpy(np.stack([got[i] for i in indices]))


def video_info(path):
    """(frame count estimate, fps, height, width) from the header, without decoding."""
    container, stream, fps, num = _open(path, 1)
    with container:
        return num, float(fps), stream.height, stream.width


# -- 2. Temporal sampling (appendix B) -------------------------------------------------------------
# Random draws come from torch's global RNG, which __getitem__ seeds from (seed, epoch, index).
def dense_indices(num_frames, T, stride, *, random=True, clips=1):
    """Dense sampling (K400, UCF101, HMDB51; all pre-training): T frames `stride` apart. Train:
    start ~ U{0..F - T*stride} (fine-tuning too, so both see one temporal scale). Test: `clips`
    windows evenly spread (1 = the centre). Past the end, the last frame. -> `clips` lists of T."""
    max_start = max(num_frames - T * stride, 0)
    if random:
        starts = [int(torch.randint(0, max_start + 1, ()).item()) for _ in range(clips)]
    else:  # evenly spread; one clip: the centre
        starts = ([max_start // 2] if clips == 1 else
                  [int(round(c * max_start / (clips - 1))) for c in range(clips)])
    return [[min(s + k * stride, num_frames - 1) for k in range(T)] for s in starts]


def segment_indices(num_frames, T, *, random=True, clips=1):
    """TSN sampling (SSv2 fine-tuning): T equal segments, a random frame of each in training; at
    test, clip c takes the frame at fraction (c + 0.5) / clips of every segment (1 clip = the
    middles; the official 2-clip test takes fractions 0 and 0.5, not 0.25 and 0.75)."""
    tick, out = num_frames / T, []
    for c in range(clips):
        if random:
            lo = [int(tick * k) for k in range(T)]
            hi = [max(int(tick * (k + 1)), lo[k] + 1) for k in range(T)]
            idx = [int(torch.randint(a, b, ()).item()) for a, b in zip(lo, hi)]
        else:
            idx = [int(tick * (k + (c + 0.5) / clips)) for k in range(T)]
        out.append([min(i, num_frames - 1) for i in idx])
    return out


# -- 3. Spatial augmentation of uint8 clips (T, 3, H, W) -------------------------------------------
# The same box and ops hit every frame of a clip; crop first, then one resize of the whole clip.
def multiscale_crop_box(H, W, size, scales=(1, .875, .75, .66), max_distort=1):
    """GroupMultiScaleCrop(size, scales, max_distort=1, fix_crop=True, more_fix_crop=True) of the
    official pre-training: sides int(short * scale) (within 3 px of `size` -> size), (w, h) pairs
    whose scale indices differ by <= max_distort, at one of 13 fixed offsets: (top, left, h, w)."""
    sides = [int(min(H, W) * s) for s in scales]
    sides = [size if abs(x - size) < 3 else x for x in sides]
    pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides)
             if abs(i - j) <= max_distort]
    cw, ch = pairs[int(torch.randint(0, len(pairs), ()))]
    cw, ch = min(cw, W), min(ch, H)  # snapping can exceed a frame smaller than `size`
    ws, hs = (W - cw) // 4, (H - ch) // 4
    offsets = [(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs),  # corners, mid
               (0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0),            # edges
               (ws, hs), (3 * ws, hs), (ws, 3 * hs), (3 * ws, 3 * hs)]                  # quarters
    x, y = offsets[int(torch.randint(0, len(offsets), ()))]
    return y, x, ch, cw


def train_augment(clip, size, *, crop='multiscale', flip=False, randaug=None, random_erasing=0.0):
    """One training view, uint8 (T, 3, H, W) -> (T, 3, size, size). crop: 'multiscale' (pre-train,
    linear probing), 'resized' (fine-tuning: RandomResizedCrop area (0.08, 1), ratio (3/4, 4/3)) or
    'center' (synthetic pre-training: a random scale would change a clip's apparent speed). Then
    RandAugment (2 ops at magnitude ~ N(m, std) clipped to [0, 10] per clip, timm's m/10 as 101
    bins; after the resize, to skip a full-size pass), flip, and random erasing as the official
    fine-tuning ('pixel' mode, cube=True): with probability random_erasing one box (area U(.02,
    1/3), aspect log-U(.3, 3.3)) of every frame gets noise, N(0, 1) in ImageNet-normalised space."""
    H, W = clip.shape[-2:]
    if crop == 'multiscale':
        i, j, h, w = multiscale_crop_box(H, W, size)
    elif crop == 'resized':
        i, j, h, w = T1.RandomResizedCrop.get_params(clip[0], scale=(0.08, 1.0),
                                                     ratio=(3 / 4, 4 / 3))
    elif crop == 'center':
        i, j, h, w = (H - min(H, W)) // 2, (W - min(H, W)) // 2, min(H, W), min(H, W)
    else:
        raise ValueError(f"crop must be 'multiscale', 'resized' or 'center', got {crop!r}")
    clip = TF.resize(clip[..., i:i + h, j:j + w], [size, size], antialias=True)  # bilinear, once
    if randaug is not None:
        mag = float(torch.clamp(randaug[0] + randaug[1] * torch.randn(()), 0, 10))
        clip = T2.RandAugment(num_ops=2, magnitude=round(mag * 10), num_magnitude_bins=101,
                              fill=128)(clip)
    if flip and torch.rand(()).item() < 0.5:
        clip = clip.flip(-1)
    if random_erasing > 0 and torch.rand(()).item() < random_erasing:
        i, j, h, w, _ = T1.RandomErasing.get_params(clip[0].float(), scale=(0.02, 1 / 3),
                                                    ratio=(0.3, 3.3), value=[0.0])
        noise = torch.randn(clip.shape[0], 3, h, w) * torch.tensor(IMAGENET_STD).view(3, 1, 1)
        noise = (noise + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) * 255  # (T, 3, h, w)
        clip = clip.clone()
        clip[..., i:i + h, j:j + w] = noise.round().clamp(0, 255).to(torch.uint8)
    return clip


def test_views(clip, size, short_side, crops):
    """(T, 3, H, W) -> `crops` views (T, 3, size, size): the short side resized to `short_side`,
    squares spread along the long side (left/centre/right or top/centre/bottom)."""
    H, W = clip.shape[-2:]
    long = max(short_side, int(short_side * max(H, W) / min(H, W)))
    nh, nw = (short_side, long) if H <= W else (long, short_side)
    if (nh, nw) != (H, W):
        clip = TF.resize(clip, [nh, nw], antialias=True)
    long_free, short_free = max(nh, nw) - size, min(nh, nw) - size
    out = []
    for c in range(crops):
        a = int(round(c * long_free / (crops - 1))) if crops > 1 else long_free // 2
        y, x = (short_free // 2, a) if H <= W else (a, short_free // 2)
        out.append(clip[..., y:y + size, x:x + size])
    return out


def normalize(video):
    """uint8 (..., 3, T, H, W) on any device -> float32 ImageNet-normalised, same shape."""
    mean = torch.tensor(IMAGENET_MEAN, device=video.device).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=video.device).view(3, 1, 1, 1)
    return (video.float() / 255 - mean) / std


# -- 4. Dataset ------------------------------------------------------------------------------------
def item_seed(seed, epoch, index):
    """The seed of one item's augmentation: a pure function of (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class VideoDataset(torch.utils.data.Dataset):
    """samples: list of (path, label); mode: 'train', 'val' or 'test'; sampling: 'dense' or
    'segment'. Items, indexed by int or by the sampler's (index, epoch): dict(video=uint8
    (V, 3, T, S, S), label, index, failed='\\n'-joined paths of the unreadable videos replaced)."""

    def __init__(self, samples, *, mode, num_frames=16, sampling_rate=4, sampling='dense',
                 input_size=224, crop='multiscale', flip=False, randaug=None, random_erasing=0.0,
                 num_sample=1, test_clips=5, test_crops=3, short_side=None, seed=0, max_retries=10):
        self.samples, self.mode, self.seed = list(samples), mode, seed
        self.T, self.stride, self.sampling = num_frames, sampling_rate, sampling
        self.size, self.crop, self.flip, self.randaug = input_size, crop, flip, randaug
        self.random_erasing, self.max_retries = random_erasing, max_retries
        self.clips = {'train': num_sample, 'val': 1, 'test': test_clips}[mode]
        self.crops, self.short_side = test_crops if mode == 'test' else 1, short_side or input_size

    def __len__(self):
        return len(self.samples)

    def _load(self, path):
        """One decode -> (V, 3, T, S, S). In train its num_sample clips share the temporal window
        (the official repeated augmentation: only the spatial draws differ)."""
        train = self.mode == 'train'

        def choose(n):  # called once the frame count is known, so a video is opened once
            kw = dict(random=train, clips=1 if train else self.clips)
            clips = (dense_indices(n, self.T, self.stride, **kw) if self.sampling == 'dense'
                     else segment_indices(n, self.T, **kw))
            return [i for c in clips * (self.clips if train else 1) for i in c]

        views = []
        for clip in decode_frames(path, choose, tail_slack=3).permute(0, 3, 1, 2).split(self.T):
            if train:  # clip: (T, 3, H, W)
                views += [train_augment(clip, self.size, crop=self.crop, flip=self.flip,
                                        randaug=self.randaug, random_erasing=self.random_erasing)]
            else:
                views += test_views(clip, self.size, self.short_side, self.crops)
        return torch.stack(views).permute(0, 2, 1, 3, 4).contiguous()  # (V, 3, T, S, S)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, (tuple, list)) else (key, 0)
        failed, idx = [], index
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue CUDA's, with a stack trace
            torch.default_generator.manual_seed(item_seed(self.seed, epoch, index))
            for _ in range(self.max_retries + 1):
                path, label = self.samples[idx]
                try:
                    return dict(video=self._load(path), label=int(label), index=int(index),
                                failed='\n'.join(failed))
                except VideoDecodeError as e:
                    warnings.warn(f'skipping unreadable video (replaced by another sample): {e}')
                    failed.append(path)  # the replacement, too, is a function of the seed:
                    idx = int(torch.randint(0, len(self.samples), ()).item())
        raise DataError(f'{len(failed)} videos in a row could not be decoded, e.g. {failed[0]}: '
                        'check --data_path and the files (re-download or re-encode them)')


class FailureLog:
    """Counts the unreadable videos of an epoch: update(batch['failed']) per batch, end_epoch(
    num_seen) at its end, which stops the run past max_ratio (the flag --max_failed_ratio)."""

    def __init__(self, max_ratio=0.05):
        self.max_ratio, self.paths = max_ratio, []

    def update(self, failed):  # per item, the '\n'-joined paths of the videos replaced
        self.paths += [p for f in failed for p in f.split('\n') if p]

    def end_epoch(self, num_seen):
        paths, self.paths = self.paths, []
        if not paths:
            return 0
        share = len(paths) / max(num_seen, 1)
        msg = (f'{len(paths)} unreadable video(s) replaced this epoch ({share:.1%} of {num_seen} '
               f'samples, e.g. {", ".join(sorted(set(paths))[:5])})')
        if share > self.max_ratio:
            raise DataError(f'{msg}, more than --max_failed_ratio {self.max_ratio:g}: check '
                            '--data_path and the files (re-download or re-encode them), or raise '
                            '--max_failed_ratio')
        print(msg)
        return len(paths)


# -- 5. Loader -------------------------------------------------------------------------------------
class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (one replica without torch.distributed) yielding (index, epoch);
    set_epoch(epoch, skip) drops the first `skip` samples of this rank's epoch (to resume)."""

    def __init__(self, dataset, *, shuffle, seed=0):
        ddp = dist.is_available() and dist.is_initialized()
        super().__init__(dataset, num_replicas=dist.get_world_size() if ddp else 1,
                         rank=dist.get_rank() if ddp else 0, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter([(i, self.epoch) for i in list(super().__iter__())[self.skip:]])

    def __len__(self):
        return max(self.num_samples - self.skip, 0)


def _worker_init(_):
    torch.set_num_threads(1)  # each worker one op thread: the workers are the parallelism
    # SIGTERM/Ctrl-C to the whole job (SLURM, a terminal) is the main process's: it saves, then
    # stops the workers (had they died first, it would crash)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@atexit.register  # workers alive at exit (after a crash) ignore multiprocessing's SIGTERM: no hang
def _stop_workers():
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would call them failures
    for p in multiprocessing.active_children():
        if p.daemon:  # a DataLoader worker; others are joined, as multiprocessing does
            p.kill()


def make_loader(dataset, batch_size, *, train, num_workers, seed=0, collate_fn=None):
    """DataLoader over an EpochSampler (shuffled, last partial batch dropped when train): batches
    of video (B, V, 3, T, S, S) uint8, label (B,), index (B,), failed. Its own generator draws the
    workers' seeds: from the global RNG, the draw would shift all later drop path on resume."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=EpochSampler(dataset, shuffle=train, seed=seed),
        num_workers=num_workers, pin_memory=torch.cuda.is_available(), drop_last=train,
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None,
        worker_init_fn=_worker_init if num_workers else None, collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed))


# -- 6. Dataset readers, in the layouts users download (README, "Datasets") ------------------------
# Each finds its annotation file and returns (samples [(video path, label)], classes, that file).
def _lines(path):
    with open(path, encoding='utf-8-sig') as f:  # strips a BOM; strip() below handles CRLF
        return [ln.strip() for ln in f if ln.strip()]


def _find(what, hint, *candidates):  # the first that exists, else a DataError naming all + hint
    for c in candidates:
        if os.path.exists(c):
            return c
    raise DataError(f'{what} not found (looked for {", ".join(candidates)}): {hint}')


def _videos(folder):  # {file stem: path} of the videos under `folder`, flat or in sub-folders
    return {os.path.splitext(f)[0]: os.path.join(d, f) for d, _, files in
            os.walk(folder, followlinks=True) for f in files if f.lower().endswith(VIDEO_EXTS)}


def _load_ucf101(root, split, fold):  # root holds UCF-101/ and ucfTrainTestlist/, or is UCF-101/
    vids = _find('', '', *(os.path.join(root, d) for d in ('UCF-101', 'UCF101', 'videos')), root)
    cls_file = _find('UCF101 classInd.txt', 'unpack UCF101TrainTestSplits-RecognitionTask.zip '
                     'next to UCF-101/', *(os.path.join(d, 'ucfTrainTestlist', 'classInd.txt')
                                           for d in (vids, os.path.dirname(os.path.abspath(vids)))))
    classes = [ln.split()[1] for ln in _lines(cls_file)]  # in classInd order: label = index - 1
    name = ('trainlist' if split == 'train' else 'testlist') + f'{fold:02d}.txt'
    split_file = _find(f'UCF101 split file {name}', 'use --fold 1, 2 or 3',
                       os.path.join(os.path.dirname(cls_file), name))
    # HandstandPushups/ holds v_HandStandPushups_*, renamed on some mirrors: match case-blind
    on_disk = {stem.lower(): p for stem, p in _videos(vids).items()}
    samples = []
    for ln in _lines(split_file):  # 'Class/v_Class_g08_c01.avi 1' (train) or without the label;
        # also 'UCF-101/Class/...' or 'Class\\v_...': the last two components count
        cls, fname = ([''] + ln.split()[0].replace('\\', '/').split('/'))[-2:]
        stem = os.path.splitext(fname)[0]
        if cls not in classes:
            raise DataError(f'{split_file}: class {cls!r} of line {ln!r} is not in {cls_file}: '
                            'use the classInd.txt that came with the split lists')
        samples.append((on_disk.get(stem.lower(), os.path.join(vids, cls, fname)),
                        classes.index(cls)))
    return samples, classes, split_file


def _load_hmdb51(root, split, fold):  # testTrainMulti_7030_splits/ in root or beside it; the
    lists = _find('HMDB51 split folder', 'unpack test_train_splits.rar into --data_path', *(
        os.path.join(d, 'testTrainMulti_7030_splits')  # class folders in root, hmdb51_org/ or
        for d in (root, os.path.dirname(os.path.abspath(root)))))  # videos/
    vids = _find('', '', *(os.path.join(root, d) for d in ('hmdb51_org', 'videos')), root)
    suffix = f'_test_split{fold}.txt'
    classes = sorted(f[:-len(suffix)] for f in os.listdir(lists) if f.endswith(suffix))
    tag = '1' if split == 'train' else '2'  # lines '<file> <tag>': 1 train, 2 test, 0 unused
    samples = [(os.path.join(vids, cls, name), label) for label, cls in enumerate(classes)
               for name, t in map(str.split, _lines(os.path.join(lists, cls + suffix))) if t == tag]
    return samples, classes, os.path.join(lists, f'<class>{suffix}')


def _load_k400(root, split, _fold):
    def read(path):  # -> [label, youtube_id, time_start, time_end] rows, quoted or not: by name
        with open(path, newline='', encoding='utf-8-sig') as f:  # under a header, else 4 to 6
            rows = [[c.strip() for c in r] for r in csv.reader(f) if r]  # columns in this order
        cols = ['label', 'youtube_id', 'time_start', 'time_end']
        head = rows[0] if rows and 'youtube_id' in rows[0] else cols
        if set(cols) - set(head):
            raise DataError(f'{path}: no column {sorted(set(cols) - set(head))} in header {head}')
        body, at = rows[head is not cols:], [head.index(c) for c in cols]
        for r in body:  # a short row, or times that are not numbers
            if len(r) <= max(at) or not (r[at[2]] + r[at[3]]).replace('.', '').isdigit():
                raise DataError(f'{path}: row {r} is not {",".join(head)}: fix or remove it')
        return [[r[i] for i in at] for r in body]
    dirs = [os.path.join(root, d) for d in ('annotations', 'kinetics400', '')]
    hint = ("put the CSVs (label,youtube_id,time_start,time_end,split) in <data_path>/annotations/;"
            " 'test' reads the validation CSV, as the official code")
    names = ['train.csv'] if split == 'train' else ['validate.csv', 'val.csv']
    ann = _find(f'Kinetics {names[0]}', hint, *(os.path.join(d, n) for d in dirs for n in names))
    rows = read(ann)  # the classes: train.csv's labels, else (val, no train.csv) the val CSV's
    train_csv = _find('', '', *(os.path.join(d, 'train.csv') for d in dirs), ann)
    classes = sorted({r[0] for r in (rows if ann == train_csv else read(train_csv))})
    label_of = {c: i for i, c in enumerate(classes)}
    vroot = _find('', '', *(os.path.join(root, d) for d in (  # else flat in root (OpenDataLab)
        ['train'] if split == 'train' else ['val', 'validate', 'valid'])), root)
    index = _videos(vroot)  # <youtube_id>_<start:06d>_<end:06d> or (OpenDataLab) <youtube_id>
    by_id = {stem[:11]: p for stem, p in index.items()}
    samples = []
    for label, yid, t0, t1 in rows:
        if label not in label_of:
            raise DataError(f'{ann}: label {label!r} (youtube id {yid}) is not a class of '
                            f'{train_csv}: use the CSVs of one Kinetics-400 release')
        key = f'{yid}_{int(float(t0)):06d}_{int(float(t1)):06d}'
        p = index.get(key) or by_id.get(yid) or os.path.join(vroot, key + '.mp4')
        samples.append((p, label_of[label]))
    return samples, classes, ann


def _load_ssv2(root, split, _fold):
    def find(name):  # in labels/ or root, as released or with the old 20BN names
        return _find(f'SSv2 {name}', 'unpack the SSv2 labels archive into <data_path>/labels/',
                     *(os.path.join(root, d, pre + name) for d in ('labels', '')
                       for pre in ('', 'something-something-v2-')))
    with open(labels := find('labels.json')) as f:
        label_of = {k: int(v) for k, v in json.load(f).items()}  # template without [ ] -> index
    name_of = {i: k for k, i in label_of.items()}
    classes = [name_of.get(i, f'<unused {i}>') for i in range(max(name_of) + 1)]
    with open(ann := find('train.json' if split == 'train' else 'validation.json')) as f:
        entries = json.load(f)
    vids = os.path.join(root, '20bn-something-something-v2')
    index = _videos(vids)  # <id>.webm as downloaded, or a converted copy (DATASET.md: to .mp4)
    samples = []
    for e in entries:
        name = e['template'].replace('[', '').replace(']', '')
        if name not in label_of:
            raise DataError(f'{ann}: template {e["template"]!r} of video {e["id"]} gives '
                            f'{name!r}, not a key of {labels}: use the labels of one release')
        samples.append((index.get(e['id'], os.path.join(vids, e['id'] + '.webm')), label_of[name]))
    return samples, classes, ann


def _load_list(path, split, _fold):  # official list files: '<video path> <label>' lines, paths
    # relative to the list's folder; path: one, or the folder of train.csv, val.csv and test.csv
    if os.path.isdir(path):
        names = [f'{split}.csv'] + (['test.csv'] if split == 'val' else [])
        path = _find(f'list file {split}.csv', 'write one "<video path> <integer label>" a line',
                     *(os.path.join(path, n) for n in names))
    samples = []
    for n, ln in enumerate(_lines(path), 1):
        parts = ln.rsplit(None, 1)  # lenient: the official readers need exactly one space
        if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
            raise DataError(f'{path}:{n}: expected "<video path> <integer label>", got {ln!r}')
        samples.append((os.path.join(os.path.dirname(os.path.abspath(path)), parts[0]),
                        int(parts[1])))
    return samples, [str(i) for i in range(max((y for _, y in samples), default=-1) + 1)], path


def _load_folder(root, split, _fold):  # ImageFolder's layout: root/{train,val|test}/<class>/
    hint = 'make one sub-folder of videos per class in <data_path>/train/ and val/ (or test/)'
    sub = lambda x: sorted(c for c in next(os.walk(x), (x, []))[1] if c[0] != '.')  # not .git/
    classes = sub(train := _find('folder train/', hint, os.path.join(root, 'train')))
    d = train if split == 'train' else _find('folder val/ or test/', hint,
                                             *(os.path.join(root, s) for s in ('val', 'test')))
    if not classes or not sub(d):
        raise DataError(f'{d if classes else train}: no class sub-folders in it: {hint}')
    samples, skipped, exts = [], [], '/'.join(VIDEO_EXTS)
    for c, cd in ((c, os.path.join(d, c)) for c in sub(d)):
        files = sorted(os.path.join(w, f) for w, _, fs in os.walk(cd, followlinks=True)
                       for f in fs if not f.startswith('.'))  # .DS_Store, ._clip.mp4 (macOS)
        vids = [f for f in files if f.lower().endswith(VIDEO_EXTS)]
        if c not in classes or not vids:
            raise DataError(f'{cd}: ' + (f'no video file ({exts}) in this class folder (its files: '
                            f'{files[:3] or "none"}): add videos or remove it' if c in classes else
                            f'class {c!r} is not in {train}: rename it or add {c}/ there'))
        samples += zip(vids, [classes.index(c)] * len(vids))
        skipped += sorted(set(files) - set(vids))
    if skipped:
        warnings.warn(f'{d}: skipping {len(skipped)} file(s) not ending in {exts}: {skipped[:3]}')
    return samples, classes, d


def load_split(dataset, data_path, split, fold=1):
    """-> (samples [(path, label)] of the videos on disk, classes [name]). split: train, val or test
    (the same where a dataset has one evaluation split)."""
    readers = dict(ucf101=_load_ucf101, hmdb51=_load_hmdb51, k400=_load_k400, ssv2=_load_ssv2,
                   list=_load_list, folder=_load_folder)
    if split not in ('train', 'val', 'test'):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if dataset == 'synthetic':  # the built-in motion set, in the UCF101 layout
        dataset, data_path = 'ucf101', data_path or synthetic.ensure_motion()
    if dataset not in readers:
        raise ValueError(f'unknown dataset {dataset!r}; choose from synthetic, '
                         + ', '.join(readers))
    if data_path is None or not os.path.exists(data_path):
        raise DataError(f'--data_path {data_path!r} does not exist (dataset {dataset}): give the '
                        'folder the dataset was unpacked into')
    samples, classes, ann = readers[dataset](data_path, split, fold)
    if not samples:
        raise DataError(f'{ann}: the {split} split of {dataset} (fold {fold}) is empty: check the '
                        'annotation file and --fold')
    # a few % of K400 is missing in every copy: leave those out and say so; none on disk is an error
    missing = [p for p, _ in samples if not os.path.isfile(p)]
    if len(missing) == len(samples):
        raise DataError(f'none of the {len(samples)} videos listed in {ann} exists, e.g. '
                        f'{missing[0]}: check --data_path')
    if missing:
        warnings.warn(f'{dataset}: {len(missing)} of {len(samples)} clips listed in {ann} are '
                      f'missing and left out, e.g. {missing[:3]}')
    gone = set(missing)
    return [s for s in samples if s[0] not in gone], classes
