"""The built-in datasets, generated on first use (through _cached) as real files in the layouts
users download, so that the stages read them with the same code as the real datasets:
  ensure_motion(): 8 camera motions that no single frame reveals, MPEG-4 AVI in the UCF101 layout
                   (pretrain.py, finetune.py, linprobe.py: data.load_split('synthetic'));
  ensure_ava():    people-like figures standing, walking, crouching or waving, 30-fps JPEG frames
                   in the SlowFast AVA layout, with real CSV/pbtxt annotations and detected boxes.
  encode_video():  frames -> a video file, as the datasets ship them (also bench.py's and tests').
"""
import json
import os
import shutil
import tempfile
from fractions import Fraction

import av
import numpy as np
import torch
from torchvision.io import encode_jpeg, write_file
from tqdm import tqdm

MARKER = 'synthetic.json'  # the generation parameters, written last: its presence means "complete"


def _ready(root, params):
    """True: root holds the set made with `params`; False: absent or empty; else ValueError."""
    marker = os.path.join(root, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            found = json.load(f)
        if found == params:
            return True
        raise ValueError(f'{root}: a synthetic dataset with other parameters: {marker} says '
                         f'{found}, this call asks for {params}; delete it or pass another root')
    if os.path.exists(root) and os.listdir(root):
        raise ValueError(f'{root} exists and is not a synthetic dataset (no {marker}); empty it or '
                         'pass another root')
    return False


def _cached(root, params, write, name=None):
    """-> root (absolute; None: $VIDEOMAE_CACHE/<name>, else ~/.cache/videomae/<name>), holding
    what write(folder) puts into a folder, generated once for `params`. Every rank of a torchrun job
    calls this before the process group exists, so several may write one fresh root at once: each
    writes its own folder beside the root, puts the marker in last and renames it into place; the
    first rename wins, the others use its copy. Nothing deletes a root that another may read."""
    home = os.path.join(os.path.expanduser('~'), '.cache', 'videomae')
    root = os.path.abspath(root or os.path.join(os.environ.get('VIDEOMAE_CACHE') or home, name))
    if _ready(root, params):
        return root
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(root)}-tmp-', dir=os.path.dirname(root))
    try:  # tmp beside root: the same filesystem, so the rename is atomic
        write(tmp)
        with open(os.path.join(tmp, MARKER), 'w') as f:
            json.dump(params, f)
        try:
            os.rename(tmp, root)  # replaces an empty root, fails on a filled one
        except OSError:
            if not _ready(root, params):  # not "another process finished first": a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # what is left of tmp after a lost race or an error
    return root


def _write_lines(folder, rel, lines):
    path = os.path.join(folder, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.writelines(ln + '\n' for ln in lines)


def encode_video(path, frames, fps=25, codec=None, gop=12, bit_rate=None):
    """Write uint8 frames (T, H, W, 3) to `path` (the synthetic sets, bench.py, test fixtures).
    Codec by extension: .avi MPEG-4 Part 2 with the XVID tag (as UCF101), .mp4/.mkv H.264, .webm
    VP9."""
    ext = os.path.splitext(path)[1].lower()
    codec = codec or {'.avi': 'mpeg4', '.webm': 'libvpx-vp9'}.get(ext, 'libx264')
    frames = np.asarray(frames, dtype=np.uint8)
    with av.open(path, 'w') as out:
        s = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.height, s.width, s.pix_fmt, s.codec_context.gop_size = *frames.shape[1:3], 'yuv420p', gop
        if codec == 'mpeg4':  # MPEG-4 at a bit rate; H.264 and VP9 at a constant quality (crf)
            s.codec_tag = 'XVID'
            s.codec_context.bit_rate = bit_rate or 8 * frames.shape[1] * frames.shape[2] * int(fps)
        elif codec == 'libx264':
            s.options = dict(preset='veryfast', crf='18', keyint_min=str(gop), sc_threshold='0')
        elif codec.startswith('libvpx'):
            s.options = {'deadline': 'realtime', 'cpu-used': '8', 'crf': '20', 'b': '0'}
            s.codec_context.bit_rate = bit_rate or 0
        for f in frames:
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')))
        out.mux(s.encode())



# ---- the motion set: motions that no single frame reveals, in the UCF101 layout ------------------
MOTION_CLASSES = ['MoveLeft', 'MoveRight', 'MoveUp', 'MoveDown', 'RotateClockwise',
                  'RotateCounterClockwise', 'Approach', 'Recede']


def _motion_video(rng, cls, F, S, waves=4):
    """One video (F, S, S, 3) uint8 of class `cls`: a smooth colour texture (`waves` plane waves of
    random direction, phase and colour, 0.5-1.5 cycles per frame width) fills the frame and moves as
    a whole, as under a camera that pans (1-1.5 px / frame), rolls about the centre (5-8 degrees /
    frame) or zooms (x0.7 <-> x1.4 over the video); noise std 1. Only the motion differs by class.
    Why (v6, README "Does pre-training help?"): on a flat background (v5) per-cube-normalised
    targets are noise and pre-training stayed on the predict-the-mean plateau; a texture this smooth
    lets visible cubes tell about hidden ones, whose change only the motion predicts. At 2-4 cycles
    per frame a probe on a random encoder already scored 68.8%; at 0.5-1.5, 20.8%."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    x, y = xx[None] - S / 2, yy[None] - S / 2                           # about the frame centre
    t = np.arange(F, dtype=np.float32)[:, None, None]
    name = MOTION_CLASSES[cls]
    if name.startswith('Move'):    # texture coordinates (u, v) seen at each pixel and frame
        dx, dy = {'Left': (-1, 0), 'Right': (1, 0), 'Up': (0, -1), 'Down': (0, 1)}[name[4:]]
        speed = rng.uniform(1.0, 1.5)
        u, v = x - dx * speed * t, y - dy * speed * t
    elif name.startswith('Rotate'):  # y points down: a positive angle turns clockwise on screen
        a = -(1 if name == 'RotateClockwise' else -1) * np.deg2rad(rng.uniform(5, 8)) * t
        u, v = np.cos(a) * x - np.sin(a) * y, np.sin(a) * x + np.cos(a) * y
    else:                            # Approach: magnification grows geometrically, Recede: shrinks
        g = t / max(F - 1, 1)
        mag = 0.7 * 2.0 ** (g if name == 'Approach' else 1 - g)
        u, v = x / mag, y / mag
    freq = rng.uniform(0.5, 1.5, waves) * 2 * np.pi / S                 # rad / px
    angle, phase = rng.uniform(0, 2 * np.pi, waves), rng.uniform(0, 2 * np.pi, waves)
    colour = rng.uniform(-1, 1, (waves, 3)).astype(np.float32)
    frames = np.full((F, S, S, 3), 127.5, np.float32)
    for k in range(waves):
        wave = np.cos(freq[k] * (np.cos(angle[k]) * u + np.sin(angle[k]) * v) + phase[k])
        frames += 60 / np.sqrt(waves / 2) * wave[..., None] * colour[k]
    frames += rng.standard_normal((F, S, S, 1), dtype=np.float32)      # sensor-like noise, std 1
    return np.clip(frames, 0, 255).astype(np.uint8)


def _write_motion(folder, seed, num_train, num_test, num_frames, size):
    train, test = [], []
    videos = [(ci, k) for ci in range(len(MOTION_CLASSES)) for k in range(num_train + num_test)]
    for ci, k in tqdm(videos, desc='synthetic motion set', unit='video'):
        name = MOTION_CLASSES[ci]
        os.makedirs(os.path.join(folder, 'UCF-101', name), exist_ok=True)
        rel = f'{name}/v_{name}_g{k // 4 + 1:02d}_c{k % 4 + 1:02d}.avi'
        video = _motion_video(np.random.default_rng([seed, ci, k]), ci, num_frames, size)
        encode_video(os.path.join(folder, 'UCF-101', rel), video, fps=25, gop=12,
                          bit_rate=3 * size * size * 25)
        test.append(rel) if k < num_test else train.append(f'{rel} {ci + 1}')
    _write_lines(folder, 'ucfTrainTestlist/classInd.txt',
                 [f'{i + 1} {n}' for i, n in enumerate(MOTION_CLASSES)])
    for fold in (1, 2, 3):  # one real split (the first groups: test), repeated for --fold 2/3
        _write_lines(folder, f'ucfTrainTestlist/trainlist{fold:02d}.txt', train)
        _write_lines(folder, f'ucfTrainTestlist/testlist{fold:02d}.txt', test)


def ensure_motion(root=None, seed=0, *, num_train=40, num_test=12, num_frames=40, size=64):
    """Path of the motion set (UCF-101/<Class>/v_<Class>_gGG_cCC.avi, ucfTrainTestlist/): 8 classes
    x (num_train + num_test) MPEG-4 AVI videos, num_frames at size x size, 25 fps."""
    params = dict(version=6, seed=seed, num_train=num_train, num_test=num_test,
                  num_frames=num_frames, size=size, classes=MOTION_CLASSES)
    return _cached(root, params,
                   lambda tmp: _write_motion(tmp, seed, num_train, num_test, num_frames, size),
                   'synthetic-v6' + (f'-seed{seed}' if seed else ''))


# ---- the AVA-layout set (detect.py's default run), with SlowFast-style detected boxes ------------
AVA_FPS = 30          # as detect.py: SlowFast frames are extracted at 30 fps from the 15:00 cut
WINDOW_START = 900    # keyframe of second s = frame (s - 900) x 30 of that cut
AVA_NAMES = {1: 'bend/bow (at the waist)', 3: 'crouch/kneel', 12: 'stand', 14: 'walk',
             69: 'hand wave'}
AVA_KINDS = [(12,), (14,), (3,), (12, 69)]  # id 1 never occurs: "no GT", not in the mean


def _ava_movie(rng, seconds, H, W):
    """-> frames uint8 (seconds*30+1, H, W, 3), people [(actions, boxes (F, 4), normalised)]."""
    n = seconds * AVA_FPS + 1
    yy, xx = np.mgrid[0:H, 0:W]
    c0, c1 = rng.integers(40, 200, 3), rng.integers(40, 200, 3)
    bg = c0 * (xx / W)[..., None] + c1 * (1 - xx / W)[..., None] + rng.normal(0, 8, (H, W, 3))
    frames = np.repeat(bg.clip(0, 255)[None], n, 0)           # a horizontal gradient, still
    people, slots = [], rng.permutation(4)[:rng.integers(2, 4)]
    for slot in slots:
        acts = AVA_KINDS[rng.integers(len(AVA_KINDS))]
        bw, bh, head = (12, 18, 6) if 3 in acts else (10, 30, 5)  # body width, height; head side
        x = 4 + slot * (W - 8) / 4 + rng.uniform(0, (W - 8) / 4 - bw)
        y = H - bh - rng.uniform(2, 10)
        vx = rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.2)
        colour, phase = rng.integers(0, 256, 3), rng.uniform(0, 10)
        boxes = np.zeros((n, 4))
        for f in range(n):
            if 14 in acts:                                    # walk: bounce between the edges
                x += vx
                if x < 1 or x + bw > W - 1:
                    vx, x = -vx, min(max(x, 1), W - 1 - bw)
            x0, y0 = int(round(x)), int(round(y))
            hx = x0 + (bw - head) // 2
            frames[f, y0 + head:y0 + bh, x0:x0 + bw] = colour                   # body
            frames[f, y0:y0 + head, hx:hx + head] = colour * 0.6 + 60           # head
            up = 69 in acts and np.sin(2 * np.pi * (f + phase) / 10) > 0    # wave: period 10
            if 69 in acts:                                          # an arm up / down, in the box
                ay = y0 - 6 if up else y0 + head
                frames[f, max(ay, 0):ay + 8, x0 + bw:x0 + bw + 3] = colour
            right = x0 + bw + (3 if 69 in acts else 0)
            boxes[f] = (x0 / W, max(y0 - 6 if up else y0, 0) / H, right / W, (y0 + bh) / H)
        people.append((acts, boxes))
    frames += rng.normal(0, 3, frames.shape)
    return frames.clip(0, 255).astype(np.uint8), people


def _write_ava(folder, seed, num_train, num_val, seconds, size):
    rng = np.random.default_rng(seed)  # one stream, drawn in this order: ids, then movie by movie
    alphabet = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_'
    ids = [''.join(rng.choice(list(alphabet), 11)) for _ in range(num_train + num_val)]
    ids[0] = '-' + ids[0][1:]                                # real AVA ids can start with '-'
    keyframes = range(WINDOW_START + 2, WINDOW_START + seconds)
    gt, lists, dets = {'train': [], 'val': []}, {'train': [], 'val': []}, []
    for m, vid in enumerate(tqdm(ids, desc='synthetic AVA set', unit='movie')):
        split = 'train' if m < num_train else 'val'
        frames, people = _ava_movie(rng, seconds, *size)
        os.makedirs(os.path.join(folder, 'frames', vid))
        jpegs = encode_jpeg(list(torch.from_numpy(frames).permute(0, 3, 1, 2)), quality=90)
        for f, jpg in enumerate(jpegs):
            rel = f'{vid}/{vid}_{f + 1:06d}.jpg'
            write_file(os.path.join(folder, 'frames', rel), jpg)
            lists[split].append(f'{vid} {m} {f} {rel} ""')
        for sec in keyframes:
            key = f'{vid},{sec:04d},'
            for pid, (acts, boxes) in enumerate(people):
                box = boxes[(sec - WINDOW_START) * AVA_FPS]
                gt[split] += [key + ','.join(f'{v:.3f}' for v in box) + f',{a},{pid}' for a in acts]
                if split == 'val':                 # the "detector": jittered boxes, high score
                    box = np.clip(box + rng.uniform(-0.01, 0.01, 4), 0, 1)
                    dets.append(key + ','.join(f'{v:.3f}' for v in box)
                                + f',,{rng.uniform(0.85, 1):.6f}')
            if split == 'val':                     # a low-score false box, cut by det_thresh
                dets.append(key + '0.010,0.010,0.200,0.300,,0.400000')
    for split in ('train', 'val'):
        _write_lines(folder, f'annotations/ava_{split}_v2.2.csv', gt[split])
        _write_lines(folder, f'frame_lists/{split}.csv',
                     ['original_vido_id video_id frame_id path labels'] + lists[split])
    _write_lines(folder, 'annotations/ava_val_predicted_boxes.csv', dets)
    _write_lines(folder, 'annotations/ava_val_excluded_timestamps_v2.2.csv',
                 [f'{ids[num_train]},{keyframes[0]:04d}'])
    _write_lines(folder, 'annotations/ava_action_list_v2.2_for_activitynet_2019.pbtxt',
                 [f'label {{\n  name: "{name}"\n  label_id: {i}\n  label_type: PERSON_MOVEMENT\n}}'
                  for i, name in AVA_NAMES.items()])


def ensure_ava(root=None, seed=0, *, num_train=12, num_val=4, seconds=6, size=(72, 96)):
    """Path of the AVA-layout set (annotations/, frames/<id>/<id>_000001.jpg, frame_lists/):
    num_train + num_val movies of `seconds` s at size (H, W), keyframes at 902 .. 899 + seconds."""
    params = dict(version=1, seed=seed, num_train=num_train, num_val=num_val, seconds=seconds,
                  size=list(size))
    return _cached(root, params,
                   lambda tmp: _write_ava(tmp, seed, num_train, num_val, seconds, size),
                   f'synthetic-ava-v1-seed{seed}')
