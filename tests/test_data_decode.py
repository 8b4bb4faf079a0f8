"""decode_frames returns exactly the asked frames (0-based, display order) on every container we
read."""

import av
import numpy as np
import pytest
import torch

import data
import synthetic

# frame i carries i in binary: 8 big black/white blocks (2 rows x 4), robust to lossy codecs
BITS = 8


def numbered_video(n, h=48, w=64):
    frames = np.zeros((n, h, w, 3), np.uint8)
    bh, bw = h // 2, w // 4
    for i in range(n):
        for b in range(BITS):
            if (i >> b) & 1:
                frames[i, (b // 4) * bh:(b // 4 + 1) * bh, (b % 4) * bw:(b % 4 + 1) * bw] = 255
    return frames


def read_number(frame):
    h, w = frame.shape[:2]
    bh, bw = h // 2, w // 4
    blocks = [frame[(b // 4) * bh + 4:(b // 4 + 1) * bh - 4,
                    (b % 4) * bw + 4:(b % 4 + 1) * bw - 4].float().mean()
              for b in range(BITS)]
    return sum(1 << b for b, m in enumerate(blocks) if m > 128)


def has_encoder(name):
    try:
        av.codec.Codec(name, 'w')
        return True
    except Exception:
        return False


CONTAINERS = [('mp4', 'libx264'), ('avi', 'mpeg4'), ('webm', 'libvpx-vp9'), ('mkv', 'libx264'),
              ('mkv', 'mpeg4')]


@pytest.mark.parametrize('ext,codec', CONTAINERS)
def test_decode_frames_is_frame_accurate(tmp_path, ext, codec):
    if not has_encoder(codec):
        pytest.skip(f'PyAV build has no {codec} encoder')
    n = 75
    path = str(tmp_path / f'numbered.{ext}')
    synthetic.encode_video(path, numbered_video(n), fps=25, codec=codec, gop=12)
    # scattered, unsorted, repeated, across keyframes (GOP 12), first and last frames
    asked = [0, 5, 11, 12, 13, 23, 24, 25, 40, 41, 3, 59, 60, 73, 74, 74, 37, 37, 0]
    frames = data.decode_frames(path, asked)
    assert frames.dtype == torch.uint8 and frames.shape == (len(asked), 48, 64, 3)
    assert [read_number(f) for f in frames] == asked
    # a window far from the start goes through the seek path; a single late frame too
    for window in ([60, 62, 64, 66], [74], [30, 31]):
        assert [read_number(f) for f in data.decode_frames(path, window)] == window
    assert data.video_info(path)[0] in (n, n + 1) or ext in ('webm', 'mkv')


def test_decode_frames_past_the_end_is_an_error(tmp_path):
    path = str(tmp_path / 'short.mp4')
    synthetic.encode_video(path, numbered_video(20), fps=25)
    with pytest.raises(data.VideoDecodeError, match='short.mp4'):
        data.decode_frames(path, [5, 30])
    # within tail_slack the last frame stands in (frame counts of AVI/WebM headers are estimates)
    assert [read_number(f) for f in data.decode_frames(path, [18, 21], tail_slack=2)] == [18, 19]


def test_broken_files_raise_video_decode_error_naming_the_file(tmp_path):
    txt = tmp_path / 'text.avi'
    txt.write_text('this is not a video\n' * 50)
    with pytest.raises(data.VideoDecodeError, match='text.avi'):
        data.decode_frames(str(txt), [0])
    good = str(tmp_path / 'good.avi')
    synthetic.encode_video(good, numbered_video(60), fps=25, gop=12)
    raw = open(good, 'rb').read()
    trunc = tmp_path / 'truncated.avi'
    trunc.write_bytes(raw[:len(raw) // 3])
    with pytest.raises(data.VideoDecodeError, match='truncated.avi'):
        data.decode_frames(str(trunc), [1, 55])
    with pytest.raises(data.VideoDecodeError, match='missing.avi'):
        data.decode_frames(str(tmp_path / 'missing.avi'), [0])
