"""--log_dir: TensorBoard curves through utils.Log, read back with tensorboard's own event reader:
the step and epoch scalars at global step = optimiser steps done, the reconstruction images, and a
resume that continues the curves without duplicated points."""
import subprocess
import sys

import pytest

from conftest import PRETRAIN, ROOT, run

event_accumulator = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')


def scalars(log_dir):
    acc = event_accumulator.EventAccumulator(str(log_dir),
                                             size_guidance={'scalars': 0, 'images': 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_log_dir_holds_the_curves_and_pictures_and_a_resume_continues_them(list_videos, tmp_path):
    args = [*PRETRAIN, '--data_path', list_videos, '--output_dir', tmp_path / 'out', '--log_dir',
            tmp_path / 'tb']
    run('pretrain.py', *args, '--epochs', 2)                        # 2 of 4 epochs, then resume
    run('pretrain.py', *args)
    acc = scalars(tmp_path / 'tb')
    tags = acc.Tags()
    for tag in ('step/loss', 'step/lr', 'step/grad_norm', 'step/clips_per_s', 'step/data_wait_s',
                'epoch/loss', 'epoch/clips_per_s'):
        assert tag in tags['scalars'], tag
    steps = [e.step for e in acc.Scalars('step/loss')]
    assert steps == list(range(1, 17))                   # 4 epochs x 4 steps, each once
    assert [e.step for e in acc.Scalars('epoch/loss')] == [4, 8, 12, 16]
    assert 'reconstruction/video-0' in tags['images']


@pytest.mark.slow
def test_log_dir_without_tensorboard_says_what_to_install(list_videos, tmp_path):
    argv = [*map(str, PRETRAIN), '--data_path', list_videos, '--output_dir', str(tmp_path / 'o'),
            '--log_dir', str(tmp_path / 'tb')]
    code = ("import sys; sys.modules['torch.utils.tensorboard'] = None; "
            f"sys.argv[1:] = {argv!r}; import runpy; "
            "runpy.run_path('pretrain.py', run_name='__main__')")
    p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1
    assert 'error: --log_dir needs the tensorboard package: pip install tensorboard' in p.stderr
    assert 'Traceback' not in p.stderr


@pytest.mark.slow
def test_log_dir_holds_validation_and_test_scores(videos, pretrained, tmp_path):
    from conftest import TINY
    run('finetune.py', '--dataset', 'ucf101', '--data_path', videos, '--finetune', pretrained,
        *TINY, '--output_dir', tmp_path / 'ft', '--log_dir', tmp_path / 'tb')
    acc = scalars(tmp_path / 'tb')
    assert [e.step for e in acc.Scalars('epoch/val_top1')] == [2, 4]     # 2 steps an epoch
    assert [e.step for e in acc.Scalars('test/test_top1')] == [4]        # at the last step
    assert 'test/test_top5' in acc.Tags()['scalars']
