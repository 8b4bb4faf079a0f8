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
from detect import (AVAClips, FrameFolder, VideoFolder, clip_offsets, entries_from, read_aia_json,
                    read_ava_csv, read_excluded, read_label_map, transform_clip)

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
    data.encode_video(str(tmp_path / 'videos' / f'{VID}.mp4'), frames, fps=30)
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
