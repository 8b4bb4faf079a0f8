"""pretrain.py: bad flags fail before any work with a message naming the flag (exit code 2), the
recipes are the appendix's, explicit flags win, and the learning-rate schedule has the official
shape."""
import pytest

import pretrain
import utils


def resolve(*argv):
    return pretrain.resolve(pretrain.build_parser(), [*argv, '--resume', ''])


@pytest.mark.parametrize('argv, message', [
    (['--mask_ratio', '1.0'], '--mask_ratio 1.0 must be in [0, 1)'),
    (['--mask_ratio', '-0.1'], '--mask_ratio -0.1 must be in [0, 1)'),
    (['--num_frames', '15'], '--num_frames 15 is not divisible by the tubelet size 2'),
    (['--input_size', '60'], '--input_size 60 is not divisible by the patch size 8'),
    (['--dataset', 'k400', '--data_path', 'x', '--input_size', '200'],
     'not divisible by the patch size 16'),
    (['--total_batch', '16', '--batch_size', '5'],
     '--total_batch 16 is not a multiple of --batch_size 5'),
    (['--input_size', '0'], '--input_size must be at least 1, got 0'),
    (['--num_workers', '-1'], '--num_workers must be 0'),
    (['--batch_size', '0'], '--batch_size must be at least 1, got 0'),
    (['--dataset', 'kinetics'], "invalid choice: 'kinetics'"),
    (['--model', 'gigantic'], "unknown model 'gigantic'; choose from small, base, large, huge"),
    (['--epochs', '0'], '--epochs must be at least 1, got 0'),
    (['--decoder_mask_ratio', '0.1'], '--decoder_mask_ratio 0.1: the running cell skips'),
    (['--dataset', 'ucf101'], '--dataset ucf101 needs --data_path'),
    (['--mask_ratio', '0.01'], 'hides no cube'),
    (['--mask_type', 'block'], "invalid choice: 'block'"),
    (['--warmup_epochs', '50', '--epochs', '10'], '--warmup_epochs 50 is longer than --epochs 10'),
])
def test_bad_flag_fails_early_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        resolve(*argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_batch_not_divisible_across_processes(monkeypatch, capsys):
    # 8 GPUs x 32 clips cannot make the UCF101 total batch of 192: say what to change
    monkeypatch.setenv('WORLD_SIZE', '8')
    with pytest.raises(SystemExit) as e:
        resolve('--dataset', 'ucf101', '--data_path', 'x', '--batch_size', '32')
    assert e.value.code == 2
    assert ('--total_batch 192 is not a multiple of --batch_size 32 x 8 process(es) = 256'
            in capsys.readouterr().err)
    # 24 x 8 = 192, the recipe's own split
    cfg = resolve('--dataset', 'ucf101', '--data_path', 'x')
    assert cfg['batch_size'] * 8 == cfg['total_batch'] == 192
    monkeypatch.setenv('WORLD_SIZE', '2')                        # the synthetic row on 2 processes:
    assert (resolve()['batch_size'], resolve()['accum_iter']) == (4, 1)   # 8 = 4 x 2, no error


def test_recipes_are_the_appendix_rows():
    k400 = resolve('--dataset', 'k400', '--data_path', 'x')
    ssv2 = resolve('--dataset', 'ssv2', '--data_path', 'x')
    for cfg in (k400, ssv2):   # Table 9
        assert (cfg['lr'], cfg['weight_decay'], cfg['opt_betas'], cfg['total_batch'],
                cfg['warmup_epochs'], cfg['epochs'], cfg['mask_ratio'], cfg['mask_type'],
                cfg['num_frames']) == \
            (1.5e-4, 0.05, [0.9, 0.95], 1024, 40, 800, 0.9, 'tube', 16)
    assert ((k400['flip'], k400['sampling_rate'], ssv2['flip'], ssv2['sampling_rate'])
            == (True, 4, False, 2))
    ucf = resolve('--dataset', 'ucf101', '--data_path', 'x')   # § B
    hmdb = resolve('--dataset', 'hmdb51', '--data_path', 'x')
    assert ((ucf['mask_ratio'], ucf['epochs'], ucf['total_batch'], ucf['lr'],
             ucf['sampling_rate']) == (0.75, 3200, 192, 3e-4, 4))
    assert ((hmdb['mask_ratio'], hmdb['epochs'], hmdb['total_batch'], hmdb['lr'],
             hmdb['sampling_rate']) == (0.75, 4800, 192, 3e-4, 2))
    # embed_dim and patch_size: the size's
    assert (k400['model'], k400['embed_dim'], k400['patch_size']) == ('base', None, None)
    # Table 9: MultiScaleCrop
    assert {cfg['crop'] for cfg in (k400, ssv2, ucf, hmdb)} == {'multiscale'}
    assert resolve()['crop'] == 'center'                       # synthetic: measured (README)
    assert resolve('--crop', 'multiscale')['crop'] == 'multiscale'


def test_explicit_flags_override_recipe_and_ablation_switches():
    cfg = resolve('--dataset', 'k400', '--data_path', 'x', '--lr', '1e-3', '--mask_type', 'random',
                  '--mask_ratio', '0.75', '--no-normalize_target', '--decoder_depth', '2',
                  '--model', 'pretrain_videomae_small_patch16_224')
    assert (cfg['lr'], cfg['mask_type'], cfg['mask_ratio'], cfg['normalize_target'],
            cfg['model']) == (1e-3, 'random', 0.75, False, 'small')
    assert cfg['decoder_depth'] == 2 and pretrain.build_model(cfg).decoder.blocks.__len__() == 2
    assert cfg['epochs'] == 800                                 # untouched keys stay the recipe's


def test_help_shows_every_recipe_default(capsys):
    with pytest.raises(SystemExit):
        resolve('--help')
    text = ' '.join(capsys.readouterr().out.split())
    for snippet in ('k400/ucf101/list/folder/synthetic 4', 'ssv2/k400/list/folder 1024',
                    'ucf101/hmdb51 192', 'ucf101 3200', 'hmdb51 4800', 'lr x total_batch / 256',
                    'synthetic 128'):
        assert snippet in text, snippet


def test_schedule_warmup_peak_and_final():
    # 40 warm-up epochs of 800, peak 1.5e-4 x 4
    cfg = resolve('--dataset', 'k400', '--data_path', 'x')
    spe = 10
    lr = lambda it: utils.cosine_schedule(it, 800 * spe, cfg['warmup_epochs'] * spe,  # noqa: E731
                                          cfg['lr'] * cfg['total_batch'] / 256, cfg['min_lr'] * 4)
    assert lr(0) == 0.0                                         # warm-up starts at 0
    assert lr(20 * spe) == pytest.approx(0.5 * 6e-4)            # linear
    assert lr(40 * spe) == pytest.approx(1.5e-4 * 1024 / 256)  # end of warm-up = peak
    assert lr(420 * spe) == pytest.approx(4e-5 + 0.5 * (6e-4 - 4e-5))   # half-way down the cosine
    last = lr(800 * spe - 1)
    # just above min lr 1e-5 x 4 (official)
    assert 4e-5 < last < 4e-5 * 1.001
    values = [lr(i) for i in range(40 * spe, 800 * spe)]
    assert all(a >= b for a, b in zip(values, values[1:]))     # monotone after warm-up


def test_model_giant_is_a_flag_away_from_videomae_v2s_recipe():
    cfg = resolve('--dataset', 'list', '--data_path', 'x',
                  '--model', 'pretrain_videomae_giant_patch14_224')
    # V2's scripts/pretrain/vit_g_hybrid_pt.sh
    assert (cfg['model'], cfg['mask_ratio'], cfg['decoder_mask_ratio'], cfg['num_sample'],
            cfg['lr'], cfg['clip_grad'], cfg['epochs'], cfg['warmup_epochs']) == \
        ('giant', 0.9, 0.5, 4, 6e-4, 0.02, 300, 30)
    assert resolve('--dataset', 'k400', '--data_path', 'x')['decoder_mask_ratio'] == 0.0  # paper
