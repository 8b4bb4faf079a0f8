"""Video data for VideoMAE: from a real video file on disk to uint8 clips and labels.

Read top to bottom:
  1. decoding (PyAV): decode_frames() returns exactly the frames asked for, seeking to the keyframe
     before the window and converting to RGB only the frames that are kept;
  2. temporal sampling (appendix B): dense (K400/UCF101/HMDB51, pre-training), TSN segments (SSv2);
  3. spatial augmentation on uint8 (T, 3, H, W) tensors: MultiScaleCrop, RandomResizedCrop, flip,
     RandAugment, random erasing, and the multi-view test crops;
  4. VideoDataset: one decode per video, num_sample augmented clips (repeated augmentation),
     unreadable videos replaced, counted and reported (FailureLog);
  5. make_loader: a DistributedSampler that hands (index, epoch) to the dataset, so augmentation is
     a pure function of (seed, epoch, index), whatever the worker count, rank or resume point;
  6. dataset readers in the layouts users download (load_split).
The generated datasets live in synthetic.py, written as real files that these readers read.
Everything stays uint8 on the host; stages call normalize() after moving the batch to the device.
Only torch, torchvision, av and numpy: no decord, no PIL paths.
"""
import csv
import json
import os
import re
import warnings
from fractions import Fraction

import av
import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms as T1
import torchvision.transforms.v2 as T2
import torchvision.transforms.v2.functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIDEO_EXTS = ('.mp4', '.avi', '.mkv', '.webm', '.mov')


# --------------------------------------------------------------------------------------------------
# 1. Decoding
# --------------------------------------------------------------------------------------------------
class VideoDecodeError(RuntimeError):
    """A video that cannot be opened, has no video stream, or has fewer frames than needed."""


def _frame_count(container, stream, fps):
    """Frame count from the header, else duration x fps (WebM/MKV record no count). An estimate:
    AVI headers can claim more frames than the file holds; the decoder checks (tail_slack)."""
    if stream.frames > 0:
        return stream.frames
    if stream.duration and stream.time_base:
        return max(1, round(float(stream.duration * stream.time_base * fps)))
    if container.duration:
        return max(1, round(container.duration / av.time_base * float(fps)))
    return sum(1 for p in container.demux(stream) if p.size)  # last resort: count packets


def _open(path, threads):
    if not os.path.isfile(path):
        raise VideoDecodeError(f'{path}: no such file')
    try:
        container = av.open(path)
    except Exception as e:  # av raises InvalidDataError, OSError subclasses, ...
        raise VideoDecodeError(f'{path}: cannot be opened by PyAV ({type(e).__name__}: {e})') from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f'{path}: has no video stream')
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'                  # frame + slice threads inside FFmpeg
    stream.codec_context.thread_count = threads  # 0 = FFmpeg chooses
    return container, stream


def _decode_wanted(container, stream, wanted, fps, seek):
    """Decode the sorted unique frame indices `wanted` -> {index: (H, W, 3) uint8}.
    seek=True jumps to the keyframe before wanted[0] and names frames by their pts; it returns None
    where that cannot be trusted (no pts, a seek past the window, pts that disagree with counting),
    and the caller decodes from the start, counting frames (safe for AVI/WebM, odd timestamps)."""
    tb, start = stream.time_base, stream.start_time or 0
    if seek:
        if not tb or not fps:
            return None
        # half a frame early so rounding never puts the target after the wanted frame
        target = start + int((wanted[0] - 0.5) / float(fps) / float(tb))
        container.seek(max(target, start), backward=True, any_frame=False, stream=stream)
    out, want, idx = {}, set(wanted), None if seek else 0
    for frame in container.decode(stream):
        if seek:
            if frame.pts is None:
                return None
            pts_idx = round(float((frame.pts - start) * tb * fps))
            if idx is None and pts_idx > wanted[0]:
                return None  # the seek went past the window: the index lied
            if idx is not None and pts_idx != idx:
                return None  # variable frame rate or broken pts: count from the start instead
            idx = pts_idx
        if idx in want:
            out[idx] = frame.to_ndarray(format='rgb24')  # RGB conversion only for kept frames
            if len(out) == len(want):
                break  # stop after the last wanted frame
        idx += 1
    else:  # the video ended before the last wanted frame: keep its last frame under its own index
        if idx and idx - 1 not in out:
            out[idx - 1] = frame.to_ndarray(format='rgb24')
    return out


def _read(path, choose, *, threads=0, tail_slack=0):
    """Open `path` once, call choose(num_frames_estimate) -> list of indices, decode them.
    -> (frames (U, H, W, 3) uint8 of the unique indices, the position of every asked index in it).
    Indices past the real end within `tail_slack` frames of it get the last frame (frame counts of
    AVI/WebM are estimates, and the official code clamps); further past it is a VideoDecodeError."""
    container, stream = _open(path, threads)
    try:
        fps = stream.average_rate or stream.guessed_rate or stream.base_rate
        num = _frame_count(container, stream, fps or 25)
        indices = [int(i) for i in choose(num)]
        wanted = sorted(set(indices))
        got = None
        if wanted[0] > 0:  # seeking pays only past the first keyframe; try it, verify, else count
            try:
                got = _decode_wanted(container, stream, wanted, fps, seek=True)
            except av.FFmpegError:
                pass
        if got is None:  # from the start, re-opened: a failed seek can leave the demuxer anywhere
            container.close()
            container, stream = _open(path, threads)
            got = _decode_wanted(container, stream, wanted, fps, seek=False)
    except VideoDecodeError:
        raise
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
    for i in missing:  # within tail_slack: the last frame stands in
        got[i] = got[last]
    keys = sorted(got)
    pos_of = {k: p for p, k in enumerate(keys)}
    return torch.from_numpy(np.stack([got[k] for k in keys])), [pos_of[i] for i in indices]


def decode_frames(path, indices, *, threads=0, tail_slack=0):
    """Frames `indices` (0-based, display order, repeats allowed) of the video at `path`
    -> uint8 tensor (len(indices), H, W, 3) RGB. Raises VideoDecodeError naming the file."""
    indices = list(indices)
    frames, pos = _read(path, lambda n: indices, threads=threads, tail_slack=tail_slack)
    return frames[pos]


def video_info(path):
    """(num_frames estimate, fps, height, width) from the header, without decoding."""
    container, stream = _open(path, 1)
    with container:
        fps = stream.average_rate or stream.guessed_rate or 25
        return _frame_count(container, stream, fps), float(fps), stream.height, stream.width


def encode_video(path, frames, fps=25, codec=None, gop=12, bit_rate=None):
    """Write uint8 frames (T, H, W, 3) to `path` with PyAV (fixtures, synthetic data, bench).
    Codec by extension: .avi MPEG-4 Part 2 (XVID tag, as UCF101), .mp4/.mkv H.264, .webm VP9."""
    ext = os.path.splitext(path)[1].lower()
    codec = codec or {'.avi': 'mpeg4', '.webm': 'libvpx-vp9'}.get(ext, 'libx264')
    frames = np.asarray(frames, dtype=np.uint8)
    with av.open(path, 'w') as out:
        s = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = 'yuv420p'
        s.codec_context.gop_size = gop
        if codec == 'mpeg4':
            s.codec_tag = 'XVID'
            s.codec_context.bit_rate = bit_rate or 8 * frames.shape[1] * frames.shape[2] * int(fps)
        elif codec == 'libx264':
            s.options = {'preset': 'veryfast', 'crf': '18', 'keyint_min': str(gop),
                         'sc_threshold': '0'}
        elif codec.startswith('libvpx'):
            s.options = {'deadline': 'realtime', 'cpu-used': '8', 'crf': '20', 'b': '0'}
            s.codec_context.bit_rate = bit_rate or 0
        for f in frames:
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')))
        out.mux(s.encode())


# --------------------------------------------------------------------------------------------------
# 2. Temporal sampling (appendix B). Randomness comes from torch's global RNG, which __getitem__
#    seeds from (seed, epoch, index) inside torch.random.fork_rng.
# --------------------------------------------------------------------------------------------------
def dense_indices(num_frames, T, stride, *, random=True, clips=1):
    """Dense sampling (K400, UCF101, HMDB51; all pre-training): T frames at `stride` inside a window
    of T*stride frames. Train: start ~ U{0, ..., F - T*stride} (official pre-training; fine-tuning
    uses it too, not the official 64/15-frame linspace stride of official-release 5.4, so that both
    see one temporal scale). Test: `clips` windows evenly spaced from the start to the end (1 clip =
    the centre). Indices past the end repeat the last frame. -> `clips` lists of T indices."""
    max_start = max(num_frames - T * stride, 0)
    if random:
        starts = [int(torch.randint(0, max_start + 1, ()).item()) for _ in range(clips)]
    elif clips == 1:
        starts = [max_start // 2]
    else:
        starts = [int(round(c * max_start / (clips - 1))) for c in range(clips)]
    return [[min(s + k * stride, num_frames - 1) for k in range(T)] for s in starts]


def segment_indices(num_frames, T, *, random=True, clips=1):
    """TSN uniform sampling (SSv2 fine-tuning): T equal segments, one random frame from each in
    training; at test, clip c takes the frame at fraction (c + 0.5) / clips of every segment (1
    clip = the middles; the official 2-clip test takes fractions 0 and 0.5, not 0.25 and 0.75)."""
    tick = num_frames / T
    out = []
    for c in range(clips):
        if random:
            lo = [int(tick * k) for k in range(T)]
            hi = [max(int(tick * (k + 1)), lo[k] + 1) for k in range(T)]
            idx = [int(torch.randint(a, b, ()).item()) for a, b in zip(lo, hi)]
        else:
            idx = [int(tick * (k + (c + 0.5) / clips)) for k in range(T)]
        out.append([min(i, num_frames - 1) for i in idx])
    return out


# --------------------------------------------------------------------------------------------------
# 3. Spatial augmentation, on uint8 clips (T, 3, H, W). The same box/op hits every frame of a clip.
#    Crop first, resize once per clip (one call on the whole (T, 3, h, w) tensor).
# --------------------------------------------------------------------------------------------------
def _choice(seq):
    return seq[int(torch.randint(0, len(seq), ()).item())]


def multiscale_crop_box(H, W, size, scales=(1, .875, .75, .66), max_distort=1):
    """GroupMultiScaleCrop(size, scales, max_distort=1, fix_crop=True, more_fix_crop=True) of the
    official pre-training: crop sides int(short * scale) (within 3 px of `size` -> size), (w, h)
    pairs whose scale indices differ by <= max_distort, offset one of 13 fixed positions.
    -> (top, left, h, w)."""
    sides = [int(min(H, W) * s) for s in scales]
    sides = [size if abs(x - size) < 3 else x for x in sides]
    pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides)
             if abs(i - j) <= max_distort]
    cw, ch = _choice(pairs)
    cw, ch = min(cw, W), min(ch, H)  # snapping can exceed a frame smaller than `size`
    ws, hs = (W - cw) // 4, (H - ch) // 4
    offsets = [(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs),  # corners, mid
               (0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0),            # edges
               (ws, hs), (3 * ws, hs), (ws, 3 * hs), (3 * ws, 3 * hs)]                  # quarters
    x, y = _choice(offsets)
    return y, x, ch, cw


def random_erase(clip, p):
    """Random erasing, 'pixel' mode with cube=True as the official fine-tuning: with probability p
    one box (area U(.02, 1/3), aspect log-U(.3, 3.3)) erased in every frame, with fresh per-pixel
    noise that is N(0, 1) in ImageNet-normalised space (here mapped back to uint8)."""
    if p <= 0 or torch.rand(()).item() >= p:
        return clip
    i, j, h, w, _ = T1.RandomErasing.get_params(clip[0].float(), scale=(0.02, 1 / 3),
                                                ratio=(0.3, 3.3), value=[0.0])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    noise = (mean + std * torch.randn(clip.shape[0], 3, h, w)) * 255
    clip = clip.clone()
    clip[..., i:i + h, j:j + w] = noise.round().clamp(0, 255).to(torch.uint8)
    return clip


def train_augment(clip, size, *, crop='multiscale', flip=False, randaug=None, random_erasing=0.0):
    """One training view of a uint8 clip (T, 3, H, W) -> (T, 3, size, size).
    crop='multiscale': pre-training / linear probing (Table 9, 11); 'resized': fine-tuning
    RandomResizedCrop area (0.08, 1), ratio (3/4, 4/3); 'center': the frame's central square, no
    jitter (the synthetic pre-training row: a random scale changes every clip's apparent speed).
    Then RandAugment (magnitude ~ N(m, std) clipped to [0, 10] drawn per clip, num_ops=2 of
    torchvision; ops scaled as timm's m/10 via 101 magnitude bins; applied to the whole clip so
    every frame gets the same ops; after the resize rather than before the crop as the official
    code does, which costs a full-resolution pass), flip, random erasing."""
    H, W = clip.shape[-2:]
    if crop == 'multiscale':
        i, j, h, w = multiscale_crop_box(H, W, size)
    elif crop == 'resized':
        i, j, h, w = T1.RandomResizedCrop.get_params(clip[0], scale=(0.08, 1.0),
                                                     ratio=(3 / 4, 4 / 3))
    elif crop == 'center':
        h = w = min(H, W)
        i, j = (H - h) // 2, (W - w) // 2
    else:
        raise ValueError(f"crop must be 'multiscale', 'resized' or 'center', got {crop!r}")
    clip = TF.resize(clip[..., i:i + h, j:j + w], [size, size], antialias=True)  # bilinear, once
    if randaug is not None:
        m, std = randaug
        mag = float(torch.clamp(m + std * torch.randn(()), 0, 10))
        clip = T2.RandAugment(num_ops=2, magnitude=round(mag * 10), num_magnitude_bins=101,
                              fill=128)(clip)
    if flip and torch.rand(()).item() < 0.5:
        clip = clip.flip(-1)
    return random_erase(clip, random_erasing)


def test_views(clip, size, short_side, crops):
    """Resize the short side to `short_side` (aspect kept), then `crops` squares of side `size`
    spread along the long side (left/centre/right or top/centre/bottom), centred on the short side.
    (T, 3, H, W) -> list of (T, 3, size, size)."""
    H, W = clip.shape[-2:]
    if H <= W:
        nh, nw = short_side, max(short_side, int(short_side * W / H))
    else:
        nh, nw = max(short_side, int(short_side * H / W)), short_side
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


# --------------------------------------------------------------------------------------------------
# 4. Dataset
# --------------------------------------------------------------------------------------------------
def item_seed(seed, epoch, index):
    """Seed of one item's augmentation: a pure function of (seed, epoch, index), so augmentation is
    the same whatever the worker count or resume point."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class VideoDataset(torch.utils.data.Dataset):
    """samples: list of (path, label); mode: 'train', 'val' or 'test'; sampling: 'dense' or
    'segment'. Items are dict(video=uint8 (V, 3, T, S, S), label, index, failed), indexed by int
    or by (index, epoch) as the loader's sampler yields."""

    def __init__(self, samples, *, mode, num_frames=16, sampling_rate=4, sampling='dense',
                 input_size=224, crop='multiscale', flip=False, randaug=None, random_erasing=0.0,
                 num_sample=1, test_clips=5, test_crops=3, short_side=None, seed=0, max_retries=10):
        self.samples, self.mode, self.seed = list(samples), mode, seed
        self.T, self.stride, self.sampling = num_frames, sampling_rate, sampling
        self.size, self.crop, self.flip, self.randaug = input_size, crop, flip, randaug
        self.random_erasing, self.num_sample = random_erasing, num_sample
        self.clips = {'train': num_sample, 'val': 1, 'test': test_clips}[mode]
        self.crops = test_crops if mode == 'test' else 1
        self.short_side = short_side or input_size
        self.max_retries = max_retries

    def __len__(self):
        return len(self.samples)

    def _indices(self, n):
        """-> list of clips (lists of T frame indices). In train one decode serves num_sample clips
        that share the temporal window (official repeated augmentation: only the spatial draws
        differ)."""
        random = self.mode == 'train'
        clips = 1 if random else self.clips
        if self.sampling == 'dense':
            clips = dense_indices(n, self.T, self.stride, random=random, clips=clips)
        else:
            clips = segment_indices(n, self.T, random=random, clips=clips)
        return clips * self.clips if random else clips

    def _load(self, path):
        clips = []

        def choose(num_frames):  # _read calls it once the frame count is known: one open a video
            clips.extend(self._indices(num_frames))
            return [i for c in clips for i in c]

        frames, pos = _read(path, choose, tail_slack=3)
        frames = frames.permute(0, 3, 1, 2)  # (U, 3, H, W)
        views, k = [], 0
        for clip_idx in clips:
            clip = frames[pos[k:k + len(clip_idx)]]  # gather: repeated indices copy one decode
            k += len(clip_idx)
            if self.mode == 'train':
                views.append(train_augment(clip, self.size, crop=self.crop, flip=self.flip,
                                           randaug=self.randaug,
                                           random_erasing=self.random_erasing))
            else:
                views += test_views(clip, self.size, self.short_side, self.crops)
        return torch.stack(views).permute(0, 2, 1, 3, 4).contiguous()  # (V, 3, T, S, S)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, (tuple, list)) else (key, 0)
        failed, idx = [], index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, epoch, index))
            for _ in range(self.max_retries + 1):
                path, label = self.samples[idx]
                try:
                    video = self._load(path)
                    return dict(video=video, label=int(label), index=int(index),
                                failed='\n'.join(failed))
                except VideoDecodeError as e:
                    warnings.warn(f'skipping unreadable video (replaced by another sample): {e}')
                    failed.append(path)
                    # deterministic replacement: a pure function of (seed, epoch, index, attempt)
                    idx = int(torch.randint(0, len(self.samples), ()).item())
        raise RuntimeError(f'{self.max_retries + 1} videos in a row could not be decoded, e.g.\n'
                           + '\n'.join(failed[:5]))


class FailureLog:
    """Counts the unreadable videos of an epoch: update(batch['failed']) per batch,
    end_epoch(num_seen) at its end."""

    def __init__(self, max_ratio=0.05):
        self.max_ratio, self.paths = max_ratio, []

    def update(self, failed):
        for f in [failed] if isinstance(failed, str) else failed:
            self.paths += [p for p in f.split('\n') if p]

    def end_epoch(self, num_seen):
        paths, self.paths = self.paths, []
        if not paths:
            return 0
        examples = '\n  '.join(sorted(set(paths))[:10])
        msg = (f'{len(paths)} unreadable video(s) replaced this epoch '
               f'({len(paths) / max(num_seen, 1):.1%} of {num_seen} samples), e.g.\n  {examples}')
        if len(paths) > self.max_ratio * max(num_seen, 1):
            raise RuntimeError(msg + f'\nmore than {self.max_ratio:.0%} of the samples failed: '
                               'check the data path and the files (re-download or re-encode them), '
                               'or raise max_ratio')
        print(msg)
        return len(paths)


# --------------------------------------------------------------------------------------------------
# 5. Loader
# --------------------------------------------------------------------------------------------------
class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (one replica when torch.distributed is not initialised) yielding
    (index, epoch) so the dataset can seed augmentation from (seed, epoch, index).
    set_epoch(epoch, skip) drops the first `skip` samples of this rank's epoch (mid-epoch resume).
    """

    def __init__(self, dataset, *, shuffle, seed=0):
        ddp = dist.is_available() and dist.is_initialized()
        super().__init__(dataset, num_replicas=dist.get_world_size() if ddp else 1,
                         rank=dist.get_rank() if ddp else 0, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        for i, index in enumerate(super().__iter__()):
            if i >= self.skip:
                yield (index, self.epoch)

    def __len__(self):
        return max(self.num_samples - self.skip, 0)


def _worker_init(_):
    torch.set_num_threads(1)  # each worker one op thread: the workers are the parallelism


def make_loader(dataset, batch_size, *, train, num_workers, seed=0, collate_fn=None):
    """DataLoader over an EpochSampler (shuffled and dropping the last partial batch when train).
    Call loader.sampler.set_epoch(epoch, skip) every epoch. Items are collated to video
    (B, V, 3, T, S, S) uint8, label (B,), index (B,), failed (list). The loader has its own
    generator: each iter() draws a worker base seed, and from the global RNG that draw would shift
    every later random number of the training loop (drop path), so a resumed run would differ."""
    workers = num_workers > 0
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=EpochSampler(dataset, shuffle=train, seed=seed),
        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        drop_last=train, persistent_workers=workers,
        prefetch_factor=4 if workers else None, worker_init_fn=_worker_init if workers else None,
        collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# 6. Dataset readers, in the layouts users download (datasets.md). -> (samples, classes)
# --------------------------------------------------------------------------------------------------
def _lines(path):
    with open(path, encoding='utf-8-sig') as f:  # strips a BOM; strip() below handles CRLF
        return [ln.strip() for ln in f if ln.strip()]


def _first_existing(candidates, what, hint):
    for c in candidates:
        if os.path.exists(c):
            return c
    raise FileNotFoundError(f'{what} not found; looked for:\n  ' + '\n  '.join(candidates)
                            + f'\n{hint}')


def _subdir(root, names):
    """The first of root/<name> that is a folder, else root itself."""
    found = [os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))]
    return found[0] if found else root


def _keep_existing(samples, dataset):
    """Missing videos are common (a few % of K400): count and report them once; none found is an
    error."""
    kept = [s for s in samples if os.path.isfile(s[0])]
    missing = [s[0] for s in samples if not os.path.isfile(s[0])]
    if missing and not kept:
        raise FileNotFoundError(f'{dataset}: none of the {len(samples)} videos of the split '
                                f'exists, e.g. {missing[0]}; check --data_path')
    if missing:
        warnings.warn(f'{dataset}: {len(missing)} of {len(samples)} videos are missing and were '
                      f'left out, e.g. {missing[:3]}')
    return kept


def _load_ucf101(root, split, fold):
    # data_path: the folder holding UCF-101/ and ucfTrainTestlist/, or UCF-101 itself
    vids = _subdir(root, ('UCF-101', 'UCF101', 'videos'))
    lists = _first_existing([os.path.join(d, 'ucfTrainTestlist') for d in
                             (root, vids, os.path.dirname(os.path.abspath(vids)))],
                            'UCF101 split folder ucfTrainTestlist/', 'Download UCF101TrainTest'
                            'Splits-RecognitionTask.zip and unpack it next to UCF-101/.')
    cls_file = _first_existing([os.path.join(lists, 'classInd.txt')], 'UCF101 classInd.txt', '')
    classes = [ln.split()[1] for ln in sorted(_lines(cls_file), key=lambda ln: int(ln.split()[0]))]
    lookup = {c.lower(): i for i, c in enumerate(classes)}
    name = ('trainlist' if split == 'train' else 'testlist') + f'{fold:02d}.txt'
    split_file = _first_existing([os.path.join(lists, name)], f'UCF101 split file {name}',
                                 'fold must be 1, 2 or 3.')
    listing = {}  # class folder -> {lower-case file name: real name}: HandStandPushups, spelt twice

    def resolve(folder, fname):
        p = os.path.join(vids, folder, fname)
        if os.path.isfile(p):
            return p
        if folder not in listing:
            d = os.path.join(vids, folder)
            listing[folder] = {f.lower(): f for f in os.listdir(d)} if os.path.isdir(d) else {}
        return os.path.join(vids, folder, listing[folder].get(fname.lower(), fname))

    samples = []
    for ln in _lines(split_file):
        folder, fname = ln.split()[0].replace('\\', '/').split('/')[-2:]
        if folder.lower() not in lookup:
            raise ValueError(f'{split_file}: class {folder!r} of line {ln!r} is not in {cls_file}')
        samples.append((resolve(folder, fname), lookup[folder.lower()]))
    return samples, classes


def _load_hmdb51(root, split, fold):
    lists = _first_existing([os.path.join(d, 'testTrainMulti_7030_splits') for d in
                             (root, os.path.dirname(os.path.abspath(root)))],
                            'HMDB51 split folder testTrainMulti_7030_splits/',
                            'Unpack test_train_splits.rar into the dataset folder.')
    suffix = f'_test_split{fold}.txt'
    classes = sorted(f[:-len(suffix)] for f in os.listdir(lists) if f.endswith(suffix))
    if not classes:
        raise FileNotFoundError(f'no <class>{suffix} in {lists} (fold must be 1, 2 or 3)')
    vids = next((c for c in (root, os.path.join(root, 'hmdb51_org'), os.path.join(root, 'videos'))
                 if os.path.isdir(os.path.join(c, classes[0]))), root)
    tag = '1' if split == 'train' else '2'  # 0: unused in this fold
    samples = []
    for label, cls in enumerate(classes):
        for ln in _lines(os.path.join(lists, cls + suffix)):
            name, t = ln.rsplit(None, 1)
            if t == tag:
                samples.append((os.path.join(vids, cls, name), label))
    return samples, classes


_YT = re.compile(r'^(.{11})_(\d{6})_(\d{6})$')


def _k400_csv(path):
    """Rows (label, youtube_id, start, end) of a Kinetics CSV: 4-6 columns, header or not, quoted
    or not."""
    with open(path, newline='', encoding='utf-8-sig') as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and 'youtube_id' in [c.strip() for c in rows[0]]:
        head = [c.strip() for c in rows[0]]
        rows = [dict(zip(head, r)) for r in rows[1:]]
        return [(r.get('label', ''), r['youtube_id'], r.get('time_start', 0), r.get('time_end', 0))
                for r in rows]
    return [tuple(r[:4]) for r in rows]


def _load_k400(root, split):
    names = ['train.csv'] if split == 'train' else ['validate.csv', 'val.csv']  # test: the val CSV
    dirs = [os.path.join(root, d) for d in ('annotations', 'kinetics400', '')]
    ann = _first_existing([os.path.join(d, n) for d in dirs for n in names],
                          f'Kinetics {split} CSV',
                          'Put the annotation CSVs (label,youtube_id,time_start,time_end,split) in '
                          "<data_path>/annotations/. 'test' reads the validation CSV, as the "
                          'official code.')
    rows = _k400_csv(ann)
    train_csv = next((os.path.join(d, 'train.csv') for d in dirs
                      if os.path.isfile(os.path.join(d, 'train.csv'))), ann)
    classes = sorted({r[0] for r in (_k400_csv(train_csv) if train_csv != ann else rows)})
    lookup = {c: i for i, c in enumerate(classes)}
    vroot = _subdir(root, ['train'] if split == 'train' else ['val', 'validate', 'valid'])
    index = {}  # file stem and youtube id -> path, over flat or class-folder trees, any container
    for d, _, files in os.walk(vroot):
        for f in files:
            stem, ext = os.path.splitext(f)
            if ext.lower() in VIDEO_EXTS:
                index.setdefault(stem, os.path.join(d, f))
                m = _YT.match(stem)
                index.setdefault(m.group(1) if m else stem, os.path.join(d, f))
    samples, missing = [], 0
    for label, yid, t0, t1 in rows:
        if label not in lookup:
            raise ValueError(f'{ann}: label {label!r} (youtube id {yid}) is not a class of '
                             f'{train_csv}')
        try:
            key = f'{yid}_{int(float(t0)):06d}_{int(float(t1)):06d}'
        except ValueError:
            key = yid
        p = index.get(key) or index.get(yid)
        if p is None:
            missing += 1
        else:
            samples.append((p, lookup[label]))
    if not samples:
        raise FileNotFoundError(f'k400: none of the {len(rows)} clips of {ann} was found under '
                                f'{vroot} (expected <youtube_id>_<start:06d>_<end:06d>.mp4 or '
                                '<youtube_id>.mp4)')
    if missing:
        warnings.warn(f'k400: {missing} of {len(rows)} clips listed in {ann} are missing under '
                      f'{vroot}')
    return samples, classes


def _load_ssv2(root, split):
    labels_dir = _first_existing([os.path.join(root, 'labels'), root], 'SSv2 labels folder', '')

    def ann(names):
        return _first_existing([os.path.join(labels_dir, n) for n in names], f'SSv2 {names[0]}',
                               'Unpack the SSv2 labels archive (labels.json, train.json, '
                               'validation.json) into <data_path>/labels/.')
    with open(ann(['labels.json', 'something-something-v2-labels.json'])) as f:
        label_map = {k: int(v) for k, v in json.load(f).items()}
    classes = [f'<unused {i}>' for i in range(max(label_map.values()) + 1)]
    for name, i in label_map.items():
        classes[i] = name
    part = 'train' if split == 'train' else 'validation'
    ann_file = ann([f'{part}.json', f'something-something-v2-{part}.json'])
    with open(ann_file) as f:
        entries = json.load(f)
    vids = _subdir(root, ('20bn-something-something-v2', 'videos'))
    samples = []
    for e in entries:
        name = e['template'].replace('[', '').replace(']', '')
        if name not in label_map:
            raise ValueError(f'{ann_file}: template {e["template"]!r} of video {e["id"]} gives '
                             f'{name!r}, which is not a key of labels.json')
        # the .webm as downloaded, else a converted copy (official DATASET.md: webm -> mp4)
        p = next((os.path.join(vids, e['id'] + x) for x in ('.webm',) + VIDEO_EXTS
                  if os.path.isfile(os.path.join(vids, e['id'] + x))),
                 os.path.join(vids, e['id'] + '.webm'))
        samples.append((p, label_map[name]))
    return samples, classes


def _load_list(path, split):
    """Official VideoMAE list files: '<path> <label>' per line; data_path = the file, or the folder
    holding train.csv / val.csv / test.csv. Relative paths are relative to the list's folder."""
    if os.path.isdir(path):
        names = [f'{split}.csv'] + (['test.csv'] if split == 'val' else [])
        path = _first_existing([os.path.join(path, n) for n in names], f'list file {split}.csv',
                               'Lines are "<video path> <integer label>".')
    samples = []
    for n, ln in enumerate(_lines(path), 1):
        parts = ln.rsplit(None, 1)  # lenient: the official readers need exactly one space
        if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
            raise ValueError(f'{path}:{n}: expected "<video path> <integer label>", got {ln!r}')
        samples.append((os.path.join(os.path.dirname(os.path.abspath(path)), parts[0].strip()),
                        int(parts[1])))
    return samples, [str(i) for i in range(max(s[1] for s in samples) + 1)] if samples else []


def load_split(dataset, data_path, split, fold=1):
    """-> (samples [(path, label)], classes [name]). dataset in synthetic/ucf101/hmdb51/k400/ssv2/
    list; split in train/val/test ('val' = 'test' where the dataset has one evaluation split)."""
    if split not in ('train', 'val', 'test'):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if dataset == 'synthetic':  # the built-in motion set, in the UCF101 layout
        import synthetic  # here, not at the top: synthetic imports data (encode_video)
        dataset, data_path = 'ucf101', data_path or synthetic.ensure_motion()
    if data_path is None or not os.path.exists(data_path):
        raise FileNotFoundError(f'--data_path {data_path!r} does not exist (dataset {dataset})')
    readers = {'ucf101': lambda: _load_ucf101(data_path, split, fold),
               'hmdb51': lambda: _load_hmdb51(data_path, split, fold),
               'k400': lambda: _load_k400(data_path, split),
               'ssv2': lambda: _load_ssv2(data_path, split),
               'list': lambda: _load_list(data_path, split)}
    if dataset not in readers:
        raise ValueError(f'unknown dataset {dataset!r}; choose from synthetic, '
                         + ', '.join(readers))
    samples, classes = readers[dataset]()
    if dataset == 'k400':
        return samples, classes  # reports missing clips itself
    if not samples:
        raise ValueError(f'{dataset} {split} split (fold {fold}) under {data_path} is empty')
    return _keep_existing(samples, dataset), classes
