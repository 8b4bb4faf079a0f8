"""VideoMAE on AVA v2.2: spatio-temporal action detection (appendix § B "AVA", Table 12).

The backbone is the fine-tuning ViT of model.py; the head is the SlowFast detection head the
appendix follows (as in the official VideoMAE-Action-Detection code): token LayerNorm ->
(C, T', H', W') -> mean over time -> RoIAlign 7x7 per person box -> max over the 7x7 -> dropout ->
Linear to the 80 AVA actions -> sigmoid (multi-label), on 16 x 4 frames at 25 fps. Training sees
ground-truth person boxes, jittered, in HSV-jittered clips, inference the detector's boxes with
score >= 0.8, widened for the RoIs. Metric: frame-level AP at IoU 0.5 of the 60 classes, and mAP.

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
import re
from collections import Counter, defaultdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.ops import box_convert, box_iou, clip_boxes_to_image, remove_small_boxes, roi_align
from torchvision.transforms import v2
from tqdm import tqdm

import checkpoints
import data
import synthetic
import utils
from model import build_classifier


# -- Recipes: Table 12, AVA v2.2 -------------------------------------------------------------------
# Its columns: without (key = size) and with (key = size-k400ft) the extra supervised fine-tuning
# of the backbone on Kinetics-400. Both: AdamW (0.9, 0.999), wd 0.05, batch 128, cosine, 5 warm-up
# epochs, no repeated augmentation, flip, drop path 0.2, lr = base x batch / 256 (appendix § B).
# The official AD scripts: per-GPU batch, min lr, 16x4 clips, short side 256 / crop 224. Its code
# (MCG-NJU/VideoMAE-Action-Detection): no head dropout (SlowFast's AVA configs: 0.5); box_jitter,
# test_box_extend: modeling_finetune.py's random_aug(0.2, 0.1, 0.1, 0.05), test_ext (0.1, 0.05) of
# AlphAction's bounding_box.py; color_jitter: data/transforms.py's HUE 20 / 2, SAT, VAL 0.1 x 255;
# clip_fps: AlphAction's clips are 25 fps (tools/ava/process_ava_videos.py): 16 x 4 = 2.56 s.
AVA = dict(weight_decay=0.05, opt_betas=[0.9, 0.999], total_batch=128, warmup_epochs=5, clip_fps=25,
           drop_path=0.2, flip=True, min_lr=1e-6, num_frames=16, sampling_rate=4, input_size=224,
           short_side=256, det_thresh=0.8, head_dropout=0.0, num_workers=8, save_ckpt_freq=10,
           box_jitter=[0.2, 0.1, 0.1, 0.05], test_box_extend=[0.1, 0.05], color_jitter=[10, 26, 26])
RECIPES = {
    'small':        dict(AVA, model='small', lr=1e-3, epochs=30, layer_decay=0.6, batch_size=8),
    'base':         dict(AVA, model='base', lr=2.5e-4, epochs=30, layer_decay=0.75, batch_size=4),
    'large':        dict(AVA, model='large', lr=2.5e-4, epochs=30, layer_decay=0.75, batch_size=4),
    'huge':         dict(AVA, model='huge', lr=5e-4, epochs=20, layer_decay=0.8, batch_size=2),
    'small-k400ft': dict(AVA, model='small', lr=5e-4, epochs=30, layer_decay=0.6, batch_size=8),
    'base-k400ft':  dict(AVA, model='base', lr=5e-4, epochs=30, layer_decay=0.75, batch_size=4),
    'large-k400ft': dict(AVA, model='large', lr=5e-4, epochs=20, layer_decay=0.8, batch_size=4),
    'huge-k400ft':  dict(AVA, model='huge', lr=5e-4, epochs=20, layer_decay=0.8, batch_size=2),
    # Ours: a tiny ViT trained from scratch on the synthetic AVA-layout set, on a CPU in minutes.
    'synthetic': dict(AVA, model='small', embed_dim=64, depth=2, num_heads=2, patch_size=8,
                      lr=2e-2, epochs=30, layer_decay=1.0, drop_path=0.0, warmup_epochs=1,
                      total_batch=8, batch_size=8, num_frames=4, input_size=64, short_side=64,
                      num_workers=0, min_lr=1e-5),
}
AVA_FPS = 30        # SlowFast frames are extracted at 30 fps from the cut that starts at 15:00
WINDOW_START = 900  # keyframe of second s = frame (s - 900) x 30 of that cut
NUM_ACTIONS = 80    # the model predicts all 80 AVA ids (1..80); evaluation keeps the label map's 60
# --flag: (its files under --data_path as distributed, the first found is the default; what it is)
AVA_FILES = {
    'train_csv': (['annotations/ava_train_v2.2.csv'], 'training GT'),
    'val_csv': (['annotations/ava_val_v2.2.csv'], 'validation GT'),
    'label_map': (['annotations/ava_action_list_v2.2_for_activitynet_2019.pbtxt'], 'the classes'),
    'exclusions': (['annotations/ava_val_excluded_timestamps_v2.2.csv'], 'keyframes not evaluated'),
    'val_boxes': (['boxes/ava_val_det_person_bbox.json', 'annotations/ava_val_predicted_boxes.csv',
                   'annotations/person_box_67091280_iou90/ava_detection_val_boxes_and_labels.csv'],
                  'detected person boxes: AIA JSON or SlowFast CSV'),
    'det_images': (['annotations/ava_val_v2.2_min.json'], 'COCO-style image ids of the AIA JSON'),
}


# -- AVA annotations: label map, CSV rows, AIA JSON; grouped per keyframe and box ------------------
def read_label_map(path):
    """pbtxt of `item { name: ".." id: N }` or `label { name: ".." label_id: N }` -> {id: name}."""
    with open(path) as f:
        pairs = re.findall(r'\bname:\s*"(.*?)"\s*(?:label_)?id:\s*(\d+)', f.read())
    if not pairs:
        raise SystemExit(f'error: {path}: no `name:` / `id:` entries: not an AVA label map')
    return {int(i): name for name, i in pairs}


def csv_rows(path, widths, parse):
    """parse(row) of each non-empty row of a CSV of `widths` columns; a bad row: file:line error."""
    with open(path, newline='') as f:
        for n, row in ((n, r) for n, r in enumerate(csv.reader(f), 1) if r):
            try:
                if len(row) not in widths:
                    raise ValueError(f'expected {" or ".join(map(str, widths))} columns')
                yield parse(row)
            except ValueError as e:
                raise SystemExit(f'error: {path}:{n}: {e} in row {row}') from None


def read_ava_csv(path, detections=False):
    """GT (video_id,timestamp,x1,y1,x2,y2,action_id,person_id) or detections (score last, action
    maybe empty) -> {(video_id, sec): {box normalised xyxy: [set of action ids, score]}}."""
    parse = lambda r: ((r[0], int(r[1])), tuple(round(float(v), 4) for v in r[2:6]),  # 0902 = 902
                       int(r[6]) if r[6].strip() not in ('', '-1') else None,
                       float(r[7]) if detections and len(r) == 8 else 1.0)
    out = defaultdict(dict)
    for key, box, action, score in csv_rows(path, (7, 8), parse):
        entry = out[key].setdefault(box, [set(), score])
        entry[0].update([action] if action is not None else [])
        entry[1] = max(entry[1], score)
    return out


def read_submission(path):
    """A detections CSV in the submission format -> {key: [(box, action_id, score), ...]}."""
    out = defaultdict(list)
    for key, det in csv_rows(path, (8,), lambda r: ((r[0], int(r[1])), (
            tuple(float(v) for v in r[2:6]), int(r[6]), float(r[7])))):
        out[key].append(det)
    return out


def read_excluded(path):
    return set(csv_rows(path, (2,), lambda r: (r[0], int(r[1])))) if path else set()


def read_aia_json(path, images_path):
    """AIA/AlphAction person boxes (what VideoMAE used): [{image_id, bbox [x, y, w, h] in pixels,
    score}]; images_path (ava_val_v2.2_min.json) gives each image id its movie, second and size."""
    if not images_path or not os.path.isfile(images_path):
        raise SystemExit(f'error: {path} is an AIA JSON box file; it needs the `images` of '
                         f'ava_val_v2.2_min.json: pass --det_images (not found: {images_path})')
    with open(images_path) as f:
        images = {im['id']: im for im in json.load(f)['images']}
    out = defaultdict(dict)
    with open(path) as f:
        for det in json.load(f):
            if det['image_id'] not in images:
                raise SystemExit(f"error: {path}: image_id {det['image_id']} not in {images_path}")
            im, (x, y, w, h) = images[det['image_id']], det['bbox']
            W, H = im['width'], im['height']
            box = tuple(round(v, 4) for v in (x / W, y / H, (x + w) / W, (y + h) / H))
            out[im['movie'], int(im['timestamp'])][box] = [set(), float(det['score'])]
    return out


def entries_from(boxes_by_key, min_score=0.0, skip=()):
    """-> sorted list of (video_id, sec, boxes (n, 4) normalised, multi-hot (n, 80), scores (n,));
    a keyframe left with no box scoring >= min_score is dropped, as the official code drops it."""
    out = []
    for key in sorted(set(boxes_by_key) - set(skip)):
        rows = [(b, a, s) for b, (a, s) in boxes_by_key[key].items() if s >= min_score]
        if rows:
            boxes, acts, scores = zip(*rows)
            hot = torch.tensor([[a in x for a in range(1, NUM_ACTIONS + 1)] for x in acts]).float()
            out.append((*key, torch.tensor(boxes).clamp(0, 1), hot, torch.tensor(scores)))
    return out


# -- Frames: the SlowFast JPEG layout, or the videos decoded with PyAV -----------------------------
# Both return uint8 (T, 3, H, W) for the frame offsets around the keyframe, counted at fps (0: the
# source's own), of the nearest frames clamped into the video.
class FrameFolder:
    """frames/<id>/<id>_000001.jpg at 30 fps (frame 0 = 15:00), listed by
    frame_lists/{train,val}.csv, else each folder's .jpg in name order."""

    def __init__(self, root, frame_lists=()):
        self.root, self.paths = root, {}
        for fl in frame_lists:
            frames = defaultdict(list)           # one pass, by video then frame id: ~8 M rows
            with open(fl) as f:
                next(f)                          # `original_vido_id video_id frame_id path labels`
                for vid, _, frame_id, path, *_ in filter(None, map(str.split, f)):
                    frames[vid].append((int(frame_id), os.path.join(root, path)))
            self.paths.update({vid: [p for _, p in sorted(rows)] for vid, rows in frames.items()})

    def clip(self, vid, sec, offsets, fps=0):
        if vid not in self.paths:                # no frame list: the folder itself, in name order
            folder = os.path.join(self.root, vid)
            self.paths[vid] = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
                               if n.endswith('.jpg')]
        paths, key, r = self.paths[vid], (sec - WINDOW_START) * AVA_FPS, AVA_FPS / (fps or AVA_FPS)
        idx = [min(max(key + round(o * r), 0), len(paths) - 1) for o in offsets]
        decoded = {i: decode_jpeg(read_file(paths[i]), mode=ImageReadMode.RGB) for i in set(idx)}
        return torch.stack([decoded[i] for i in idx])


class VideoFolder:
    """videos/<id>.{mp4,mkv,webm,...}: whole movies (--video_start 0, as downloaded) or the
    15-minute cuts starting at 15:00 (--video_start 900)."""

    def __init__(self, root, start=0):
        self.root, self.start = root, start
        self.paths = {os.path.splitext(n)[0]: os.path.join(root, n)
                      for n in sorted(os.listdir(root)) if n.lower().endswith(data.VIDEO_EXTS)}

    def clip(self, vid, sec, offsets, fps=0):
        if vid not in self.paths:
            raise FileNotFoundError(f'no video file for {vid} in {self.root}')
        n, rate, _, _ = data.video_info(self.paths[vid])
        idx = [min(max(round((sec - self.start) * rate) + round(o * rate / (fps or rate)), 0),
                   n - 1) for o in offsets]
        return data.decode_frames(self.paths[vid], idx, tail_slack=3).permute(0, 3, 1, 2)


# -- Clips and boxes -------------------------------------------------------------------------------
# Train: short side 256, random 224 crop, random flip, boxes moved with the frames (transforms.v2 on
# a Video + BoundingBoxes), colour and box jitter. Test: short side resized, boxes scaled, extended.
def transform_clip(clip, boxes, *, train, input_size, short_side, flip):
    """uint8 (T, 3, H, W), pixel boxes (n, 4) xyxy -> (clip, boxes clipped to it, kept indices)."""
    crop = [v2.RandomCrop(input_size)] + ([v2.RandomHorizontalFlip(0.5)] if flip else [])
    ops = [v2.Resize(short_side, antialias=True)] + (crop if train else [])
    boxes = tv_tensors.BoundingBoxes(boxes, format='XYXY', canvas_size=clip.shape[-2:])
    clip, boxes = v2.Compose(ops)(tv_tensors.Video(clip), boxes)
    boxes = clip_boxes_to_image(boxes.as_subclass(torch.Tensor), clip.shape[-2:])
    keep = remove_small_boxes(boxes, 1.0)        # the crop cut them away (under a pixel wide)
    return clip.as_subclass(torch.Tensor), boxes[keep], keep


def jitter_boxes(boxes, size, x_out, x_in, y_out, y_in):
    """AlphAction's random_aug: x1 += w U(-x_out, x_in), y1 += h U(-y_out, y_in), x2 += w U(-x_in,
    x_out), y2 += h U(-y_in, y_out) (w, h the box's), then in the (H, W) image, >= 1 pixel wide."""
    lo, hi = torch.tensor([[-x_out, -y_out, -x_in, -y_in], [x_in, y_in, x_out, y_out]])
    b = boxes + torch.lerp(lo, hi, torch.rand(boxes.shape)) * (boxes[:, 2:] - boxes[:, :2]).tile(2)
    lt = b[:, :2].clamp(min=0).minimum(torch.tensor(size[::-1]) - 1.0)     # x1 <= W - 1
    return torch.cat([lt, b[:, 2:].minimum(torch.tensor(size[::-1])).maximum(lt + 1)], 1)


def extend_boxes(boxes, size, sx, sy):
    """Test RoIs: sx x the width and sy x the height added, centred, clipped to the (H, W) image."""
    c = box_convert(boxes, 'xyxy', 'cxcywh') * torch.tensor([1, 1, 1 + sx, 1 + sy])
    return clip_boxes_to_image(box_convert(c, 'cxcywh', 'xyxy'), size)


def jitter_colour(clip, dh, ds, dv):
    """uint8 (T, 3, H, W) shifted in OpenCV's uint8 HSV (H 0..179, S, V 0..255): H by dh around the
    circle, S by ds, V by dv, clamped. In float: 99 % of values as cv2's, some off by up to ~9."""
    (r, g, b), v, c = (x := clip.float() / 255).unbind(1), x.amax(1), x.amax(1) - x.amin(1)
    h = torch.where(v == r, (g - b) / c % 6, torch.where(v == g, (b - r) / c + 2, (r - g) / c + 4))
    h = ((h.nan_to_num() * 30).round() + dh) % 180 / 30       # grey (0 / 0): hue 0, as OpenCV's
    s = ((c / v).nan_to_num() * 255).round().add(ds).clamp(0, 255) / 255
    v, k = (v + dv / 255).clamp(0, 1), (torch.tensor([5.0, 3, 1]).view(3, 1, 1) + h[:, None]) % 6
    return (255 * v[:, None] * (1 - s[:, None] * k.minimum(4 - k).clamp(0, 1))).round().byte()


def clip_offsets(num_frames, rate):
    """Frame offsets around the keyframe, official TemporalCrop: 16x4 -> -31, -27, ..., +29."""
    return [k * rate - num_frames * rate // 2 + (rate - 1) // 2 for k in range(num_frames)]


class AVAClips(torch.utils.data.Dataset):
    """One item per keyframe, a pure function of (seed, epoch, index): dict(video uint8
    (3, T, h, w), boxes (n, 4) pixels, labels (n, 80), scores (n,), norm_boxes (n, 4) as read, key,
    index, failed). An unreadable clip is reported: in training replaced by another keyframe, in
    evaluation returned with no box (its GT then counts missed). Training: color_jitter,
    box_jitter; test: test_box_extend (boxes, not norm_boxes). Each empty or 0: off."""

    def __init__(self, entries, source, *, train, num_frames, sampling_rate, input_size, short_side,
                 flip, seed=0, box_jitter=(), test_box_extend=(), color_jitter=(), clip_fps=0):
        self.entries, self.source, self.train, self.seed = entries, source, train, seed
        self.offsets, self.fps = clip_offsets(num_frames, sampling_rate), max(clip_fps or 0, 0)
        self.tf = dict(train=train, input_size=input_size, short_side=short_side, flip=flip)
        self.colour, self.move, self.arg = (color_jitter, jitter_boxes, box_jitter) if train \
            else ((), extend_boxes, test_box_extend)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, (tuple, list)) else (key, 0)
        failed, idx = [], index
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(data.item_seed(self.seed, epoch, index))
            for _ in range(10):
                vid, sec, boxes, labels, scores = self.entries[idx]
                try:
                    clip = self.source.clip(vid, sec, self.offsets, self.fps)
                except (OSError, RuntimeError) as e:      # data.VideoDecodeError is a RuntimeError
                    failed.append(f'{vid} {sec}: {e}')
                    if self.train:
                        idx = int(torch.randint(len(self.entries), ()))
                        continue
                    clip, boxes = torch.zeros(len(self.offsets), 3, 32, 32).byte(), boxes[:0]
                H, W = clip.shape[-2:]
                clip, pix, keep = transform_clip(clip, boxes * torch.tensor([W, H] * 2), **self.tf)
                if any(self.colour or ()):      # one draw per clip, integers in +-bounds (official)
                    clip = jitter_colour(clip, *(torch.randint(-c, c + 1, ()) for c in self.colour))
                pix = self.move(pix, clip.shape[-2:], *self.arg) if any(self.arg or ()) else pix
                return dict(video=clip.permute(1, 0, 2, 3).contiguous(), boxes=pix,
                            labels=labels[keep], scores=scores[keep], norm_boxes=boxes[keep],
                            key=(vid, sec), index=index, failed='\n'.join(failed))
        raise RuntimeError('10 clips in a row could not be read, e.g.\n' + '\n'.join(failed[:5]))


def collate(items, multiple=16):
    """Pad every clip to the batch's largest H, W rounded up to a multiple of the patch (official
    BatchCollator), with the ImageNet mean colour: ~0 once normalised, as the official zeros."""
    H, W = (-(-max(it['video'].shape[i] for it in items) // multiple) * multiple for i in (-2, -1))
    video = torch.empty(len(items), 3, items[0]['video'].shape[1], H, W, dtype=torch.uint8)
    video[:] = torch.tensor([round(255 * m) for m in data.IMAGENET_MEAN]).view(3, 1, 1, 1)
    for i, it in enumerate(items):
        video[i, :, :, :it['video'].shape[-2], :it['video'].shape[-1]] = it['video']
    col = lambda k: [it[k] for it in items]
    return dict(video=video, boxes=col('boxes'), keys=col('key'), index=torch.tensor(col('index')),
                labels=torch.cat(col('labels')), scores=torch.cat(col('scores')),
                norm_boxes=torch.cat(col('norm_boxes')), failed=col('failed'))


# -- The head: SlowFast's AVA head (as the official AD code has it) on the ViT's tokens ------------
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
    # the test grid (e.g. 16 x 28 at 256 x 455) instead of recomputing the flat-index table.
    vit = build_classifier(cfg['model'], NUM_ACTIONS, use_mean_pooling=False, interpolate_pos=True,
                           drop_path_rate=cfg['drop_path'], **utils.shape(cfg))
    if cfg.get('finetune'):  # pre-trained: encoder.norm -> norm; K400-tuned: fc_norm out, norm 1/0
        checkpoints.load_weights(vit, cfg['finetune'], '--finetune')
    return Detector(vit, cfg['head_dropout'])


def detection_loss(logits, labels):
    """Official: BCE mean over 80 classes x RoIs (= sum over RoIs; Adam makes the scale moot)."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels, reduction='sum') / NUM_ACTIONS


# -- Frame-level AP at IoU 0.5, as the AVA evaluation (TF Pascal evaluator) has it -----------------
def average_precision(scores, is_tp, num_gt):
    """VOC area under the precision-recall curve (all points), NaN if no GT: one class's detections
    of all keyframes by score, precision made monotone from the right, summed over recall steps."""
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
    """gt {key: [(box, action_id), ...]}, detections {key: [(box, action_id, score), ...]}, boxes
    normalised xyxy -> ({class_id: AP or NaN (no GT)}, {class_id: number of GT boxes}) over
    class_ids and the keys not excluded. max_dets > 0 keeps each keyframe's max_dets best detections
    (ActivityNet tool), 0 all (SlowFast / VideoMAE). Per keyframe and class, detections by
    descending score take their highest-IoU GT box if IoU >= 0.5 and it is still free, else they
    are false positives (duplicates included)."""
    classes = set(class_ids)
    scores, tps, num_gt = defaultdict(list), defaultdict(list), Counter()
    for key in sorted(set(gt) | set(detections)):     # ties in score: the same order every run
        if key in excluded:
            continue
        g = [(b, c) for b, c in gt.get(key, []) if c in classes]
        d = sorted([(b, c, s) for b, c, s in detections.get(key, [])   # a stable sort: ties
                    if c in classes and b[2] > b[0] and b[3] > b[1]],   # keep the file order
                   key=lambda r: -r[2])[:max_dets if max_dets > 0 else None]
        num_gt.update(c for _, c in g)
        iou = box_iou(torch.tensor([b for b, _, _ in d], dtype=torch.float64).view(-1, 4),
                      torch.tensor([b for b, _ in g], dtype=torch.float64).view(-1, 4))
        gt_of = {c: [i for i, (_, c2) in enumerate(g) if c2 == c] for _, c in g}  # its rows of g
        taken = defaultdict(set)                 # class -> positions in gt_of[c] already matched
        for k, (_, c, s) in enumerate(d):
            ious = iou[k, gt_of.get(c, [])]      # (number of GT of class c,)
            j = int(ious.argmax()) if len(ious) else -1
            hit = j >= 0 and bool(ious[j] >= iou_threshold) and j not in taken[c]
            taken[c].update([j] if hit else [])
            scores[c].append(s)
            tps[c].append(hit)
    return ({c: average_precision(scores[c], tps[c], num_gt[c]) for c in class_ids},
            {c: num_gt[c] for c in class_ids})


def report_ap(ap, num_gt, names, max_dets, csv_path=None):
    """Print per-class AP and the mean over the classes with GT (also to csv_path) -> mAP in %."""
    rated = [c for c in ap if not math.isnan(ap[c])]
    mAP = 100 * float(np.mean([ap[c] for c in rated])) if rated else float('nan')
    mode = (f'top {max_dets} detections per keyframe (ActivityNet tool)' if max_dets
            else 'all detections kept (SlowFast / VideoMAE, the published variant)')
    rows = [(c, names.get(c, ''), num_gt[c], 100 * ap[c]) for c in sorted(ap)]
    print(f'frame-level AP @ IoU 0.5, {mode}\n  {"id":>3}  {"class":<40} {"GT":>6}  {"AP":>6}')
    for c, name, n, a in rows:
        val = 'n/a (no GT, not in the mean)' if math.isnan(a) else f'{a:6.2f}'
        print(f'  {c:>3}  {(name or "?")[:40]:<40} {n:>6}  {val}')
    skipped = f' ({len(ap) - len(rated)} without GT skipped)' if len(rated) < len(ap) else ''
    print(f'mAP {mAP:.2f} over {len(rated)} classes{skipped}')
    if csv_path:
        with open(csv_path, 'w', newline='') as f:
            csv.writer(f).writerows([('action_id', 'name', 'gt_boxes', 'ap')] + [
                (c, name, n, '' if math.isnan(a) else f'{a:.4f}') for c, name, n, a in rows])
    return mAP


# -- Command line: the recipe row gives the defaults, explicit flags win ---------------------------
def build_parser():
    h = lambda key, text: f'{text} ({utils.recipe_help(RECIPES, key) or "no recipe default"})'
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    g = p.add_argument_group('data (AVA v2.2 as downloaded; paths default to --data_path/...)')
    g.add_argument('--data_path', help='AVA root with annotations/, frames/ + frame_lists/ '
                   '(SlowFast layout) or videos/; omitted: the synthetic set, made on first use')
    g.add_argument('--frames', help='frames/<id>/<id>_000001.jpg (default: frames/ if it exists)')
    g.add_argument('--videos', help='<id>.mp4/.mkv/.webm decoded with PyAV (default: videos/)')
    g.add_argument('--video_start', type=float, default=0.0, help='second of the movie at which '
                   'the video files start: 0 for the movies as downloaded, 900 for 15-minute cuts')
    for flag, (names, text) in AVA_FILES.items():
        g.add_argument(f'--{flag}', help=f'{text} (default: {", else ".join(names)})')
    for flag, kind, text, *n in [       # n: '*' (none or 0: off)
            ('det_thresh', float, 'keep detected boxes scoring >= this'),
            ('num_frames', int, 'frames per clip'), ('input_size', int, 'training crop'),
            ('sampling_rate', int, 'frame stride around the keyframe'),
            ('short_side', int, 'short side of the frames'),
            ('clip_fps', float, "fps of the frame offsets; <= 0: the source's"),
            ('box_jitter', float, 'training boxes: x1 += w U(-X_OUT, X_IN), y1 += h U(-Y_OUT, '
             'Y_IN), x2, y2 by U(-IN, OUT); none or 0: off', '*'),
            ('test_box_extend', float, 'test RoIs widened by X x w, Y x h; none or 0: off', '*'),
            ('color_jitter', int, 'training HSV shift (OpenCV units); none or 0: off', '*')]:
        g.add_argument(f'--{flag}', type=kind, nargs=(n or [None])[0], help=h(flag, text))
    g.add_argument('--flip', action=argparse.BooleanOptionalAction, help=h('flip', 'random flip'))
    g = utils.add_shape_flags(p, RECIPES)
    g.add_argument('--kinetics_finetuned', action='store_true', help='the backbone was fine-tuned '
                   'on Kinetics-400 after pre-training: the right column of Table 12')
    g.add_argument('--finetune', help='pre-trained or Kinetics-fine-tuned weights (ours, official)')
    g.add_argument('--drop_path', type=float, help=h('drop_path', 'stochastic depth rate'))
    g.add_argument('--head_dropout', type=float, help=h('head_dropout', 'dropout before the head'))
    utils.add_common_flags(p, RECIPES)           # with --opt_betas and --layer_decay
    g = p.add_argument_group('evaluation')
    g.add_argument('--eval', action='store_true', help='only evaluate --resume/--finetune weights')
    g.add_argument('--eval_detections', help='only score this detections CSV (submission format)')
    g.add_argument('--eval_every', type=int, default=0, help='also evaluate every N epochs; 0: off')
    g.add_argument('--max_dets', type=int, default=0, help='detections kept per keyframe for the '
                   'AP: 0 = all (SlowFast / VideoMAE, published), 50 = the ActivityNet tool')
    return p


def recipe_key(cfg):
    """Table 12's row by --model and --kinetics_finetuned; the synthetic one without --data_path."""
    return 'synthetic' if cfg['data_path'] is None else \
        (cfg['model'] or 'base') + ('-k400ft' if cfg['kinetics_finetuned'] else '')


def resolve(argv=None):
    cfg = utils.resolve(build_parser(), argv, lambda c: RECIPES[recipe_key(c)],
                        lambda c: f'detect-{recipe_key(c)}', init_flag='finetune')
    cfg.update(recipe=recipe_key(cfg), dataset='synthetic' if cfg['data_path'] is None else 'ava')
    utils.check_clip_flags(cfg)
    for flag, n in (('box_jitter', 4), ('test_box_extend', 2), ('color_jitter', 3)):
        if any(cfg[flag]) and len(cfg[flag]) != n:
            utils.flag_error(f'--{flag} takes {n} values (none or 0: off), got {cfg[flag]}')
    return cfg


def ava_files(cfg):
    """cfg's AVA_FILES and frames / videos from --data_path (none: the synthetic set), or errors."""
    root = cfg['data_path'] = cfg['data_path'] or synthetic.ensure_ava()
    if not os.path.isdir(root):
        raise SystemExit(f'error: --data_path {root}: no such folder (the AVA root)')
    for flag, (names, _) in AVA_FILES.items():
        paths = [os.path.join(root, n) for n in names]
        found = next((path for path in paths if os.path.isfile(path)), None)
        cfg[flag] = cfg[flag] or found or (None if flag == 'exclusions' else paths[0])  # optional
        if cfg[flag] and flag != 'det_images' and not os.path.isfile(cfg[flag]):
            raise SystemExit(f'error: --{flag}: {cfg[flag]} does not exist (under --data_path?)')
    if not cfg['frames'] and not cfg['videos']:
        kind = 'frames' if os.path.isdir(os.path.join(root, 'frames')) else 'videos'
        cfg[kind] = os.path.join(root, kind)
    if not os.path.isdir(cfg['frames'] or cfg['videos']):
        raise SystemExit(f"error: {cfg['frames'] or cfg['videos']} does not exist: pass --frames "
                         "(SlowFast JPEG layout) or --videos")
    return cfg


# -- Evaluation and the loop -----------------------------------------------------------------------
@torch.no_grad()
def predict(detector, loader, device, autocast, classes):
    """Every keyframe's boxes -> {key: [(box normalised, action_id in classes, score), ...]} merged
    over ranks on rank 0, None on the others. Score = sigmoid(logit) x detector score (official)."""
    detector.eval()
    out, failures = {}, data.FailureLog(max_ratio=1.0)
    for batch in tqdm(loader, desc='eval', leave=False, dynamic_ncols=True):
        failures.update(batch['failed'])
        video = data.normalize(batch['video'].to(device, non_blocking=True))
        with autocast():
            logits = detector(video, [b.to(device) for b in batch['boxes']])
        sizes = [len(b) for b in batch['boxes']]
        probs = (logits.float().sigmoid().cpu() * batch['scores'][:, None]).split(sizes)
        for i, key, bx, pr in zip(batch['index'].tolist(), batch['keys'],
                                  batch['norm_boxes'].split(sizes), probs):
            out[i] = (key, bx.tolist(), pr)      # padding duplicates of the sampler share the index
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, out)
        out = {i: v for part in parts for i, v in part.items()}
        if dist.get_rank() != 0:
            return None
    failures.end_epoch(len(out))
    return {key: [(tuple(b), c + 1, s) for b, p in zip(bx, pr.tolist())
                  for c, s in enumerate(p) if c + 1 in classes] for key, bx, pr in out.values()}


def main(argv=None):
    cfg = ava_files(resolve(argv))
    d = utils.init_distributed(cfg['device'])
    utils.seed_everything(cfg['seed'] + d.rank)
    names, excluded = read_label_map(cfg['label_map']), read_excluded(cfg['exclusions'])
    gt = {k: [(b, a) for b, (acts, _) in v.items() for a in acts]    # one row per box and action
          for k, v in read_ava_csv(cfg['val_csv']).items()}

    score = lambda rows, csv_path=None: report_ap(*frame_ap(
        gt, rows, sorted(names), excluded, cfg['max_dets']), names, cfg['max_dets'], csv_path)
    if cfg['eval_detections']:  # score a detections file, nothing else
        return score(read_submission(cfg['eval_detections'])) if d.is_main else None
    vit = (detector := build_detector(cfg).to(d.device)).backbone  # the official AD names
    lists = [os.path.join(cfg['data_path'], 'frame_lists', s) for s in ('train.csv', 'val.csv')]
    source = FrameFolder(cfg['frames'], [fl for fl in lists if os.path.isfile(fl)]) \
        if cfg['frames'] else VideoFolder(cfg['videos'], cfg['video_start'])

    def loader(entries, train):
        clips = AVAClips(entries, source, train=train, flip=train and cfg['flip'], **{
            k: cfg[k] for k in ('num_frames', 'sampling_rate', 'input_size', 'short_side', 'seed',
                                'box_jitter', 'test_box_extend', 'color_jitter', 'clip_fps')})
        return data.make_loader(clips, cfg['batch_size'], train=train, seed=cfg['seed'],
                                num_workers=cfg['num_workers'],
                                collate_fn=functools.partial(collate, multiple=vit.patch_size))

    vb = cfg['val_boxes']
    vb = read_aia_json(vb, cfg['det_images']) if vb.endswith('.json') else read_ava_csv(vb, True)
    val_loader = loader(entries_from(vb, cfg['det_thresh'], skip=excluded), train=False)

    def evaluate(tag):
        """-> mAP on rank 0 (detections_<tag>.csv, ap_<tag>.csv written), None on the others."""
        rows = predict(detector, val_loader, d.device, autocast, names)
        if rows is None:
            return None
        with open(os.path.join(cfg['output_dir'], f'detections_{tag}.csv'), 'w', newline='') as f:
            csv.writer(f).writerows([vid, f'{sec:04d}', *(f'{v:.3f}' for v in b), c, f'{s:.5f}']
                                    for (vid, sec), rs in sorted(rows.items()) for b, c, s in rs)
        print(f'detections written to {f.name} (AVA submission format)')
        return score(rows, os.path.join(cfg['output_dir'], f'ap_{tag}.csv'))

    autocast = utils.amp_setup(d.device, cfg['precision'])[0]
    resume = cfg['resume'] if cfg['resume'] not in ('auto', '') else None
    if cfg['eval']:
        if not (resume or cfg['finetune']):
            raise SystemExit('error: --eval needs weights: --resume or --finetune CHECKPOINT')
        if resume:
            vit.load_state_dict(utils.load_state(resume)['model'])
        lock = utils.lock_output_dir(cfg['output_dir']) if d.is_main else None
    else:
        groups = utils.param_groups(vit, cfg['weight_decay'], cfg['layer_decay'], len(vit.blocks))
        optimizer = utils.make_adamw(groups, cfg['lr'], cfg['opt_betas'], d.device)
        train_loader = loader(entries_from(read_ava_csv(cfg['train_csv'])), train=True)
        run = utils.start(cfg, 'detect', d, vit, optimizer, train_loader, sorted(names),
                          data.FailureLog(cfg['max_failed_ratio']), net=detector)
        autocast, lock = run.autocast, run.lock

        def loss_of(batch, micro):               # video (B, 3, T, H, W), boxes B x (n_b, 4)
            video = data.normalize(batch['video'].to(d.device, non_blocking=True))
            boxes = [b.to(d.device, non_blocking=True) for b in batch['boxes']]
            return detection_loss(run.net(video, boxes), batch['labels'].to(d.device))

        for epoch in range(run.start_epoch, cfg['epochs']):
            for _ in utils.steps(run, epoch):
                utils.train_step(run, loss_of)
            every = cfg['eval_every'] and (epoch + 1) % cfg['eval_every'] == 0
            m = evaluate(f'epoch{epoch + 1}') if every and epoch + 1 < cfg['epochs'] else None
            utils.end_epoch(run, epoch, **({} if m is None else {'mAP': m}))
        run.bar.close()
    utils.log_result(cfg, d.is_main, 'final', mAP=evaluate('val'))
    del lock
    utils.cleanup_distributed()


if __name__ == '__main__':
    utils.main(main)
