"""utils.py's run mechanism, through the four stages' real command lines: a pre-emption that lands
in the last step of an epoch saves a checkpoint that resumes to the uninterrupted run's weights, bit
for bit; SIGKILL after a checkpoint resumes the same way; torchrun ranks hold identical weights; an
output folder in use is locked; a failing checkpoint write says so and leaves no partial file."""
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

import utils
from conftest import (CLIP, ENV, PRETRAIN, ROOT, assert_same_weights, records, run, weights)

EPOCHS = 6


def stage_args(stage, list_videos, videos, pretrained, ava):
    """Tiny runs of one optimiser step per epoch: every step is the last of its epoch."""
    one_step = ['--epochs', EPOCHS, '--warmup_epochs', 1, '--save_ckpt_freq', 100]
    return {
        'pretrain': [*PRETRAIN, '--data_path', list_videos, '--total_batch', 16, '--batch_size', 4,
                     *one_step],
        # VideoMAE V2's dual masking and 2 clips per decoded video
        'pretrain-v2': [*PRETRAIN, '--data_path', list_videos, '--total_batch', 16,
                        '--batch_size', 4, '--decoder_mask_ratio', 0.5, '--num_sample', 2,
                        *one_step],
        'finetune': ['--dataset', 'ucf101', '--data_path', videos, '--finetune', pretrained, *CLIP,
                     '--total_batch', 16, '--batch_size', 4, '--val_freq', 0, *one_step],
        'linprobe': ['--dataset', 'ucf101', '--data_path', videos, '--finetune', pretrained, *CLIP,
                     '--total_batch', 16, '--batch_size', 8, '--val_freq', 0, *one_step],
        'detect': ['--data_path', ava, '--embed_dim', 32, '--depth', 2, '--num_heads', 2,
                   '--patch_size', 16, '--input_size', 32, '--short_side', 32, '--num_frames', 4,
                   '--total_batch', 6, '--batch_size', 3, '--lr', 1e-2, '--device', 'cpu',
                   '--num_workers', 0, *one_step],
    }[stage]


@pytest.fixture(scope='module')
def ava(tmp_path_factory):
    import synthetic
    return synthetic.ensure_ava(str(tmp_path_factory.mktemp('ava') / 'syn'), num_train=3, num_val=2,
                                       seconds=4, size=(40, 56))


def start(script, args, **kw):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def wait_for(predicate, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline and not predicate():
        time.sleep(0.01)


def checkpoints(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith('.pth'))


@pytest.mark.slow
@pytest.mark.parametrize('stage', ['pretrain', 'pretrain-v2', 'finetune', 'linprobe', 'detect'])
def test_sigterm_in_the_last_step_of_an_epoch_resumes_to_the_same_weights(
        stage, list_videos, videos, pretrained, ava, tmp_path):
    args = stage_args(stage, list_videos, videos, pretrained, ava)
    script = stage.split('-')[0] + '.py'                     # pretrain-v2: pretrain.py
    whole, cut = tmp_path / 'whole', tmp_path / 'cut'
    run(script, *args, '--output_dir', whole)
    proc = start(script, [*args, '--output_dir', cut])
    wait_for(lambda: (cut / 'log.jsonl').exists() and '"step"' in (cut / 'log.jsonl').read_text())
    proc.send_signal(signal.SIGTERM)                         # lands in step 2 = the last of epoch 2
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert 'SIGTERM' in err and 'the same command resumes' in out
    saved = checkpoints(cut)
    assert len(saved) == 1 and '-' not in saved[0][len('checkpoint-'):], saved   # an epoch's end
    assert 0 < utils.load_state(str(cut / saved[0]))['epoch'] < EPOCHS
    p = run(script, *args, '--output_dir', cut)
    assert 'resuming' in p.stdout
    final = f'checkpoint-{EPOCHS:05d}.pth'
    assert_same_weights(weights(cut / final), weights(whole / final))
    its = [r['it'] for r in records(cut, 'step')]
    assert sorted(set(its)) == list(range(1, EPOCHS + 1)) and its[-1] == EPOCHS   # no step missing


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_with_decoding_workers_saves_and_resumes(list_videos,
                                                                                  tmp_path):
    # SLURM's pre-emption and a terminal's Ctrl-C signal every process of the job, the DataLoader
    # workers too: the main process must still save, and the resumed run end where the whole does
    args = [*PRETRAIN, '--data_path', list_videos, '--num_workers', 2, '--epochs', 8]
    run('pretrain.py', *args, '--output_dir', tmp_path / 'whole')
    proc = start('pretrain.py', [*args, '--output_dir', tmp_path / 'cut'], start_new_session=True)
    wait_for(lambda: (tmp_path / 'cut/log.jsonl').exists() and
             '"step"' in (tmp_path / 'cut/log.jsonl').read_text())
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and 'Traceback' not in err, err[-3000:]
    assert 'the same command resumes' in out and checkpoints(tmp_path / 'cut')
    assert 'resuming' in run('pretrain.py', *args, '--output_dir', tmp_path / 'cut').stdout
    assert_same_weights(weights(tmp_path / 'cut/checkpoint-00008.pth'),
                        weights(tmp_path / 'whole/checkpoint-00008.pth'))


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_resumes_to_the_same_weights(list_videos, tmp_path):
    args = [*PRETRAIN, '--data_path', list_videos, '--save_ckpt_freq', 1]
    run('pretrain.py', *args, '--output_dir', tmp_path / 'whole')
    proc = start('pretrain.py', [*args, '--output_dir', tmp_path / 'cut'])
    wait_for(lambda: (tmp_path / 'cut').exists() and checkpoints(tmp_path / 'cut'))
    # no handler runs, nothing is cleaned up
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    p = run('pretrain.py', *args, '--output_dir', tmp_path / 'cut')
    assert 'resuming' in p.stdout
    assert_same_weights(weights(tmp_path / 'cut/checkpoint-00004.pth'),
                        weights(tmp_path / 'whole/checkpoint-00004.pth'))


@pytest.mark.slow
def test_torchrun_ranks_hold_identical_weights_and_split_the_batch(list_videos, tmp_path):
    # --batch_size 1: 1 video x 2 ranks x 2 accumulation = 4; V2's dual masking, 2 clips a video
    run('pretrain.py', *PRETRAIN, '--data_path', list_videos, '--epochs', 2,
        '--output_dir', tmp_path, '--batch_size', 1, '--decoder_mask_ratio', 0.5, '--num_sample', 2,
        torchrun=2)
    state = utils.load_state(str(tmp_path / 'checkpoint-00002.pth'))
    sums = state['rank_weight_sums']
    assert len(sums) == 2 and sums[0] == sums[1]
    assert (state['config']['world_size'], state['config']['accum_iter']) == (2, 2)


@pytest.mark.slow
@pytest.mark.parametrize('world', [1, 2, 4])
def test_the_recipe_runs_on_any_process_count_that_divides_its_total_batch(world, list_videos,
                                                                          tmp_path):
    i = PRETRAIN.index('--batch_size')                     # unset: the per-process batch follows
    args = [*PRETRAIN[:i], *PRETRAIN[i + 2:], '--data_path', list_videos, '--total_batch', 8,
            '--epochs', 1, '--output_dir', tmp_path]
    run('pretrain.py', *args, torchrun=world if world > 1 else 0)
    cfg = utils.load_state(str(tmp_path / 'checkpoint-00001.pth'))['config']
    assert (cfg['world_size'], cfg['batch_size'], cfg['accum_iter']) == (world, 8 // world, 1)


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_refuses(list_videos, tmp_path):
    args = [*PRETRAIN, '--data_path', list_videos, '--epochs', 50, '--output_dir', tmp_path]
    first = start('pretrain.py', args)
    wait_for(lambda: (tmp_path / 'log.jsonl').exists())
    second = run('pretrain.py', *args, check=False)
    first.kill()
    first.communicate()
    assert second.returncode == 1
    assert f'--output_dir {tmp_path} is in use by another run (pid {first.pid})' in second.stderr
    assert 'Traceback' not in second.stderr
    # the lock dies with its process: the same command now resumes
    p = run('pretrain.py', *args[:-4], '--epochs', 1, '--output_dir', tmp_path, '--resume', '')
    assert p.returncode == 0


@pytest.mark.slow
def test_a_failing_checkpoint_write_says_where_and_leaves_no_partial_file(list_videos, tmp_path):
    def small_files():                                 # in the child: files of at most 100 kB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    args = [*PRETRAIN, '--data_path', list_videos, '--output_dir', tmp_path, '--embed_dim', 64]
    proc = start('pretrain.py', args, preexec_fn=small_files)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert (f'error: writing {tmp_path}/checkpoint-00001.pth failed' in err
            and 'Traceback' not in err)
    assert not [f for f in os.listdir(tmp_path) if '.tmp' in f]
    assert checkpoints(tmp_path) == []
    run('pretrain.py', *args)                                # space again: the same command runs
    assert checkpoints(tmp_path) == ['checkpoint-00002.pth', 'checkpoint-00004.pth']


def test_the_per_process_batch_follows_the_total_batch_and_the_process_count():
    assert utils.fit_batch(8, 8, 1, explicit=False) == (8, 1)
    # the synthetic row on 2 processes
    assert utils.fit_batch(8, 8, 2, explicit=False) == (4, 1)
    # UCF101 on 16 GPUs
    assert utils.fit_batch(192, 24, 16, explicit=False) == (12, 1)
    # Table 9 on 8 GPUs: accumulation
    assert utils.fit_batch(1024, 32, 8, explicit=False) == (32, 4)
    assert utils.fit_batch(1024, 32, 4, explicit=False) == (32, 8)


@pytest.mark.parametrize('total, batch, world, message', [
    (1024, 24, 8, '--total_batch 1024 is not a multiple of --batch_size 24 x 8 process(es) = 192'),
    (192, 24, 7,
     '--total_batch 192 cannot be split over 7 processes; use --total_batch 189 or 196'),
])
def test_a_batch_that_cannot_work_names_both_numbers(total, batch, world, message, capsys):
    with pytest.raises(SystemExit) as e:
        utils.fit_batch(total, batch, world, explicit=(batch == 24 and world == 8))
    assert e.value.code == 2 and message in capsys.readouterr().err
