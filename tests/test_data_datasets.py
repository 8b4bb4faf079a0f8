"""load_split reads each dataset in the layout users download (tiny real videos, real annotation
syntax)."""
import csv
import json
import os
import warnings

import numpy as np
import pytest

import data
import synthetic


def clip(path, frames=20, h=32, w=32, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    synthetic.encode_video(str(path), rng.integers(0, 255, (frames, h, w, 3), dtype=np.uint8),
                      fps=25, gop=12)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', newline='') as f:
        f.write(text)


@pytest.fixture
def ucf(tmp_path):
    classes = {1: 'ApplyEyeMakeup', 35: 'Hammering', 36: 'HammerThrow', 37: 'HandstandPushups',
               101: 'YoYo'}
    write(tmp_path / 'ucfTrainTestlist/classInd.txt',
          ''.join(f'{i} {c}\r\n' for i, c in classes.items()))
    train, test = [], []
    for i, c in classes.items():
        fname = c.replace('Handstand', 'HandStand')  # the real file names say HandStandPushups
        for g, lst in ((8, train), (1, test)):
            rel = f'{c}/v_{fname}_g{g:02d}_c01.avi'
            clip(tmp_path / 'UCF-101' / rel)
            lst.append(f'{rel} {i}' if lst is train else rel)
    # a mirror that renamed the file: the list says HandStand, the disk says Handstand
    os.rename(tmp_path / 'UCF-101/HandstandPushups/v_HandStandPushups_g01_c01.avi',
              tmp_path / 'UCF-101/HandstandPushups/v_HandstandPushups_g01_c01.avi')
    write(tmp_path / 'ucfTrainTestlist/trainlist01.txt', '\r\n'.join(train) + '\r\n')
    write(tmp_path / 'ucfTrainTestlist/testlist01.txt', '\n'.join(test) + '\n\n')
    return tmp_path


def test_ucf101_labels_come_from_classind_not_sorted_folders(ucf):
    samples, classes = data.load_split('ucf101', str(ucf), 'train')
    assert classes == ['ApplyEyeMakeup', 'Hammering', 'HammerThrow', 'HandstandPushups', 'YoYo']
    labels = {os.path.basename(p): y for p, y in samples}
    assert labels['v_Hammering_g08_c01.avi'] == 1 and labels['v_HammerThrow_g08_c01.avi'] == 2
    test, _ = data.load_split('ucf101', str(ucf), 'test')
    # incl. the case-insensitive match
    assert len(test) == 5 and all(os.path.isfile(p) for p, _ in test)
    # data_path = UCF-101 itself
    assert data.load_split('ucf101', str(ucf / 'UCF-101'), 'val')[0] == test
    assert data.decode_frames(samples[0][0], [0, 19]).shape == (2, 32, 32, 3)


def test_ucf101_errors_name_the_missing_file(ucf, tmp_path):
    with pytest.raises(data.DataError, match='trainlist02.txt'):
        data.load_split('ucf101', str(ucf), 'train', fold=2)
    with pytest.raises(data.DataError, match='does not exist'):
        data.load_split('ucf101', str(tmp_path / 'nowhere'), 'train')
    os.remove(ucf / 'ucfTrainTestlist/classInd.txt')
    with pytest.raises(data.DataError, match='classInd.txt'):
        data.load_split('ucf101', str(ucf), 'train')
    with pytest.raises(ValueError, match="split must be"):
        data.load_split('ucf101', str(ucf), 'training')
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_split('ucf-101', str(ucf), 'train')


def test_ucf101_unknown_class_in_split_file(ucf):
    with open(ucf / 'ucfTrainTestlist/trainlist01.txt', 'a') as f:
        f.write('Juggling/v_Juggling_g08_c01.avi 50\n')
    with pytest.raises(data.DataError, match="'Juggling'"):
        data.load_split('ucf101', str(ucf), 'train')


def hmdb_tree(videos, splits):
    """HMDB51 class folders under `videos`, testTrainMulti_7030_splits/ under `splits`."""
    names = {'climb': ['(Rad)Schlag_die_Bank!_climb_f_cm_np1_le_med_0.avi',
                       'b_climb_u_nm_np1_ba_goo_0.avi', 'c_climb_u_nm_np1_ba_goo_1.avi'],
             'climb_stairs': ['x_climb_stairs_f_nm_np1_fr_med_0.avi',
                              'y_climb_stairs_f_nm_np1_fr_med_1.avi',
                              'z_climb_stairs_f_nm_np1_fr_med_2.avi']}
    for c, files in names.items():
        for f in files:
            clip(videos / c / f, w=40)
        write(splits / f'testTrainMulti_7030_splits/{c}_test_split1.txt',
              ''.join(f'{f} {t} \n' for f, t in zip(files, (1, 2, 0))))
    return names


def test_hmdb51_split_tags(tmp_path):
    names = hmdb_tree(tmp_path, tmp_path)
    train, classes = data.load_split('hmdb51', str(tmp_path), 'train')
    test, _ = data.load_split('hmdb51', str(tmp_path), 'test')
    assert classes == ['climb', 'climb_stairs']
    assert [(os.path.basename(p), y) for p, y in train] == [(names['climb'][0], 0),
                                                            (names['climb_stairs'][0], 1)]
    assert [os.path.basename(p) for p, _ in test] == [names['climb'][1], names['climb_stairs'][1]]
    with pytest.raises(data.DataError, match='_test_split2.txt'):
        data.load_split('hmdb51', str(tmp_path), 'train', fold=2)


@pytest.mark.parametrize('layout', ['flat', 'classes'])
def test_k400_csv_and_clip_layouts(tmp_path, layout):
    rows = [('abseiling', '--33Lscn6sk', 4, 14),
            ('passing American football (in game)', 'aaaaaaaaaaa', 0, 10),
            ("massaging person's head", 'bbbbbbbbbbb', 20, 30), ('abseiling', 'ccccccccccc', 1, 11),
            ('zumba', 'ddddddddddd', 3, 13)]
    csv_text = 'label,youtube_id,time_start,time_end,split,is_cc\n' + ''.join(
        f'"{lab}",{y},{a},{b},train,0\n' if ' ' in lab else f'{lab},{y},{a},{b},train,0\n'
        for lab, y, a, b in rows)
    write(tmp_path / 'annotations/train.csv', csv_text)
    # 4 columns, no header
    write(tmp_path / 'annotations/validate.csv', 'abseiling,--33Lscn6sk,4,14\n')
    exts = ['.mp4', '.mkv', '.webm', '.mp4']
    for (label, yid, a, b), ext in zip(rows[:4], exts):  # zumba's clip is missing
        # one named by youtube id only
        name = f'{yid}_{a:06d}_{b:06d}{ext}' if ext != '.mkv' else f'{yid}{ext}'
        sub = label.replace(' ', '_') if layout == 'classes' else ''
        clip(tmp_path / 'train' / sub / name)
        if yid == '--33Lscn6sk':
            clip(tmp_path / 'val' / sub / name)
    with pytest.warns(UserWarning, match='1 of 5 clips'):
        samples, classes = data.load_split('k400', str(tmp_path), 'train')
    assert classes == sorted({r[0] for r in rows})
    assert sorted(y for _, y in samples) == [0, 0, 1, 2]  # abseiling x2, massaging, passing
    assert all(data.decode_frames(p, [0, 10]).shape == (2, 32, 32, 3) for p, _ in samples)
    val, _ = data.load_split('k400', str(tmp_path), 'val')
    assert [y for _, y in val] == [0]
    write(tmp_path / 'annotations/validate.csv', 'jumping,--33Lscn6sk,4,14\n')
    with pytest.raises(data.DataError, match="'jumping'"):
        data.load_split('k400', str(tmp_path), 'val')


def test_ssv2_templates_to_labels(tmp_path):
    labels = {'Holding something next to something': '19',
              'Something falling like a feather or paper': '10',
              'Putting something, something and something on the table': '2'}
    write(tmp_path / 'labels/labels.json', json.dumps(labels))
    entries = [{'id': '78687', 'label': 'holding potato next to vicks',
                'template': 'Holding [something] next to [something]',
                'placeholders': ['potato', 'vicks']},
               {'id': '36585', 'label': 'plastic falling',
                'template': '[Something] falling like a feather or paper',
                'placeholders': ['plastic']},
               {'id': '5', 'label': 'x',
                'template': 'Putting [something], [something] and [something] on the table',
                'placeholders': ['a', 'b', 'c']}]
    write(tmp_path / 'labels/train.json', json.dumps(entries))
    write(tmp_path / 'labels/validation.json', json.dumps(entries[:1]))
    for e in entries:
        clip(tmp_path / f'20bn-something-something-v2/{e["id"]}.webm')
    samples, classes = data.load_split('ssv2', str(tmp_path), 'train')
    assert ([y for _, y in samples] == [19, 10, 2]
            and classes[19] == 'Holding something next to something')
    assert data.load_split('ssv2', str(tmp_path), 'val')[0] == samples[:1]
    # WebM: no frame count in header
    assert data.decode_frames(samples[0][0], [0, 19]).shape == (2, 32, 32, 3)
    entries[0]['template'] = 'Holding [something] near [something]'
    write(tmp_path / 'labels/train.json', json.dumps(entries))
    with pytest.raises(data.DataError, match='near'):
        data.load_split('ssv2', str(tmp_path), 'train')


def test_official_list_files(tmp_path):
    clip(tmp_path / 'videos/a.mp4')
    clip(tmp_path / 'videos/b.avi')
    write(tmp_path / 'lists/train.csv', f'{tmp_path}/videos/a.mp4 0\n../videos/b.avi 3\n')
    samples, classes = data.load_split('list', str(tmp_path / 'lists'), 'train')
    assert samples == [(f'{tmp_path}/videos/a.mp4', 0),
                       (str(tmp_path / 'lists/../videos/b.avi'), 3)]
    assert len(classes) == 4
    assert data.load_split('list', str(tmp_path / 'lists/train.csv'), 'train')[0] == samples
    write(tmp_path / 'lists/val.csv', f'{tmp_path}/videos/a.mp4  0\n{tmp_path}/videos/b.avi\n')
    with pytest.raises(data.DataError, match=r'val.csv:2'):
        data.load_split('list', str(tmp_path / 'lists'), 'val')
    write(tmp_path / 'lists/test.csv', '')
    with pytest.raises(data.DataError, match='empty'):
        data.load_split('list', str(tmp_path / 'lists'), 'test')


@pytest.mark.parametrize('folder', ['UCF101', 'videos'])
def test_ucf101_renamed_video_folder_and_prefixed_lines(ucf, folder):
    before, _ = data.load_split('ucf101', str(ucf), 'train')
    os.rename(ucf / 'UCF-101', ucf / folder)
    lines = (ucf / 'ucfTrainTestlist/trainlist01.txt').read_text().splitlines()
    write(ucf / 'ucfTrainTestlist/trainlist01.txt', ''.join(  # Windows separators, path prefixes
        f'{ln.replace("/", chr(92))}\r\n' if i % 2 else f'UCF-101/{ln}\n'
        for i, ln in enumerate(lines)))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no clip missing
        samples, _ = data.load_split('ucf101', str(ucf), 'train')
    assert ([(os.path.relpath(p, ucf / folder), y) for p, y in samples]
            == [(os.path.relpath(p, ucf / 'UCF-101'), y) for p, y in before])


@pytest.mark.parametrize('layout', ['hmdb51_org', 'videos', 'splits in the parent'])
def test_hmdb51_video_subfolder_and_split_folder_beside(tmp_path, layout):
    root = tmp_path / 'hmdb51'
    if layout == 'splits in the parent':
        names = hmdb_tree(root, tmp_path)
    else:
        names = hmdb_tree(root / layout, root)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        train, classes = data.load_split('hmdb51', str(root), 'train')
    assert classes == ['climb', 'climb_stairs']
    assert [(os.path.basename(p), y) for p, y in train] == [(names['climb'][0], 0),
                                                            (names['climb_stairs'][0], 1)]
    with pytest.raises(data.DataError, match='testTrainMulti_7030_splits'):  # two levels down
        data.load_split('hmdb51', os.path.dirname(train[0][0]), 'train')


K400_HEAD = 'label,youtube_id,time_start,time_end,split,is_cc\n'


def test_k400_csv_columns_by_header_name(tmp_path):
    clip(tmp_path / 'train/-3B32lodo2M_000059_000069.mp4')
    clip(tmp_path / 'train/aaaaaaaaaaa_000000_000010.mp4')
    clip(tmp_path / 'val/bbbbbbbbbbb_000002_000012.mp4')
    write(tmp_path / 'annotations/train.csv',  # the columns in another order
          'youtube_id,split,time_start,time_end,is_cc,label\n-3B32lodo2M,train,59,69,0,abseiling\n'
          'aaaaaaaaaaa,train,0,10,0,"tying knot (not on a tie)"\n')
    write(tmp_path / 'annotations/val.csv', '"tying knot (not on a tie)",bbbbbbbbbbb,2,12,val\n')
    samples, classes = data.load_split('k400', str(tmp_path), 'train')
    assert classes == ['abseiling', 'tying knot (not on a tie)']
    assert [(os.path.basename(p), y) for p, y in samples] == [
        ('-3B32lodo2M_000059_000069.mp4', 0), ('aaaaaaaaaaa_000000_000010.mp4', 1)]
    assert [y for _, y in data.load_split('k400', str(tmp_path), 'val')[0]] == [1]  # 5, no header
    write(tmp_path / 'annotations/train.csv', 'youtube_id,time_start,time_end,split\n'
          '-3B32lodo2M,59,69,train\n')  # the old test.csv columns: no label
    with pytest.raises(data.DataError, match="train.csv: no column .'label'."):
        data.load_split('k400', str(tmp_path), 'train')
    for row in ('abseiling,-3B32lodo2M\n', 'abseiling,-3B32lodo2M,59s,69,train\n'):  # no header
        write(tmp_path / 'annotations/train.csv', row)          # too few columns; not a time
        with pytest.raises(data.DataError, match=r"train.csv: row \[.*\] is not label,youtube_id"):
            data.load_split('k400', str(tmp_path), 'train')


@pytest.mark.parametrize('folder', ['validate', 'valid'])
def test_k400_validation_folder_names(tmp_path, folder):
    write(tmp_path / 'annotations/train.csv', K400_HEAD + 'abseiling,-3B32lodo2M,59,69,train,0\n')
    write(tmp_path / 'annotations/validate.csv', K400_HEAD + 'abseiling,ccccccccccc,1,11,val,0\n')
    clip(tmp_path / folder / 'abseiling/ccccccccccc_000001_000011.mp4')
    val, classes = data.load_split('k400', str(tmp_path), 'val')
    assert val == [(str(tmp_path / folder / 'abseiling/ccccccccccc_000001_000011.mp4'), 0)]


def test_k400_opendatalab_flat_copy(tmp_path):
    # the copy VideoMAE used: every clip right under the root, named by its youtube id only
    write(tmp_path / 'annotations/train.csv',
          K400_HEAD + 'abseiling,-3B32lodo2M,59,69,train,0\nzumba,aaaaaaaaaaa,0,10,train,0\n')
    write(tmp_path / 'annotations/val.csv', K400_HEAD + 'zumba,ccccccccccc,1,11,val,0\n')
    for yid in ('-3B32lodo2M', 'aaaaaaaaaaa', 'ccccccccccc'):
        clip(tmp_path / f'{yid}.mp4')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        train, _ = data.load_split('k400', str(tmp_path), 'train')
        val, _ = data.load_split('k400', str(tmp_path), 'test')
    assert train == [(str(tmp_path / '-3B32lodo2M.mp4'), 0), (str(tmp_path / 'aaaaaaaaaaa.mp4'), 1)]
    assert val == [(str(tmp_path / 'ccccccccccc.mp4'), 1)]


def test_k400_val_without_train_csv_takes_classes_from_its_own_labels(tmp_path):
    write(tmp_path / 'kinetics400/validate.csv', K400_HEAD + 'zumba,ccccccccccc,1,11,val,0\n'
          '"air drumming",_dbcJuKJQNs,40,50,val,0\n')
    clip(tmp_path / 'val/zumba/ccccccccccc_000001_000011.mp4')
    clip(tmp_path / 'val/air_drumming/_dbcJuKJQNs_000040_000050.mp4')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        val, classes = data.load_split('k400', str(tmp_path), 'val')
    assert classes == ['air drumming', 'zumba'] and [y for _, y in val] == [1, 0]
    with pytest.raises(data.DataError, match='Kinetics train.csv not found'):
        data.load_split('k400', str(tmp_path), 'train')


@pytest.mark.parametrize('where,prefix', [('', ''), ('labels', 'something-something-v2-'),
                                          ('', 'something-something-v2-')])
def test_ssv2_label_files_in_root_and_old_names(tmp_path, where, prefix):
    labels = {'Holding something next to something': '19',
              'Something falling like a feather or paper': '10'}
    entries = [{'id': '78687', 'template': 'Holding [something] next to [something]'},
               {'id': '36585', 'template': '[Something] falling like a feather or paper'}]
    for name, obj in (('labels', labels), ('train', entries), ('validation', entries[1:])):
        write(tmp_path / where / f'{prefix}{name}.json', json.dumps(obj))
    for e in entries:
        clip(tmp_path / f'20bn-something-something-v2/{e["id"]}.webm')
    samples, classes = data.load_split('ssv2', str(tmp_path), 'train')
    assert [y for _, y in samples] == [19, 10] and len(classes) == 20
    assert data.load_split('ssv2', str(tmp_path), 'val')[0] == samples[1:]
    os.remove(tmp_path / where / f'{prefix}train.json')
    with pytest.raises(data.DataError, match='something-something-v2-train.json'):
        data.load_split('ssv2', str(tmp_path), 'train')


def folders(root, layout):
    """Class folders (ImageFolder layout) from {'train/a': ['x.avi'], ...}: tiny real videos."""
    for folder, names in layout.items():
        os.makedirs(root / folder, exist_ok=True)
        for k, name in enumerate(names):
            if name.lower().endswith(data.VIDEO_EXTS):
                clip(root / folder / name, frames=8, seed=k)
            else:
                write(root / folder / name, 'not a video\n')
    return root


def test_class_folders_labels_from_train_for_every_split(tmp_path):
    folders(tmp_path, {'train/a': ['x.avi'], 'train/b': ['x.avi', 'more/z.MP4'],
                       'train/c': ['x.avi'], 'val/a': ['y.avi'], 'val/c': ['y.avi'],
                       'val/.ipynb_checkpoints': []})
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # nothing skipped that deserves a word
        write(tmp_path / 'train/a/.DS_Store', '')  # hidden files and folders: silently left out
        samples, classes = data.load_split('folder', str(tmp_path), 'train')
    assert classes == ['a', 'b', 'c']
    assert [(os.path.relpath(p, tmp_path), y) for p, y in samples] == [
        ('train/a/x.avi', 0), ('train/b/more/z.MP4', 1), ('train/b/x.avi', 1), ('train/c/x.avi', 2)]
    val, val_classes = data.load_split('folder', str(tmp_path), 'val')
    assert val_classes == classes  # c keeps label 2 though val/ has no b/
    assert [(os.path.relpath(p, tmp_path), y) for p, y in val] == [('val/a/y.avi', 0),
                                                                    ('val/c/y.avi', 2)]
    assert data.load_split('folder', str(tmp_path), 'test') == (val, classes)
    assert data.decode_frames(val[0][0], [0, 7]).shape == (2, 32, 32, 3)


def test_class_folders_test_instead_of_val(tmp_path):
    folders(tmp_path, {'train/a': ['x.avi'], 'train/b': ['x.avi'],
                       'test/a': ['y.avi'], 'test/b': ['y.avi']})
    for split in ('val', 'test'):
        samples, classes = data.load_split('folder', str(tmp_path), split)
        assert classes == ['a', 'b'] and [(os.path.relpath(p, tmp_path), y) for p, y in samples] \
            == [('test/a/y.avi', 0), ('test/b/y.avi', 1)]


def test_class_folders_skip_non_videos_with_one_warning(tmp_path):
    folders(tmp_path, {'train/a': ['x.avi', 'notes.txt'], 'train/b': ['x.avi', 'cover.jpg']})
    with pytest.warns(UserWarning, match=r"skipping 2 file\(s\) not ending in .mp4/.avi.*"
                                         r"a/notes.txt.*b/cover.jpg") as caught:
        samples, _ = data.load_split('folder', str(tmp_path), 'train')
    assert len(caught) == 1 and [y for _, y in samples] == [0, 1]


def test_class_folders_errors_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(data.DataError, match=r'folder train/ not found .*one sub-folder of videos '
                                             r'per class'):
        data.load_split('folder', str(tmp_path), 'train')
    folders(tmp_path, {'train': ['flat.avi']})  # videos, but no class folders
    with pytest.raises(data.DataError, match=r'train: no class sub-folders in it'):
        data.load_split('folder', str(tmp_path), 'train')
    folders(tmp_path, {'train/a': ['x.avi'], 'train/b': ['x.avi']})
    with pytest.raises(data.DataError, match=r'folder val/ or test/ not found .*/val, .*/test\)'):
        data.load_split('folder', str(tmp_path), 'val')
    os.makedirs(tmp_path / 'val')
    with pytest.raises(data.DataError, match=r'val: no class sub-folders in it'):
        data.load_split('folder', str(tmp_path), 'test')
    folders(tmp_path, {'val/a': ['y.avi'], 'val/z': ['y.avi']})
    with pytest.raises(data.DataError, match=r"val/z: class 'z' is not in .*train: rename it or "
                                             r'add z/ there'):
        data.load_split('folder', str(tmp_path), 'val')
    os.makedirs(tmp_path / 'train/c')  # an empty class folder
    with pytest.raises(data.DataError, match=r'train/c: no video file \(.mp4/.avi/.mkv/.webm/.mov'
                                             r'\) in this class folder \(its files: none\)'):
        data.load_split('folder', str(tmp_path), 'train')
    folders(tmp_path, {'train/c': ['readme.txt']})  # only files that are not videos
    with pytest.raises(data.DataError, match=r'train/c: no video file .*its files: .*readme.txt'
                                             r".*add videos or remove it"):
        data.load_split('folder', str(tmp_path), 'train')


@pytest.mark.slow
def test_finetune_on_class_folders(tmp_path):
    from conftest import CLIP, run
    root = folders(tmp_path / 'data', {f'{split}/{c}': [f'{split}{k}.avi' for k in range(2)]
                                       for split in ('train', 'val') for c in ('jump', 'run')})
    run('finetune.py', '--dataset', 'folder', '--data_path', root, *CLIP, '--embed_dim', '32',
        '--depth', '2', '--num_heads', '2', '--patch_size', '8', '--batch_size', '2',
        '--total_batch', '4', '--epochs', '1', '--warmup_epochs', '0', '--val_freq', '0',
        '--output_dir', tmp_path / 'out')
    assert json.load(open(tmp_path / 'out/test-results.json'))['videos'] == 4
    with open(tmp_path / 'out/test-per-class.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [(r['class'], r['videos']) for r in rows] == [('jump', '2'), ('run', '2')]
