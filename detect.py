"""VideoMAE on AVA v2.2: spatio-temporal action detection (appendix § B "AVA", Table 12).

The backbone is the fine-tuning ViT of model.py; the head is the SlowFast detection head the
appendix follows (as in the official VideoMAE-Action-Detection code): token LayerNorm ->
(C, T', H', W') -> mean over time -> RoIAlign 7x7 per person box -> max over the 7x7 -> dropout ->
Linear to the 80 AVA actions -> sigmoid (multi-label). Training sees ground-truth person boxes,
inference the detector's boxes with score >= 0.8. The metric is frame-level AP at IoU 0.5 per class
over the 60 evaluated classes, and its mean.

Read top to bottom: recipe table, AVA files (annotations, boxes, frames or videos), the clip
dataset, the head, the AP evaluation, argparse, the loop, main(). The synthetic set is
synthetic.py's.

  python detect.py                                # synthetic AVA-layout set on CPU, a few minutes
  torchrun --nproc_per_node=8 detect.py --data_path /data/ava --model base \\
      --finetune videomae_base_k400_pretrain.pth  # paper recipe (Table 12), SlowFast frame layout
"""
import argparse
import csv
import functools
import json
import math
import os
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.ops import box_iou, clip_boxes_to_image, remove_small_boxes, roi_align
from torchvision.transforms import v2
from tqdm import tqdm

import data
import synthetic
import utils
from model import build_classifier, load_checkpoint

# --------------------------------------------------------------------------------------------------
# Recipes. Table 12, AVA v2.2 columns: without (key = size) and with (key = size-k400ft) the
# extra supervised fine-tuning of the backbone on Kinetics-400. Common to both: AdamW (0.9, 0.999),
# wd 0.05, batch 128, cosine, 5 warm-up epochs, no repeated augmentation, flip, drop path 0.2.
# lr = base x batch / 256 (appendix § B). Per-GPU batch, min lr, 16x4 clips, short side 256 /
# crop 224: the official AD scripts. Head dropout 0: the official AD head has none (SlowFast's AVA
# configs use 0.5).
# --------------------------------------------------------------------------------------------------
AVA = dict(weight_decay=0.05, opt_betas=[0.9, 0.999], total_batch=128, warmup_epochs=5,
           drop_path=0.2, flip=True, min_lr=1e-6, num_frames=16, sampling_rate=4, input_size=224,
           short_side=256, det_thresh=0.8, head_dropout=0.0, num_workers=8, save_ckpt_freq=10)
RECIPES = {
    # Table 12, both columns
    'small':        dict(AVA, model='small', lr=1e-3, epochs=30, layer_decay=0.6, batch_size=8),
    'base':         dict(AVA, model='base', lr=2.5e-4, epochs=30, layer_decay=0.75, batch_size=4),
    'large':        dict(AVA, model='large', lr=2.5e-4, epochs=30, layer_decay=0.75, batch_size=4),
    'huge':         dict(AVA, model='huge', lr=5e-4, epochs=20, layer_decay=0.8, batch_size=2),
    'small-k400ft': dict(AVA, model='small', lr=5e-4, epochs=30, layer_decay=0.6, batch_size=8),
    'base-k400ft':  dict(AVA, model='base', lr=5e-4, epochs=30, layer_decay=0.75, batch_size=4),
    'large-k400ft': dict(AVA, model='large', lr=5e-4, epochs=20, layer_decay=0.8, batch_size=4),
    'huge-k400ft':  dict(AVA, model='huge', lr=5e-4, epochs=20, layer_decay=0.8, batch_size=2),
    # Ours: a tiny ViT trained from scratch on the synthetic AVA-layout set,
    # on a laptop CPU in minutes.
    'synthetic': dict(AVA, model='small', embed_dim=64, depth=2, num_heads=2, patch_size=8,
                      lr=2e-2, epochs=30, layer_decay=1.0, drop_path=0.0, warmup_epochs=1,
                      total_batch=8, batch_size=8, num_frames=4, input_size=64, short_side=64,
                      num_workers=0, min_lr=1e-5),
}
AVA_FPS = 30        # SlowFast frames are extracted at 30 fps from the cut that starts at 15:00
WINDOW_START = 900  # keyframe of second s = frame (s - 900) x 30 of that cut
NUM_ACTIONS = 80    # the model predicts all 80 AVA ids (1..80); evaluation keeps the label map's 60


# --------------------------------------------------------------------------------------------------
# AVA annotation files, as distributed (datasets.md, AVA v2.2).
# --------------------------------------------------------------------------------------------------
def make_key(video_id, timestamp):
    return video_id, int(timestamp)              # '0902' and '902' are the same keyframe


def read_label_map(path):
    """pbtxt with `item { name: ".." id: N }` or `label { name: ".." label_id: N ... }`
    -> {id: name}."""
    out, name = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith('name:'):
                name = line.split('"')[1]
            elif line.startswith(('id:', 'label_id:')):
                out[int(line.split(':')[1])] = name
    if not out:
        raise SystemExit(f'error: {path}: no `name:` / `id:` (or `label_id:`) entries: '
                         'not an AVA label map')
    return out


def read_ava_csv(path, detections=False):
    """GT (8 columns, the last a person id) or detection CSV (score last; the action column may
    be empty).

    Rows are grouped per keyframe and box, so a person with three actions is one box with three
    labels.
    -> {(video_id, sec): {box (x1, y1, x2, y2) normalised: [set of action ids, score]}}."""
    out = defaultdict(dict)
    with open(path, newline='') as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if len(row) not in (7, 8):
                raise SystemExit(f'error: {path}:{n}: expected 7 or 8 comma-separated columns '
                                 '(video_id,timestamp,x1,y1,x2,y2,action_id[,person_id|score]), '
                                 f'got {len(row)}')
            try:
                key = make_key(row[0], row[1])
                box = tuple(round(float(v), 4) for v in row[2:6])
                action = int(row[6]) if row[6].strip() not in ('', '-1') else None
                score = float(row[7]) if detections and len(row) == 8 else 1.0
            except ValueError as e:
                raise SystemExit(f'error: {path}:{n}: {e} in row {row}') from None
            entry = out[key].setdefault(box, [set(), score])
            if action is not None:
                entry[0].add(action)
            entry[1] = max(entry[1], score)
    return out


def read_aia_json(path, images_path):
    """AIA/AlphAction person boxes (what VideoMAE used): a JSON list of {image_id, bbox [x, y, w, h]
    in keyframe pixels, score}; image ids, movies, timestamps and sizes come from the COCO-style
    ava_val_v2.2_min.json (`images`). -> the read_ava_csv structure."""
    if not images_path or not os.path.isfile(images_path):
        raise SystemExit(f'error: {path} is an AIA JSON box file; it needs the COCO-style '
                         'annotation file with its `images` (ava_val_v2.2_min.json): pass '
                         f'--det_images (not found: {images_path})')
    with open(images_path) as f:
        images = {im['id']: im for im in json.load(f)['images']}
    out = defaultdict(dict)
    with open(path) as f:
        for det in json.load(f):
            im = images.get(det['image_id'])
            if im is None:
                raise SystemExit(f"error: {path}: image_id {det['image_id']} "
                                 f"is not in {images_path}")
            x, y, w, h = det['bbox']
            W, H = im['width'], im['height']
            box = tuple(round(v, 4) for v in (x / W, y / H, (x + w) / W, (y + h) / H))
            out[make_key(im['movie'], im['timestamp'])][box] = [set(), float(det['score'])]
    return out


def read_excluded(path):
    if not path:
        return set()
    with open(path, newline='') as f:
        return {make_key(r[0], r[1]) for r in csv.reader(f) if len(r) == 2}


def entries_from(boxes_by_key, min_score=0.0, skip=()):
    """-> sorted list of (video_id, sec, boxes (n, 4) normalised, multi-hot (n, 80), scores (n,));
    keyframes with no box left (after the score threshold) are dropped, as the official code drops
    them."""
    out = []
    for key in sorted(boxes_by_key):
        if key in skip:
            continue
        rows = [(b, a, s) for b, (a, s) in boxes_by_key[key].items() if s >= min_score]
        if not rows:
            continue
        labels = torch.zeros(len(rows), NUM_ACTIONS)
        for i, (_, acts, _) in enumerate(rows):
            for a in acts:
                if 1 <= a <= NUM_ACTIONS:
                    labels[i, a - 1] = 1
        out.append((key[0], key[1], torch.tensor([r[0] for r in rows]).clamp(0, 1), labels,
                    torch.tensor([r[2] for r in rows])))
    return out


# --------------------------------------------------------------------------------------------------
# Frames: the SlowFast JPEG layout, or the videos themselves decoded with PyAV around each keyframe.
# Both return uint8 (T, 3, H, W) for the frame offsets around the keyframe, clamped into the video.
# --------------------------------------------------------------------------------------------------
class FrameFolder:
    """frames/<id>/<id>_000001.jpg at 30 fps (frame 0 = 15:00), listed by
    frame_lists/{train,val}.csv."""

    def __init__(self, root, frame_lists=()):
        self.root, self.paths = root, {}
        # header `original_vido_id video_id frame_id path labels`
        for fl in frame_lists:
            with open(fl) as f:
                next(f)
                rows = [line.split() for line in f if line.strip()]
            for vid in {r[0] for r in rows}:
                self.paths[vid] = [os.path.join(root, r[3])
                                   for r in sorted((r for r in rows if r[0] == vid),
                                                   key=lambda r: int(r[2]))]

    def frames_of(self, vid):
        if vid not in self.paths:                # no frame list: the folder itself, in name order
            folder = os.path.join(self.root, vid)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f'{folder}: no frames for video {vid}')
            self.paths[vid] = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
                               if n.endswith('.jpg')]
        return self.paths[vid]

    def clip(self, vid, sec, offsets):
        paths = self.frames_of(vid)
        key = (sec - WINDOW_START) * AVA_FPS
        idx = [min(max(key + o, 0), len(paths) - 1) for o in offsets]
        decoded = {i: decode_jpeg(read_file(paths[i]), mode=ImageReadMode.RGB) for i in set(idx)}
        return torch.stack([decoded[i] for i in idx])


class VideoFolder:
    """videos/<id>.{mp4,mkv,webm,...}: whole movies (--video_start 0, as downloaded) or the
    15-minute cuts starting at 15:00 (--video_start 900). The frame stride is in the video's own
    frames."""

    def __init__(self, root, start=0):
        self.start = start
        self.paths = {os.path.splitext(n)[0]: os.path.join(root, n)
                      for n in sorted(os.listdir(root)) if n.lower().endswith(data.VIDEO_EXTS)}

    def clip(self, vid, sec, offsets):
        if vid not in self.paths:
            raise FileNotFoundError(f'no video file for {vid} in '
                                    f'{os.path.dirname(next(iter(self.paths.values()), ""))}')
        n, fps, _, _ = data.video_info(self.paths[vid])
        key = int(round((sec - self.start) * fps))
        idx = [min(max(key + o, 0), n - 1) for o in offsets]
        return data.decode_frames(self.paths[vid], idx, tail_slack=3).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------------
# Clips and boxes. Train: short side 256, random 224 crop, random flip, boxes transformed with the
# frames (torchvision.transforms.v2 on a Video + BoundingBoxes). Test: short side resized, boxes
# scaled.
# --------------------------------------------------------------------------------------------------
def transform_clip(clip, boxes, *, train, input_size, short_side, flip):
    """uint8 (T, 3, H, W), pixel boxes (n, 4) xyxy -> (clip, boxes clipped to it, kept box
    indices)."""
    ops = [v2.Resize(short_side, antialias=True)]
    if train:
        ops.append(v2.RandomCrop(input_size))
        if flip:
            ops.append(v2.RandomHorizontalFlip(0.5))
    clip, boxes = v2.Compose(ops)(tv_tensors.Video(clip),
                                  tv_tensors.BoundingBoxes(boxes, format='XYXY',
                                                           canvas_size=clip.shape[-2:]))
    boxes = clip_boxes_to_image(boxes.as_subclass(torch.Tensor), clip.shape[-2:])
    # boxes the crop cut away (under a pixel wide) are dropped
    keep = remove_small_boxes(boxes, 1.0)
    return clip.as_subclass(torch.Tensor), boxes[keep], keep


def clip_offsets(num_frames, rate):
    """Frame offsets around the keyframe, official TemporalCrop: 16x4 -> -31, -27, ..., +29."""
    return [k * rate - num_frames * rate // 2 + (rate - 1) // 2 for k in range(num_frames)]


class AVAClips(torch.utils.data.Dataset):
    """One item per keyframe: dict(video uint8 (3, T, h, w), boxes (n, 4) pixels of that clip,
    labels (n, 80), scores (n,), norm_boxes (n, 4) as read, key (video_id, sec), index, failed).
    Items are a pure function of (seed, epoch, index). An unreadable clip is counted and reported:
    in training replaced by another keyframe, in evaluation returned with no box (its ground truth
    then counts as missed)."""

    def __init__(self, entries, source, *, train, num_frames, sampling_rate, input_size, short_side,
                 flip, seed=0):
        if not entries:
            raise SystemExit('error: no keyframe with a person box to '
                             + ('train on' if train else 'evaluate'))
        self.entries, self.source, self.train, self.seed = entries, source, train, seed
        self.offsets = clip_offsets(num_frames, sampling_rate)
        self.tf = dict(train=train, input_size=input_size, short_side=short_side, flip=flip)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, (tuple, list)) else (key, 0)
        failed, idx = [], index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(data.item_seed(self.seed, epoch, index))
            for _ in range(10):
                vid, sec, boxes, labels, scores = self.entries[idx]
                try:
                    clip = self.source.clip(vid, sec, self.offsets)
                except (OSError, RuntimeError) as e:      # data.VideoDecodeError is a RuntimeError
                    failed.append(f'{vid} {sec}: {e}')
                    if not self.train:
                        clip = torch.zeros(len(self.offsets), 3, 32, 32, dtype=torch.uint8)
                        boxes = boxes[:0]
                    else:
                        idx = int(torch.randint(len(self.entries), ()))
                        continue
                H, W = clip.shape[-2:]
                pix = boxes * torch.tensor([W, H, W, H])
                clip, pix, keep = transform_clip(clip, pix, **self.tf)
                return dict(video=clip.permute(1, 0, 2, 3).contiguous(), boxes=pix,
                            labels=labels[keep], scores=scores[keep], norm_boxes=boxes[keep],
                            key=(vid, sec), index=index, failed='\n'.join(failed))
        raise RuntimeError('10 clips in a row could not be read, e.g.\n' + '\n'.join(failed[:5]))


def collate(items, multiple=16):
    """Pad every clip to the batch's largest H, W rounded up to a multiple of the patch (official
    BatchCollator), with the ImageNet mean colour, which is ~0 once normalised, as the official
    zero padding."""
    H = -(-max(it['video'].shape[-2] for it in items) // multiple) * multiple
    W = -(-max(it['video'].shape[-1] for it in items) // multiple) * multiple
    video = torch.empty(len(items), 3, items[0]['video'].shape[1], H, W, dtype=torch.uint8)
    video[:] = torch.tensor([round(255 * m) for m in data.IMAGENET_MEAN],
                            dtype=torch.uint8).view(3, 1, 1, 1)
    for i, it in enumerate(items):
        video[i, :, :, :it['video'].shape[-2], :it['video'].shape[-1]] = it['video']
    cat = lambda k: torch.cat([it[k] for it in items])
    return dict(video=video, boxes=[it['boxes'] for it in items], labels=cat('labels'),
                scores=cat('scores'), norm_boxes=cat('norm_boxes'),
                keys=[it['key'] for it in items], index=torch.tensor([it['index'] for it in items]),
                failed=[it['failed'] for it in items])


# --------------------------------------------------------------------------------------------------
# The head (SlowFast's AVA head as the official AD code has it) on the classifier's tokens.
# --------------------------------------------------------------------------------------------------
class Detector(nn.Module):
    """backbone: model.build_classifier(size, 80, use_mean_pooling=False): its forward_features ends
    with the token LayerNorm (`norm`) and its `head` is the Linear(C, 80), so the weights keep the
    official AD names (patch_embed, blocks, norm, head). forward(video normalised (B, 3, T, H, W),
    boxes: list of B (n_b, 4) pixel xyxy) -> logits (sum n_b, 80)."""

    def __init__(self, backbone, dropout=0.0):
        super().__init__()
        self.backbone, self.dropout = backbone, nn.Dropout(dropout)

    def forward(self, video, boxes):
        x = self.backbone.forward_features(video)                   # (B, N, C), tokens (t, h, w)
        B, C, (T_, H_, W_) = x.shape[0], x.shape[-1], self.backbone.grid(video.shape)
        x = x.view(B, T_, H_, W_, C).mean(1).permute(0, 3, 1, 2)  # (B, C, H', W'), stride = patch
        r = roi_align(x.float(), [b.float() for b in boxes], output_size=7,
                      spatial_scale=1.0 / self.backbone.patch_size, sampling_ratio=0, aligned=False)
        r = r.amax(dim=(2, 3))                                      # MaxPool 7x7 -> (n_roi, C)
        return self.backbone.head(self.dropout(r).to(x.dtype))


def build_detector(cfg):
    # Positions: the official AD model resizes the 224-pixel (T', 14, 14) sine table bicubically to
    # the test grid (e.g. 16 x 28 at 256 x 455) instead of recomputing the flat-index table
    # (interpolate_pos).
    vit = build_classifier(cfg['model'], NUM_ACTIONS, use_mean_pooling=False, interpolate_pos=True,
                           drop_path_rate=cfg['drop_path'], **utils.shape(cfg))
    if cfg.get('finetune'):
        # pre-trained: encoder.norm -> norm;
        # Kinetics-fine-tuned: fc_norm left out, norm starts at 1/0
        report = load_checkpoint(vit, cfg['finetune'])
        print(f"loaded {cfg['finetune']} ({report['source']}): missing {report['missing']}, "
              f"unexpected {report['unexpected']}" + ''.join(f'\n  {n}' for n in report['notes']))
    return Detector(vit, cfg['head_dropout'])


def detection_loss(logits, labels):
    """Official: BCE mean over the 80 classes x number of RoIs (= sum over RoIs). Adam makes the
    scale moot."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels, reduction='sum') / NUM_ACTIONS


# --------------------------------------------------------------------------------------------------
# Frame-level AP at IoU 0.5, as the AVA evaluation (the TF object-detection Pascal evaluator)
# computes it.
# --------------------------------------------------------------------------------------------------
def average_precision(scores, is_tp, num_gt):
    """VOC area under the precision-recall curve (all points): detections of one class over all
    keyframes sorted by score, precision made monotone from the right, summed over the recall steps.
    NaN if no GT."""
    if num_gt == 0:
        return float('nan')
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind='stable')
    tp = np.asarray(is_tp, dtype=np.float64)[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    precision = np.concatenate([[0], ctp / np.maximum(ctp + cfp, 1e-12), [0]])
    recall = np.concatenate([[0], ctp / num_gt, [1]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.where(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def frame_ap(gt, detections, class_ids, excluded=(), max_dets=0, iou_threshold=0.5):
    """gt: {key: [(box, action_id), ...]}, detections: {key: [(box, action_id, score), ...]}, boxes
    normalised xyxy. Keeps the classes in class_ids, leaves out the excluded keys; max_dets > 0
    keeps the top-scored max_dets detections per keyframe (ActivityNet tool), 0 keeps all
    (SlowFast / VideoMAE). Per keyframe and class, detections by descending score take their
    highest-IoU GT box if IoU >= 0.5 and it is still free, else they are false positives
    (duplicates included).
    -> ({class_id: AP or NaN (no GT)}, {class_id: number of GT boxes})."""
    classes = set(class_ids)
    scores, tps, num_gt = defaultdict(list), defaultdict(list), defaultdict(int)
    for key in set(gt) | set(detections):
        if key in excluded:
            continue
        g = [(b, c) for b, c in gt.get(key, []) if c in classes]
        d = [(b, c, s) for b, c, s in detections.get(key, [])
             if c in classes and b[2] > b[0] and b[3] > b[1]]
        d.sort(key=lambda r: -r[2])                      # stable: ties keep the file order
        if max_dets > 0:
            d = d[:max_dets]
        for _, c in g:
            num_gt[c] += 1
        if not d:
            continue
        # IoU once per keyframe between its distinct boxes (a box carries many classes)
        gboxes, dboxes = sorted({b for b, _ in g}), sorted({b for b, _, _ in d})
        gi, di = {b: i for i, b in enumerate(gboxes)}, {b: i for i, b in enumerate(dboxes)}
        iou = box_iou(torch.tensor(dboxes, dtype=torch.float64),
                      torch.tensor(gboxes, dtype=torch.float64).view(-1, 4))
        # class -> GT box indices (a box may repeat: 2 GT)
        gt_of = defaultdict(list)
        for b, c in g:
            gt_of[c].append(gi[b])
        # class -> positions in gt_of[c] already matched
        taken = defaultdict(set)
        for b, c, s in d:
            hit = False
            if gt_of[c]:
                ious = iou[di[b], gt_of[c]]
                j = int(ious.argmax())
                if ious[j] >= iou_threshold and j not in taken[c]:
                    taken[c].add(j)
                    hit = True
            scores[c].append(s)
            tps[c].append(hit)
    return ({c: average_precision(scores[c], tps[c], num_gt[c]) for c in class_ids},
            {c: num_gt[c] for c in class_ids})


def report_ap(ap, num_gt, names, max_dets, csv_path=None):
    """Print per-class AP and the mean over the classes with ground truth; optionally write a
    CSV."""
    rated = [c for c in ap if not math.isnan(ap[c])]
    mAP = 100 * float(np.mean([ap[c] for c in rated])) if rated else float('nan')
    mode = f'top {max_dets} detections per keyframe (ActivityNet tool)' if max_dets else \
        'all detections kept (SlowFast / VideoMAE, the published variant)'
    lines = [f'frame-level AP @ IoU 0.5, {mode}',
             f'  {"id":>3}  {"class":<40} {"GT":>6}  {"AP":>6}']
    for c in sorted(ap):
        val = 'n/a (no GT, not in the mean)' if math.isnan(ap[c]) else f'{100 * ap[c]:6.2f}'
        lines.append(f'  {c:>3}  {names.get(c, "?")[:40]:<40} {num_gt[c]:>6}  {val}')
    skipped = len(ap) - len(rated)
    lines.append(f'mAP {mAP:.2f} over {len(rated)} classes'
                 + (f' ({skipped} without GT skipped)' if skipped else ''))
    print('\n'.join(lines))
    if csv_path:
        with open(csv_path, 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(['action_id', 'name', 'gt_boxes', 'ap'])
            for c in sorted(ap):
                w.writerow([c, names.get(c, ''), num_gt[c],
                            '' if math.isnan(ap[c]) else f'{100 * ap[c]:.4f}'])
    return mAP


def gt_for_eval(boxes_by_key):
    return {k: [(b, a) for b, (acts, _) in v.items() for a in acts]
            for k, v in boxes_by_key.items()}


def write_submission(path, rows):
    """AVA submission CSV: video_id,timestamp(4 digits),x1,y1,x2,y2,action_id,score (normalised
    boxes)."""
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        for (vid, sec), rs in sorted(rows.items()):
            for b, c, s in rs:
                w.writerow([vid, f'{sec:04d}', *(f'{v:.3f}' for v in b), c, f'{s:.5f}'])


def read_submission(path):
    """A detections CSV in the submission format -> {key: [(box, action_id, score), ...]}."""
    out = defaultdict(list)
    with open(path, newline='') as f:
        for n, row in enumerate(csv.reader(f), 1):
            if len(row) != 8:
                raise SystemExit(f'error: {path}:{n}: a submission row has 8 columns, '
                                 f'got {len(row)}: {row}')
            out[make_key(row[0], row[1])].append((tuple(float(v) for v in row[2:6]), int(row[6]),
                                                  float(row[7])))
    return out


# --------------------------------------------------------------------------------------------------
# Command line. The recipe row is Table 12's by --model and --kinetics_finetuned, or the synthetic
# row without --data_path; explicit flags win.
# --------------------------------------------------------------------------------------------------
def build_parser():
    def h(key, text):
        return f'{text} ({utils.recipe_help(RECIPES, key) or "no recipe default"})'
    p = argparse.ArgumentParser(description='VideoMAE action detection on AVA v2.2 (appendix § B, '
                                'Table 12). Without --data_path: the synthetic AVA-layout set on '
                                'CPU in minutes.')
    g = p.add_argument_group('data (AVA v2.2 as downloaded; paths default to the files under '
                             '--data_path)')
    g.add_argument('--data_path', help='AVA root with annotations/, frames/ + frame_lists/ '
                   '(SlowFast layout) or videos/; omitted: the synthetic AVA-layout set, generated '
                   'on first use')
    g.add_argument('--frames',
                   help='frames/<id>/<id>_000001.jpg (default <data_path>/frames if it exists)')
    g.add_argument('--videos',
                   help='<id>.mp4/.mkv/.webm decoded with PyAV (default <data_path>/videos)')
    g.add_argument('--video_start', type=float, default=0.0, help='second of the movie at which '
                   'the video files start: 0 for the movies as downloaded, 900 for 15-minute cuts')
    g.add_argument('--train_csv', help='GT (default annotations/ava_train_v2.2.csv)')
    g.add_argument('--val_csv', help='GT (default annotations/ava_val_v2.2.csv)')
    g.add_argument('--label_map', help='evaluated classes (default annotations/'
                   'ava_action_list_v2.2_for_activitynet_2019.pbtxt)')
    g.add_argument('--exclusions', help='keyframes left out of evaluation (default annotations/'
                   'ava_val_excluded_timestamps_v2.2.csv if present)')
    g.add_argument('--val_boxes', help='detected person boxes: AIA JSON '
                   '(boxes/ava_val_det_person_bbox.json) or SlowFast CSV '
                   '(annotations/ava_val_predicted_boxes.csv); default: the first found')
    g.add_argument('--det_images', help='COCO-style ava_val_v2.2_min.json with the image ids of '
                   'the AIA JSON (default annotations/ava_val_v2.2_min.json)')
    g.add_argument('--det_thresh', type=float,
                   help=h('det_thresh', 'keep detected boxes scoring >= this'))
    g.add_argument('--num_frames', type=int, help=h('num_frames', 'frames per clip'))
    g.add_argument('--sampling_rate', type=int,
                   help=h('sampling_rate', 'frame stride around the keyframe'))
    g.add_argument('--input_size', type=int, help=h('input_size', 'training crop'))
    g.add_argument('--short_side', type=int, help=h('short_side', 'short side of the frames'))
    g.add_argument('--flip', action=argparse.BooleanOptionalAction, help=h('flip', 'random flip'))
    g = utils.add_shape_flags(p, RECIPES)
    g.add_argument('--kinetics_finetuned', action='store_true', help='the backbone was fine-tuned '
                   'on Kinetics-400 after pre-training: the right column of Table 12')
    g.add_argument('--finetune', help='initial weights: a pre-trained or Kinetics-fine-tuned '
                   'checkpoint (ours or official)')
    g.add_argument('--drop_path', type=float, help=h('drop_path', 'stochastic depth rate'))
    g.add_argument('--head_dropout', type=float, help=h('head_dropout', 'dropout before the head'))
    utils.add_common_flags(p, RECIPES)
    g = p.add_argument_group('detection recipe and evaluation')
    g.add_argument('--opt_betas', '--betas', type=float, nargs=2,
                   help=h('opt_betas', 'AdamW betas'))
    g.add_argument('--layer_decay', type=float, help=h('layer_decay', 'layer-wise lr decay'))
    g.add_argument('--eval', action='store_true',
                   help='only evaluate (weights: --resume or --finetune)')
    g.add_argument('--eval_detections',
                   help='only score this detections CSV (AVA submission format)')
    g.add_argument('--eval_every', type=int, default=0,
                   help='also evaluate every N epochs (0: at the end)')
    g.add_argument('--max_dets', type=int, default=0,
                   help='detections kept per keyframe for the AP: 0 = all (SlowFast / VideoMAE, '
                   'the published numbers), 50 = the ActivityNet tool')
    return p


def recipe_key(cfg):
    if cfg['data_path'] is None:
        return 'synthetic'
    return (cfg['model'] or 'base') + ('-k400ft' if cfg['kinetics_finetuned'] else '')


def resolve(argv=None):
    cfg = utils.resolve(build_parser(), argv, lambda c: RECIPES[recipe_key(c)],
                        lambda c: f'detect-{recipe_key(c)}', init_flag='finetune')
    cfg.update(recipe=recipe_key(cfg), dataset='synthetic' if cfg['data_path'] is None else 'ava')
    utils.check_clip_flags(cfg)
    return cfg


def ava_files(cfg):
    """Fill the data paths of cfg from --data_path; a missing required file is an error
    naming it."""
    root = cfg['data_path']
    if not os.path.isdir(root):
        raise SystemExit(f'error: --data_path {root}: no such folder '
                         '(the AVA root with annotations/)')
    ann = lambda name: os.path.join(root, 'annotations', name)  # noqa: E731

    def need(flag, default):
        path = cfg[flag] or default
        if not os.path.isfile(path):
            raise SystemExit(f'error: --{flag}: {path} does not exist (under --data_path {root}?)')
        cfg[flag] = path

    need('train_csv', ann('ava_train_v2.2.csv'))
    need('val_csv', ann('ava_val_v2.2.csv'))
    need('label_map', ann('ava_action_list_v2.2_for_activitynet_2019.pbtxt'))
    if cfg['exclusions'] or os.path.isfile(ann('ava_val_excluded_timestamps_v2.2.csv')):
        need('exclusions', ann('ava_val_excluded_timestamps_v2.2.csv'))
    boxes = [os.path.join(root, 'boxes', 'ava_val_det_person_bbox.json'),
             ann('ava_val_predicted_boxes.csv'),
             ann('person_box_67091280_iou90/ava_detection_val_boxes_and_labels.csv')]
    need('val_boxes', next((b for b in boxes if os.path.isfile(b)), boxes[0]))
    cfg['det_images'] = cfg['det_images'] or ann('ava_val_v2.2_min.json')
    if not cfg['frames'] and not cfg['videos']:
        kind = 'frames' if os.path.isdir(os.path.join(root, 'frames')) else 'videos'
        cfg[kind] = os.path.join(root, kind)
    folder = cfg['frames'] or cfg['videos']
    if not os.path.isdir(folder):
        raise SystemExit(f"error: {folder} does not exist: pass --frames (SlowFast JPEG layout) "
                         "or --videos")
    return cfg


def frame_source(cfg):
    if cfg['frames']:
        lists = [os.path.join(cfg['data_path'] or '', 'frame_lists', f'{s}.csv')
                 for s in ('train', 'val')]
        return FrameFolder(cfg['frames'], [fl for fl in lists if os.path.isfile(fl)])
    return VideoFolder(cfg['videos'], cfg['video_start'])


# --------------------------------------------------------------------------------------------------
# Evaluation and the loop.
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(detector, loader, device, autocast, progress=True):
    """Every keyframe's boxes through the model -> {key: [(box normalised, action_id, score), ...]},
    merged over ranks. Score = sigmoid(logit) x detector score (official). Rank 0 gets the merge."""
    detector.eval()
    out, failures = {}, data.FailureLog(max_ratio=1.0)
    for batch in tqdm(loader, desc='eval', disable=not progress, leave=False, dynamic_ncols=True):
        failures.update(batch['failed'])
        video = data.normalize(batch['video'].to(device, non_blocking=True))
        with autocast():
            logits = detector(video, [b.to(device) for b in batch['boxes']])
        sizes = [len(b) for b in batch['boxes']]
        probs = (logits.float().sigmoid().cpu() * batch['scores'][:, None]).split(sizes)
        for i, key, bx, pr in zip(batch['index'].tolist(), batch['keys'],
                                  batch['norm_boxes'].split(sizes), probs):
            # padding duplicates of the sampler share the index
            out[i] = (key, bx.tolist(), pr)
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, out)
        out = {i: v for part in parts for i, v in part.items()}
        if dist.get_rank() != 0:
            return None
    failures.end_epoch(len(out))
    rows = defaultdict(list)
    for key, bx, pr in out.values():
        for b, p in zip(bx, pr.tolist()):
            rows[key] += [(tuple(b), c + 1, s) for c, s in enumerate(p)]
    return rows


def evaluate(detector, loader, cfg, names, val_gt, excluded, device, autocast, tag):
    """-> mAP on rank 0 (detections_<tag>.csv, ap_<tag>.csv written), None on the other ranks."""
    rows = predict(detector, loader, device, autocast)
    if rows is None:
        return None
    rows = {k: [r for r in v if r[1] in names] for k, v in rows.items()}     # the evaluated classes
    path = os.path.join(cfg['output_dir'], f'detections_{tag}.csv')
    write_submission(path, rows)
    print(f'detections written to {path} (AVA submission format)')
    ap, num_gt = frame_ap(gt_for_eval(val_gt), rows, sorted(names), excluded, cfg['max_dets'])
    return report_ap(ap, num_gt, names, cfg['max_dets'],
                     os.path.join(cfg['output_dir'], f'ap_{tag}.csv'))


def main(argv=None):
    cfg = resolve(argv)
    if cfg['dataset'] == 'synthetic':
        cfg['data_path'] = synthetic.ensure_ava()
    ava_files(cfg)
    d = utils.init_distributed(cfg['device'])
    utils.seed_everything(cfg['seed'] + d.rank)
    names, excluded = read_label_map(cfg['label_map']), read_excluded(cfg['exclusions'])
    val_gt = read_ava_csv(cfg['val_csv'])
    if cfg['eval_detections']:  # score a detections file, nothing else
        ap, num_gt = frame_ap(gt_for_eval(val_gt), read_submission(cfg['eval_detections']),
                              sorted(names), excluded, cfg['max_dets'])
        return report_ap(ap, num_gt, names, cfg['max_dets']) if d.is_main else None
    vb = cfg['val_boxes']
    val_boxes = (read_aia_json(vb, cfg['det_images']) if vb.endswith('.json')
                 else read_ava_csv(vb, True))
    source = frame_source(cfg)
    clips = dict(num_frames=cfg['num_frames'], sampling_rate=cfg['sampling_rate'],
                 short_side=cfg['short_side'], input_size=cfg['input_size'], seed=cfg['seed'])
    detector = build_detector(cfg).to(d.device)
    vit = detector.backbone                        # checkpoints keep the official AD names
    collate_fn = functools.partial(collate, multiple=vit.patch_size)
    val_set = AVAClips(entries_from(val_boxes, cfg['det_thresh'], skip=excluded), source,
                       train=False, flip=False, **clips)
    val_loader = data.make_loader(val_set, cfg['batch_size'], train=False,
                                  num_workers=cfg['num_workers'], collate_fn=collate_fn)
    autocast = utils.amp_setup(d.device, cfg['precision'])[0]
    resume = cfg['resume'] if cfg['resume'] not in ('auto', '') else None
    if cfg['eval']:
        if not (resume or cfg['finetune']):
            raise SystemExit('error: --eval needs weights: --resume CHECKPOINT or '
                             '--finetune CHECKPOINT')
        if resume:
            vit.load_state_dict(utils.load_state(resume)['model'])
        lock = utils.lock_output_dir(cfg['output_dir']) if d.is_main else None
    else:
        train_set = AVAClips(entries_from(read_ava_csv(cfg['train_csv'])), source, train=True,
                             flip=cfg['flip'], **clips)
        loader = data.make_loader(train_set, cfg['batch_size'], train=True,
                                  num_workers=cfg['num_workers'], seed=cfg['seed'],
                                  collate_fn=collate_fn)
        groups = utils.param_groups(vit, cfg['weight_decay'], cfg['layer_decay'], len(vit.blocks))
        optimizer = utils.make_adamw(groups, cfg['lr'], cfg['opt_betas'], d.device)
        run = utils.start(cfg, 'detect', d, vit, optimizer, loader, sorted(names),
                          data.FailureLog(), net=detector)
        autocast, lock = run.autocast, run.lock

        def loss_of(batch, micro):
            # video (B, 3, T, H, W), boxes B x (n_b, 4)
            video = data.normalize(batch['video'].to(d.device, non_blocking=True))
            boxes = [b.to(d.device, non_blocking=True) for b in batch['boxes']]
            return detection_loss(run.net(video, boxes), batch['labels'].to(d.device))

        for epoch in range(run.start_epoch, cfg['epochs']):
            for _ in utils.steps(run, epoch):
                utils.train_step(run, loss_of)
            m = None
            if (cfg['eval_every'] and (epoch + 1) % cfg['eval_every'] == 0
                    and epoch + 1 < cfg['epochs']):
                m = evaluate(detector, val_loader, cfg, names, val_gt, excluded, d.device, autocast,
                             f'epoch{epoch + 1}')
            utils.end_epoch(run, epoch, **({} if m is None else {'mAP': m}))
        run.bar.close()
    m = evaluate(detector, val_loader, cfg, names, val_gt, excluded, d.device, autocast, 'val')
    if d.is_main:
        utils.Log(cfg['output_dir']).write('final', None, mAP=m)
    del lock
    utils.cleanup_distributed()


if __name__ == '__main__':
    utils.main(main)
