"""The generated datasets: their content, and the cache writer that several ranks share."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import data
import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_AVA = dict(num_train=2, num_val=2, seconds=3, size=(40, 56))


@pytest.fixture(scope='module')
def motion(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('cache') / 'synthetic')
    return synthetic.ensure_motion(root, seed=0, num_train=3, num_test=1)


def files_of(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), 'rb') as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


def test_motion_set_is_ucf101_layout_balanced_and_cached(motion):
    train, classes = data.load_split('synthetic', motion, 'train')
    test, _ = data.load_split('synthetic', motion, 'test')
    assert classes == synthetic.MOTION_CLASSES and len(train) == 24 and len(test) == 8
    assert np.bincount([y for _, y in train]).tolist() == [3] * 8
    assert data.video_info(train[0][0])[:1] == (40,)
    assert data.video_info(train[0][0])[2:] == (64, 64)
    mtime = os.path.getmtime(os.path.join(motion, 'synthetic.json'))
    assert synthetic.ensure_motion(motion, seed=0, num_train=3, num_test=1) == motion  # cached
    assert os.path.getmtime(os.path.join(motion, 'synthetic.json')) == mtime
    with pytest.raises(ValueError, match='other parameters'):
        synthetic.ensure_motion(motion, seed=1, num_train=3, num_test=1)


def test_motion_single_frames_do_not_reveal_the_class_but_motion_does():
    # per-class statistics of single frames (colour, brightness, contrast) are alike; frame
    # differences are not
    rng = np.random.default_rng
    stats, motion = [], []
    for c in range(8):
        vids = [synthetic._motion_video(rng([0, c, k]), c, 40, 64).astype(np.float32)
                for k in range(12)]
        stats.append([np.r_[v[20].mean((0, 1)), v[20].std()] for v in vids])
        motion.append(np.mean([np.abs(np.diff(v, axis=0)).mean() for v in vids]))
    stats = np.array(stats)  # (class, video, 4)
    spread_between = stats.mean(1).std(0)
    spread_within = stats.std(1).mean(0)
    assert (spread_between < 0.6 * spread_within).all(), (spread_between, spread_within)


def test_motion_move_classes_shift_the_frame_the_way_their_label_says():
    # A label/motion mismatch (like the flip bug that swapped MoveLeft/MoveRight in fine-tuning) is
    # label noise no model learns through: the texture travels 4-6 px over 4 frames the named way.
    want = {'MoveLeft': (-1, 0), 'MoveRight': (1, 0), 'MoveUp': (0, -1), 'MoveDown': (0, 1)}
    for name, (wx, wy) in want.items():
        c = synthetic.MOTION_CLASSES.index(name)
        v = synthetic._motion_video(np.random.default_rng([0, c, 0]), c, 40, 64).astype(np.float32)
        a, b = v[10], v[14]
        err = {(dx, dy): np.abs(b[8 + dy:56 + dy, 8 + dx:56 + dx] - a[8:56, 8:56]).mean()
               for dx in range(-8, 9) for dy in range(-8, 9)}  # b at p + shift matches a at p
        dx, dy = min(err, key=err.get)
        assert (np.sign(dx), np.sign(dy)) == (wx, wy), (name, dx, dy)
        assert 4 <= abs(dx) + abs(dy) <= 6, (name, dx, dy)


# Each child imports first, says it is ready, then waits for the common start signal, so that the
# three generate at the same moment (imports alone take longer than writing the tiny set).
CHILD = f"""
import os, sys, time
import synthetic
root, ready, go = sys.argv[1:]
open(ready, 'w').close()
while not os.path.exists(go):
    time.sleep(0.005)
print(synthetic.ensure_ava(root, **{TINY_AVA!r}))
"""


def test_ranks_generating_one_fresh_root_at_once_all_get_one_complete_copy(tmp_path):
    root, go = str(tmp_path / 'cache' / 'ava'), str(tmp_path / 'go')
    ready = [str(tmp_path / f'ready{i}') for i in range(3)]
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, '-c', CHILD, root, r, go], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in ready]
    deadline = time.time() + 120
    while not all(os.path.exists(r) for r in ready) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1] for p in procs]
        time.sleep(0.01)
    open(go, 'w').close()
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in results]
    assert [out.strip() for out, _ in results] == [root] * 3
    assert os.listdir(os.path.dirname(root)) == ['ava']  # no temporary folder left behind
    alone = synthetic.ensure_ava(str(tmp_path / 'alone'), **TINY_AVA)
    assert files_of(root) == files_of(alone)  # complete: the same bytes as one writer alone
    assert synthetic.ensure_ava(root, **TINY_AVA) == root


def test_a_writer_that_loses_the_race_uses_the_winners_copy(tmp_path):
    root, params = str(tmp_path / 'set'), dict(version=1)
    os.makedirs(root)  # an empty root is replaced, as a fresh cache folder made by hand
    calls = []

    def write(folder):
        calls.append(folder)
        if len(calls) == 1:  # another process starts later and finishes first
            assert synthetic._cached(root, params, write) == root
        with open(os.path.join(folder, 'a.txt'), 'w') as f:
            f.write(str(len(calls)))

    assert synthetic._cached(root, params, write) == root
    assert len(calls) == 2 and open(os.path.join(root, 'a.txt')).read() == '2'  # the winner's
    assert sorted(os.listdir(tmp_path)) == ['set']

    def fail(folder):
        raise RuntimeError('disk full')

    with pytest.raises(RuntimeError, match='disk full'):
        synthetic._cached(str(tmp_path / 'other'), params, fail)
    assert sorted(os.listdir(tmp_path)) == ['set']  # neither a root nor a temporary folder


def test_a_root_holding_something_else_is_left_alone_with_a_message(tmp_path):
    root = synthetic.ensure_ava(str(tmp_path / 'ava'), **TINY_AVA)
    with pytest.raises(ValueError, match=r'other parameters: .*synthetic\.json says'):
        synthetic.ensure_ava(root, seed=1, **TINY_AVA)
    assert synthetic.ensure_ava(root, **TINY_AVA) == root  # still there, still valid
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'notes.txt').write_text('keep me')
    with pytest.raises(ValueError, match=r'not a synthetic dataset \(no .*synthetic\.json\)'):
        synthetic.ensure_motion(str(mine))
    assert os.listdir(mine) == ['notes.txt']
