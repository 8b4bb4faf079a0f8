"""Every bad input, through the real command lines: one `error:` line on stderr that names the flag
or file, a non-zero exit (2 for bad flags), no traceback, and nothing written is lost."""
import pytest
import torch

import model as vmae
from conftest import CLIP, DECODER, PRETRAIN, SHAPE, run


@pytest.fixture(scope='module')
def files(tmp_path_factory, pretrained, list_videos):
    d = tmp_path_factory.mktemp('bad')
    (d / 'notes.txt').write_text('not a checkpoint\n')
    (d / 'empty.pth').write_bytes(b'')
    (d / 'a_file').write_text('x')
    torch.save({'model': {}, 'stage': 'finetune', 'config': {}}, d / 'classifier-run.pth')
    half = d / 'half-broken'                     # a list dataset whose odd videos are garbage
    half.mkdir()
    lines = [f'{list_videos}/train{i}.avi {i % 2}' if i % 2 == 0 else f'{half}/bad{i}.avi 1'
             for i in range(16)]
    for i in range(1, 16, 2):
        (half / f'bad{i}.avi').write_bytes(b'not a video' * 100)
    (half / 'train.csv').write_text('\n'.join(lines) + '\n')
    (half / 'test.csv').write_text(f'{list_videos}/test0.avi 0\n')
    clf = vmae.build_classifier('small', 4, **SHAPE, img_size=32, num_frames=4)
    torch.save({'model': clf.state_dict(), 'config': {'model': 'small', **SHAPE, **DECODER}},
               d / 'classifier.pth')
    return d


def cases(f, videos, pretrained, list_videos):
    ft = ['finetune.py', '--dataset', 'ucf101', '--data_path', videos, *CLIP]
    pre = ['pretrain.py', *PRETRAIN, '--data_path', list_videos, '--output_dir', f / 'out']
    return {
        'missing data_path': (['pretrain.py', '--dataset', 'ucf101', '--data_path', f / 'nope'], 1,
                              '--data_path'),
        'checkpoint of another size': ([*ft, '--finetune', pretrained, '--embed_dim', 64,
                                        '--output_dir', f / 'o1'], 1, f'--finetune {pretrained}'),
        'classifier to --visualize': (['pretrain.py', '--visualize', f / 'classifier.pth'], 1,
                                      '--visualize'),
        'text file to --predict': ([*ft, '--finetune', f / 'classifier.pth', '--predict',
                                    f / 'notes.txt'], 1, '--predict'),
        'output_dir is a file': ([*pre[:-2], '--output_dir', f / 'a_file'], 1, 'is a file'),
        'text file to --resume': ([*pre, '--resume', f / 'notes.txt'], 1,
                                  'is not a readable PyTorch checkpoint'),
        'empty file to --resume': ([*pre, '--resume', f / 'empty.pth'], 1, 'is an empty file'),
        'classifier run to --resume': ([*pre, '--resume', f / 'classifier-run.pth'], 1,
                                       "is a 'finetune' checkpoint, not a 'pretrain' one"),
        'input_size 0': ([*ft, '--input_size', 0], 2, '--input_size must be at least 1'),
        'num_workers -1': ([*ft, '--num_workers', -1], 2, '--num_workers must be 0'),
        'batch_size 0': ([*ft, '--batch_size', 0], 2, '--batch_size must be at least 1'),
        'num_frames 7': ([*ft, '--num_frames', 7], 2, '--num_frames 7 is not divisible'),
        'truncated --finetune to detect': (['detect.py', '--finetune', f / 'empty.pth',
                                            '--output_dir', f / 'o3'], 1, 'empty.pth'),
        'half the videos broken': ([*pre[:-2], '--output_dir', f / 'o2', '--data_path',
                                    f / 'half-broken', '--epochs', 1], 1, '--max_failed_ratio'),
    }


CASES = ['missing data_path', 'checkpoint of another size', 'classifier to --visualize',
         'text file to --predict', 'output_dir is a file', 'text file to --resume',
         'empty file to --resume', 'classifier run to --resume', 'input_size 0', 'num_workers -1',
         'batch_size 0', 'num_frames 7', 'truncated --finetune to detect', 'half the videos broken']


@pytest.mark.slow
@pytest.mark.parametrize('case', CASES)
def test_a_user_error_ends_in_one_line_naming_the_flag_or_file(case, files, videos, pretrained,
                                                                 list_videos):
    argv, code, needle = cases(files, videos, pretrained, list_videos)[case]
    p = run(*argv, check=False)
    assert p.returncode == code, p.stderr[-2000:]
    assert 'Traceback' not in p.stderr, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith('error: ')]
    assert len(errors) == 1 and needle in errors[0], p.stderr[-2000:]
    assert (files / 'a_file').read_text() == 'x'                 # nothing already written is lost
