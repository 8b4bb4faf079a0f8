"""AVA files as distributed (CSV, pbtxt, AIA JSON, SlowFast frames, videos) and the box-aware
transforms."""
import json
import os
import random

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg

import data
import detect
import synthetic
from detect import (AVAClips, FrameFolder, VideoFolder, clip_offsets, entries_from, extend_boxes,
                    jitter_boxes, jitter_colour, read_aia_json, read_ava_csv, read_excluded,
                    read_label_map, transform_clip)

VID = '-5KQ66BBWC4'          # real AVA ids may start with '-'


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)


def test_label_maps_in_both_syntaxes(tmp_path):
    write(tmp_path / 'a.pbtxt', 'item {\n  name: "bend/bow (at the waist)"\n  id: 1\n}\n'
          'item {\n  name: "stand"\n  id: 12\n}\n')
    write(tmp_path / 'b.pbtxt', 'label {\n  name: "bend/bow (at the waist)"\n  label_id: 1\n'
          '  label_type: PERSON_MOVEMENT\n}\n')
    assert read_label_map(tmp_path / 'a.pbtxt') == {1: 'bend/bow (at the waist)', 12: 'stand'}
    assert read_label_map(tmp_path / 'b.pbtxt') == {1: 'bend/bow (at the waist)'}
    write(tmp_path / 'c.pbtxt', 'nothing here\n')
    with pytest.raises(SystemExit, match='c.pbtxt'):
        read_label_map(tmp_path / 'c.pbtxt')


def test_gt_rows_group_into_multi_label_boxes_and_detections_filter_by_score(tmp_path):
    write(tmp_path / 'gt.csv', f'{VID},0902,0.077,0.151,0.283,0.811,80,1\n'
          f'{VID},0902,0.077,0.151,0.283,0.811,9,1\n'
          f'{VID},902,0.226,0.032,0.366,0.497,12,0\n'
          '1j20qq1JyX4,0903,0.002,0.118,0.714,0.977,12,1\n')
    gt = read_ava_csv(tmp_path / 'gt.csv')
    assert set(gt) == {(VID, 902), ('1j20qq1JyX4', 903)}  # '0902' == '902'
    assert gt[(VID, 902)][(0.077, 0.151, 0.283, 0.811)][0] == {80, 9}
    entries = entries_from(gt)
    vid, sec, boxes, labels, scores = entries[0]             # sorted: '-' first
    assert (vid, sec) == (VID, 902) and boxes.shape == (2, 4) and labels.shape == (2, 80)
    assert labels[:, [8, 79, 11]].tolist() == [[1, 1, 0], [0, 0, 1]] and labels.sum() == 3
    # SlowFast detections: action column empty, score last; --det_thresh keeps >= 0.8
    write(tmp_path / 'det.csv', f'{VID},0902,0.1,0.1,0.3,0.8,,0.95\n'
          f'{VID},0902,0.5,0.1,0.7,0.8,,0.79\n'
          f'{VID},0903,0.5,0.1,0.7,0.8,,0.5\n')
    kept = entries_from(read_ava_csv(tmp_path / 'det.csv', detections=True), 0.8)
    assert len(kept) == 1 and kept[0][4].tolist() == [pytest.approx(0.95)] and kept[0][3].sum() == 0
    write(tmp_path / 'ex.csv', f'{VID},0902\n')
    assert read_excluded(tmp_path / 'ex.csv') == {(VID, 902)}
    assert entries_from(read_ava_csv(tmp_path / 'det.csv', detections=True), 0.8,
                        skip={(VID, 902)}) == []
    write(tmp_path / 'bad.csv', f'{VID},0902,0.1,0.1\n')
    with pytest.raises(SystemExit, match='bad.csv:1'):
        read_ava_csv(tmp_path / 'bad.csv')


def test_aia_json_boxes_are_pixels_xywh_mapped_through_the_coco_images(tmp_path):
    images = {'images': [{'id': 3 * 10000 + 902, 'movie': VID, 'timestamp': 902, 'width': 400,
                          'height': 200, 'img_path': f'{VID}/902.jpg',
                          'video_path': f'{VID}/902.mp4'}]}
    write(tmp_path / 'annotations/ava_val_v2.2_min.json', json.dumps(images))
    write(tmp_path / 'boxes/det.json',
          json.dumps([{'image_id': 30902, 'bbox': [40, 20, 100, 100], 'score': 0.9}]))
    out = read_aia_json(str(tmp_path / 'boxes/det.json'),
                        str(tmp_path / 'annotations/ava_val_v2.2_min.json'))
    assert out == {(VID, 902): {(0.1, 0.1, 0.35, 0.6): [set(), 0.9]}}
    with pytest.raises(SystemExit, match='det_images'):
        read_aia_json(str(tmp_path / 'boxes/det.json'), str(tmp_path / 'missing.json'))


def numbered_frames(n, H=16, W=24):
    """Frame i is a flat grey of level 2*i, so the decoded level tells which frame came back."""
    return np.stack([np.full((H, W, 3), 2 * i, np.uint8) for i in range(n)])


def test_frame_list_rows_are_grouped_per_video_in_frame_id_order(tmp_path):
    """One pass over a shuffled frame list gives every video its frames by frame id, not by row
    order or path name (f10.jpg sorts before f9.jpg). Real AVA lists ~8 M rows over 299 movies."""
    vids = [VID, '1j20qq1JyX4', 'zlVkeKC6Ha8']
    rows = [f'{v} {k} {i} {v}/f{i}.jpg ""' for k, v in enumerate(vids) for i in range(1500)]
    random.Random(0).shuffle(rows)
    write(tmp_path / 'train.csv', '\n'.join(['original_vido_id video_id frame_id path labels',
                                            *rows]) + '\n')
    src = FrameFolder(str(tmp_path / 'frames'), [str(tmp_path / 'train.csv')])
    assert sorted(src.paths) == sorted(vids)
    for v in vids:
        assert src.paths[v] == [str(tmp_path / 'frames' / v / f'f{i}.jpg') for i in range(1500)]


def test_slowfast_frames_and_videos_give_the_frames_around_the_keyframe(tmp_path):
    frames = numbered_frames(121)                          # seconds 900..904 at 30 fps
    rows = ['original_vido_id video_id frame_id path labels']
    for i, f in enumerate(frames):
        rel = f'{VID}/{VID}_{i + 1:06d}.jpg'
        os.makedirs(tmp_path / 'frames' / VID, exist_ok=True)
        (tmp_path / 'frames' / rel).write_bytes(
            encode_jpeg(torch.from_numpy(f).permute(2, 0, 1)).numpy().tobytes())
        rows.append(f'{VID} 0 {i} {rel} ""')
    write(tmp_path / 'frame_lists/train.csv', '\n'.join(rows) + '\n')
    offsets = clip_offsets(4, 4)
    assert (offsets == [-7, -3, 1, 5] and clip_offsets(16, 4)[0] == -31
            and clip_offsets(16, 4)[-1] == 29)
    level = lambda clip: [round(v / 2) for v in clip.float().mean((1, 2, 3)).tolist()]
    src = FrameFolder(str(tmp_path / 'frames'), [str(tmp_path / 'frame_lists/train.csv')])
    assert level(src.clip(VID, 902, offsets)) == [53, 57, 61, 65]      # keyframe = (902 - 900) x 30
    assert level(src.clip(VID, 900, offsets)) == [0, 0, 1, 5]          # clamped at the start
    assert level(src.clip(VID, 904, offsets)) == [113, 117, 120, 120]  # and at the end
    # no frame lists
    assert level(FrameFolder(str(tmp_path / 'frames')).clip(VID, 902, offsets)) == [53, 57, 61, 65]
    # the same movie as a 15-minute cut (--video_start 900), decoded with PyAV via
    # data.decode_frames
    os.makedirs(tmp_path / 'videos')
    synthetic.encode_video(str(tmp_path / 'videos' / f'{VID}.mp4'), frames, fps=30)
    clip = VideoFolder(str(tmp_path / 'videos'), start=900).clip(VID, 902, offsets)
    # H.264 is lossy
    assert clip.shape == (4, 3, 16, 24) and level(clip) == pytest.approx([53, 57, 61, 65], abs=1)


def box_of_bright(clip):
    ys, xs = torch.nonzero(clip[0, 0] > 128, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_train_crop_flip_and_test_scale_move_boxes_with_the_pixels():
    clip = torch.zeros(2, 3, 60, 120, dtype=torch.uint8)
    clip[..., 10:40, 20:50] = 255                           # a person at x 20..50, y 10..40
    boxes = torch.tensor([[20., 10., 50., 40.], [100., 0., 120., 60.]])
    out, b, keep = transform_clip(clip, boxes, train=False, input_size=30, short_side=30,
                                  flip=False)
    assert out.shape == (2, 3, 30, 60) and keep.tolist() == [0, 1]
    assert b.tolist() == [[10, 5, 25, 20], [50, 0, 60, 30]]                        # scaled by 1/2
    flips = cropped_away = 0
    for seed in range(30):
        torch.manual_seed(seed)
        plain, pb, pk = transform_clip(clip, boxes, train=True, input_size=30, short_side=30,
                                       flip=False)
        torch.manual_seed(seed)                  # same crop draw; the flip draw comes after it
        out, b, keep = transform_clip(clip, boxes, train=True, input_size=30, short_side=30,
                                      flip=True)
        assert out.shape == (2, 3, 30, 30) and torch.equal(keep, pk)
        if 0 in keep.tolist():                   # the kept box still frames the bright person
            assert b[keep.tolist().index(0)].tolist() == pytest.approx(box_of_bright(out), abs=1)
        if not torch.equal(out, plain):          # flipped: pixels mirrored, x -> 30 - x
            assert torch.equal(out, plain.flip(-1))
            assert torch.allclose(
                b, torch.stack([30 - pb[:, 2], pb[:, 1], 30 - pb[:, 0], pb[:, 3]], 1))
            flips += 1
        cropped_away += 1 not in keep.tolist()
        assert (b[:, 2] > b[:, 0]).all() and (b >= 0).all() and (b <= 30).all()
    # the right-hand box leaves some crops and is dropped
    assert 5 < flips < 25 and cropped_away > 0


def test_dataset_items_and_unreadable_frames(tmp_path):
    frames = numbered_frames(121, 32, 48)
    for i, f in enumerate(frames):
        p = tmp_path / 'frames' / VID / f'{VID}_{i + 1:06d}.jpg'
        os.makedirs(p.parent, exist_ok=True)
        p.write_bytes(encode_jpeg(torch.from_numpy(f).permute(2, 0, 1)).numpy().tobytes())
    write(tmp_path / 'gt.csv', f'{VID},0902,0.1,0.1,0.5,0.9,12,0\n{VID},0902,0.5,0.1,0.9,0.9,14,1\n'
          f'{VID},0903,0.1,0.1,0.5,0.9,12,0\n')
    entries = entries_from(read_ava_csv(tmp_path / 'gt.csv'))
    kw = dict(num_frames=4, sampling_rate=4, input_size=32, short_side=32, seed=0)
    train = AVAClips(entries, FrameFolder(str(tmp_path / 'frames')), train=True, flip=True, **kw)
    a, b = train[(0, 3)], train[(0, 3)]
    assert a['video'].shape == (3, 4, 32, 32) and a['video'].dtype == torch.uint8
    # pure in (index, epoch)
    assert torch.equal(a['video'], b['video']) and torch.equal(a['boxes'], b['boxes'])
    assert len(a['boxes']) == len(a['labels']) == len(a['scores']) and a['labels'].shape[1] == 80
    test = AVAClips(entries, FrameFolder(str(tmp_path / 'frames')), train=False, flip=False, **kw)
    t = test[0]
    assert t['video'].shape == (3, 4, 32, 48) and t['failed'] == ''
    assert torch.allclose(t['boxes'], entries[0][2] * torch.tensor([48, 32, 48, 32]))
    # keyframe 903's frame
    (tmp_path / 'frames' / VID / f'{VID}_000092.jpg').write_bytes(b'not a jpeg')
    bad = test[1]
    # reported, GT counts missed
    assert VID in bad['failed'] and len(bad['boxes']) == 0
    # replaced by another keyframe
    assert train[(1, 0)]['failed'] and len(train[(1, 0)]['boxes']) > 0


# -- The official recipe's augmentations and clip span (AlphAction / VideoMAE-Action-Detection) ----
def test_box_jitter_keeps_boxes_in_the_image_and_each_edge_within_its_bounds():
    H, W = 40, 60
    boxes = torch.tensor([[20., 10., 40., 30.],     # inside: the bounds show in full
                          [0., 0., 60., 40.],       # the whole image: clamped
                          [59.5, 39.5, 60., 40.]])  # half a pixel in the corner: kept >= 1 pixel
    torch.manual_seed(0)
    out = torch.stack([jitter_boxes(boxes, (H, W), 0.2, 0.1, 0.1, 0.05) for _ in range(2000)])
    x1, y1, x2, y2 = out.unbind(-1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= W).all() and (y2 <= H).all()
    assert (x2 >= x1 + 1 - 1e-5).all() and (y2 >= y1 + 1 - 1e-5).all()
    assert (x1 <= W - 1).all() and (y1 <= H - 1).all()
    # box 0 (w 20, h 20): x1 + 20 U(-0.2, 0.1), y1 + 20 U(-0.1, 0.05), x2 + 20 U(-0.1, 0.2),
    # y2 + 20 U(-0.05, 0.1), and the draws fill those ranges
    shift = out[:, 0] - boxes[0]
    lo, hi = torch.tensor([-4., -2., -2., -1.]), torch.tensor([2., 1., 4., 2.])
    assert (shift >= lo - 1e-4).all() and (shift <= hi + 1e-4).all()
    assert (shift.amin(0) < lo + 0.05 * (hi - lo)).all()
    assert (shift.amax(0) > hi - 0.05 * (hi - lo)).all()
    assert (out[:, 2] == torch.tensor([59., 39., 60., 40.])).all()  # the corner box: 1 x 1 pixel
    torch.manual_seed(0)                         # torch's RNG: the same seed, the same boxes
    assert torch.equal(jitter_boxes(boxes, (H, W), 0.2, 0.1, 0.1, 0.05), out[0])


def test_test_box_extension_matches_the_formula_and_is_clipped():
    boxes = torch.tensor([[10., 20., 30., 60.],     # w 20, h 40: 1 px more each side in x, in y
                          [0., 0., 50., 100.]])     # at the image's edges: clipped
    assert extend_boxes(boxes, (100, 60), 0.1, 0.05).tolist() == [
        [9, 19, 31, 61], [0, 0, 52.5, 100]]
    assert torch.equal(extend_boxes(boxes, (100, 60), 0, 0), boxes)


def test_colour_jitter_is_opencvs_hsv_shift():
    # (RGB, (hue, sat, value) shift) -> RGB as the official cv2 RGB2HSV, shift, HSV2RGB gives it
    cases = [((255, 0, 0), (60, 0, 0), (0, 255, 0)), ((255, 0, 0), (30, 0, 0), (255, 255, 0)),
             ((255, 0, 0), (-30, 0, 0), (255, 0, 255)),                    # hue wraps around
             ((128, 128, 128), (0, 26, 0), (128, 115, 115)),               # grey: hue 0 (red)
             ((100, 50, 50), (0, 0, 26), (126, 63, 63)),
             ((250, 100, 100), (0, 0, 26), (255, 102, 102)),               # V clamped at 255
             ((0, 0, 0), (10, 26, 26), (26, 24, 23)),
             ((200, 100, 50), (-10, -26, -26), (174, 61, 61)),
             ((255, 255, 255), (0, -26, -26), (229, 229, 229)),
             ((0, 255, 0), (10, 0, 0), (0, 255, 85)), ((40, 200, 120), (0, 26, 0), (20, 200, 110))]
    for rgb, shift, want in cases:
        px = torch.tensor(rgb, dtype=torch.uint8).view(1, 3, 1, 1)
        assert jitter_colour(px, *shift).view(3).tolist() == list(want), (rgb, shift)
    clip = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    # no shift: only the uint8 HSV round trip's rounding (hue in steps of 2 degrees)
    assert (jitter_colour(clip, 0, 0, 0).int() - clip.int()).abs().max() <= 12
    cv2 = pytest.importorskip('cv2')
    hsv = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2HSV) for f in clip.permute(0, 2, 3, 1).numpy()])
    hsv = hsv.astype(np.int32) + [5, 13, -7]
    hsv[..., 0] %= 180
    want = np.stack([cv2.cvtColor(f, cv2.COLOR_HSV2RGB) for f in hsv.clip(0, 255).astype(np.uint8)])
    diff = np.abs(jitter_colour(clip, 5, 13, -7).permute(0, 2, 3, 1).numpy().astype(int) - want)
    assert (diff <= 1).mean() > 0.98


def ava_frames(tmp_path, n=121, H=16, W=24):
    for i, f in enumerate(numbered_frames(n, H, W)):
        p = tmp_path / 'frames' / VID / f'{VID}_{i + 1:06d}.jpg'
        os.makedirs(p.parent, exist_ok=True)
        p.write_bytes(encode_jpeg(torch.from_numpy(f).permute(2, 0, 1)).numpy().tobytes())
    return FrameFolder(str(tmp_path / 'frames'))


def test_colour_jitter_is_one_draw_per_clip_and_a_function_of_seed_epoch_index(tmp_path,
                                                                                  monkeypatch):
    src = ava_frames(tmp_path, H=32, W=48)                # flat grey frames: one colour each
    entries = entries_from({(VID, 902): {(0.1, 0.1, 0.5, 0.9): [{12}, 1.0]}})
    kw = dict(num_frames=4, sampling_rate=4, input_size=32, short_side=32, seed=0, flip=False)
    plain = AVAClips(entries, src, train=True, **kw)
    jit = AVAClips(entries, src, train=True, color_jitter=[10, 26, 26], **kw)
    draws = []
    real = detect.jitter_colour
    monkeypatch.setattr(detect, 'jitter_colour', lambda clip, *s: draws.append(s) or real(clip, *s))
    a, b, c = jit[(0, 3)], jit[(0, 3)], jit[(0, 4)]
    assert len(draws) == 3 and all(len(d) == 3 for d in draws)   # one (h, s, v) draw per clip
    assert all(abs(int(v)) <= m for d in draws for v, m in zip(d, (10, 26, 26)))
    assert torch.equal(a['video'], b['video']) and [int(v) for v in draws[0]] == [
        int(v) for v in draws[1]]                                  # (seed, epoch, index): the same
    assert not torch.equal(a['video'], c['video'])                 # another epoch, another draw
    ref = plain[(0, 3)]['video']                                   # the same crop, unjittered
    assert torch.equal(a['video'], real(ref.transpose(0, 1), *draws[0]).transpose(0, 1))
    # every frame shifted alike: each frame on its own gives the same as the whole clip
    frames = [real(ref.transpose(0, 1)[t:t + 1], *draws[0]) for t in range(4)]
    assert torch.equal(torch.cat(frames).transpose(0, 1), a['video'])
    test = AVAClips(entries, src, train=False, color_jitter=[10, 26, 26], **kw)
    draws.clear()
    test[0]
    assert draws == []                                             # training only


def test_dataset_jitters_training_boxes_and_extends_test_rois_only(tmp_path):
    src = ava_frames(tmp_path, H=32, W=48)
    entries = entries_from({(VID, 902): {(0.25, 0.25, 0.5, 0.75): [{12}, 0.9]}})
    kw = dict(num_frames=4, sampling_rate=4, input_size=32, short_side=32, seed=0, flip=False)
    aug = dict(box_jitter=[0.2, 0.1, 0.1, 0.05], test_box_extend=[0.1, 0.05])
    plain, jit = AVAClips(entries, src, train=True, **kw)[(0, 1)], AVAClips(
        entries, src, train=True, **kw, **aug)[(0, 1)]
    assert torch.equal(plain['video'], jit['video'])
    assert not torch.equal(plain['boxes'], jit['boxes'])
    w, h = (plain['boxes'][0, 2:] - plain['boxes'][0, :2]).tolist()
    d = (jit['boxes'] - plain['boxes'])[0].tolist()
    assert -0.2 * w <= d[0] <= 0.1 * w and -0.1 * h <= d[1] <= 0.05 * h
    assert -0.1 * w <= d[2] <= 0.2 * w and -0.05 * h <= d[3] <= 0.1 * h
    t0, t = AVAClips(entries, src, train=False, **kw)[0], AVAClips(entries, src, train=False, **kw,
                                                                 **aug)[0]
    # RoIs: the 12 x 16 box at (12, 8) gets 0.6 px each side in x, 0.4 in y; the reported box stays
    assert t0['boxes'].tolist() == [[12, 8, 24, 24]]
    assert t['boxes'][0].tolist() == pytest.approx([11.4, 7.6, 24.6, 24.4])
    assert torch.equal(t['norm_boxes'], entries[0][2]) and torch.equal(t['scores'], t0['scores'])
    assert torch.equal(t['video'], t0['video'])


def sampled_frames(clip):
    return [round(v / 2) for v in clip.float().mean((1, 2, 3)).tolist()]


def test_clip_span_is_16_x_4_frames_at_25_fps_whatever_the_source(tmp_path, monkeypatch):
    """The official clips are 25 fps: 16 x 4 frames span 64 / 25 = 2.56 s. Span: first to last
    sample plus one stride, in seconds."""
    span = lambda idx, fps: (idx[-1] - idx[0]) / fps * 16 / 15
    offsets = clip_offsets(16, 4)
    # SlowFast frames (30 fps), through the dataset: the keyframe of 902 is frame 60
    src = ava_frames(tmp_path)
    entries = entries_from({(VID, 902): {(0.1, 0.1, 0.5, 0.9): [{12}, 1.0]}})
    kw = dict(num_frames=16, sampling_rate=4, input_size=16, short_side=16, seed=0, flip=False)
    item = lambda fps: AVAClips(entries, src, train=False, clip_fps=fps, **kw)[0]['video']
    idx = sampled_frames(item(25).transpose(0, 1))
    assert idx[0] == 60 - 37 and idx[-1] == 60 + 35 and span(idx, 30) == pytest.approx(64 / 25)
    old = sampled_frames(item(0).transpose(0, 1))                  # off: the source's frames
    assert old == [60 + o for o in offsets] and span(old, 30) == pytest.approx(64 / 30)
    # videos: whatever frame rate they report, the same 2.56 s
    asked = []
    monkeypatch.setattr(data, 'decode_frames', lambda path, idx, **kw: asked.append(idx) or
                        torch.zeros(len(idx), 4, 4, 3, dtype=torch.uint8))
    (tmp_path / 'videos').mkdir()
    (tmp_path / 'videos' / f'{VID}.mp4').write_bytes(b'')
    for fps in (25, 30, 29.97):
        monkeypatch.setattr(data, 'video_info', lambda path: (100000, fps, 4, 4))
        VideoFolder(str(tmp_path / 'videos'), start=0).clip(VID, 902, offsets, 25)
        assert span(asked[-1], fps) == pytest.approx(64 / 25, abs=1 / fps)
        key = round(902 * fps)
        assert asked[-1][0] - key == round(-31 * fps / 25)
        assert asked[-1][-1] - key == round(29 * fps / 25)
    assert [i - 902 * 25 for i in asked[0]] == offsets             # at 25 fps: the offsets as such
    assert span(asked[1], 30) == pytest.approx(64 / 25)


def test_recipe_rows_have_the_official_augmentations_each_a_flag_away_from_off(tmp_path):
    args = ['--data_path', str(tmp_path), '--output_dir', str(tmp_path / 'out')]
    cfg = detect.resolve(args)
    assert (cfg['box_jitter'], cfg['test_box_extend'], cfg['color_jitter'], cfg['clip_fps']) == (
        [0.2, 0.1, 0.1, 0.05], [0.1, 0.05], [10, 26, 26], 25)
    assert all(detect.RECIPES[k]['clip_fps'] == 25 for k in detect.RECIPES)
    cfg = detect.resolve(args + ['--box_jitter', '--test_box_extend', '0', '--color_jitter', '0',
                                 '--clip_fps', '0'])
    assert (cfg['box_jitter'], cfg['test_box_extend'], cfg['color_jitter'], cfg['clip_fps']) == (
        [], [0.0], [0], 0.0)
    with pytest.raises(SystemExit):
        detect.resolve(args + ['--box_jitter', '0.2', '0.1'])
