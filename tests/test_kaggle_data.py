"""A later competition's data and model zoo: labels from a CSV beside a flat folder, timm models by name."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from config import ROOT, DefaultConfig, UserError
from conftest import as_flags, assert_one_line_error, fast_options, newest_run, run_main, torchrun
from data import DogCat, Labels, Split
from data.demo import make_demo_data
from data.transforms import MEAN, STD
from models import build_model, check_options
from training import engine
from utils.files import load_checkpoint


@pytest.fixture(scope='module')
def csv_data(tmp_path_factory):
    """train/img-N.jpg (20 cats, 20 dogs) named in train.csv (id,label), and test1/photo-N.jpg (6)."""
    root = tmp_path_factory.mktemp('csv')
    make_demo_data(root, n_train=40, n_test=6, seed=3, layout='csv')
    return root


def csv_options(tmp_path, data, **more):
    return fast_options(tmp_path, data, **{'train_labels': str(data / 'train.csv'), **more})


def write_rows(path, rows):
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows(rows)
    return path


def test_a_csv_names_the_images_and_what_does_not_match_is_counted_in_one_line(tmp_path, csv_data, capsys):
    folder = tmp_path / 'train'
    folder.mkdir()
    for name in ('a.jpg', 'b.jpg', 'c.png', 'd.jpg', 'stray.jpg', '._a.jpg'):  # ._a.jpg: macOS's, hidden
        shutil.copy(csv_data / 'train' / 'img-0.jpg', folder / name)
    labels = write_rows(
        tmp_path / 'labels.csv',
        [
            ('name', 'kind', 'source'),
            ('a.jpg', '10', 'x'),  # an id with its extension
            ('b', '2', 'x'),  # and without
            ('c', '10', 'x'),
            ('ghost', '2', 'x'),  # no such image
            ('b', '10', 'x'),  # a duplicate: the first row counts
            ('d', '', 'x'),  # no label
            (),  # a blank line, skipped: the next rows are named by their line in the file
            ('', '2', 'x'),  # no id, twice: not a duplicate
            ('', '10', 'x'),
        ],
    )
    data = DogCat(folder, 'train', split=Split(0), labels=Labels(labels, 'name', 'kind'))
    assert data.classes == ['2', '10']  # numbers sorted as numbers
    assert sorted(zip(data.ids, data.targets)) == [('a.jpg', 1), ('b', 0), ('c', 1)]
    assert sorted(p.rsplit('/', 1)[1] for p in data.paths) == ['a.jpg', 'b.jpg', 'c.png']
    warning = capsys.readouterr().err.strip()
    assert len(warning.splitlines()) == 1, warning
    for counted in (
        'ids without an image: 1 (ghost)',
        'duplicate ids: 1 (b)',
        'empty ids or labels: 3 (d, line 9, line 10)',
        'images the CSV does not name: 2 (d.jpg, stray.jpg)',
    ):
        assert counted in warning


@pytest.mark.parametrize(
    'content, options, message',
    [
        ('id,label\nimg-0,cat\n', dict(label_column='kind'), "has no column 'kind' (--label_column); its columns: id"),
        ('just one column\nimg-0\n', {}, 'not a CSV of labels'),
        (b'\x89PNG\r\n\x1a\n\x00\x00\xff\xfe', {}, 'cannot be read as a CSV of labels'),
        ('id,label\nnobody,cat\nimg-1,\n', {}, 'none of its 2 rows names an image'),
        ('note,image_id,label\nx,img-0,cat\n', {}, "ids read from its column 'note', labels from 'label' (--image_"),
    ],
)
def test_a_csv_that_cannot_label_the_images_is_a_clear_error(tmp_path, csv_data, content, options, message):
    labels = tmp_path / 'labels.csv'
    (labels.write_bytes if isinstance(content, bytes) else labels.write_text)(content)
    with pytest.raises(UserError) as error:
        main.train(**csv_options(tmp_path, csv_data, train_labels=str(labels), **options))
    assert message in str(error.value) and '\n' not in str(error.value)


def test_a_missing_column_is_a_one_line_error_and_exit_2(tmp_path, csv_data):
    flags = as_flags(csv_options(tmp_path, csv_data, image_column='name'))
    assert_one_line_error(run_main('train', *flags), "has no column 'name' (--image_column)")


def test_csv_data_trains_validates_tests_and_resumes_by_its_options(tmp_path, csv_data, capsys):
    options = csv_options(tmp_path, csv_data)
    main.train(**options)
    out = capsys.readouterr().out
    assert '28 training and 12 validation images' in out and 'labels from train.csv; 2 classes: cat, dog' in out
    run = newest_run(tmp_path / 'checkpoints')
    assert load_checkpoint(run / 'best.pth')['config']['train_labels'] == str(csv_data / 'train.csv')

    # val and a resume find the images and their labels again from the checkpoint alone
    where = dict(checkpoint_dir=options['checkpoint_dir'], model='SqueezeNet', num_workers=0, use_gpu=False, vis=False)
    main.val(**where)
    assert '12 validation images' in capsys.readouterr().out
    main.train(**where, resume='latest', max_epoch=2, tensorboard=False)
    assert len((run / 'metrics.jsonl').read_text().splitlines()) == 2

    main.test(**where, result_file=str(tmp_path / 'result.csv'))
    rows = (tmp_path / 'result.csv').read_text().splitlines()
    assert rows[0] == 'id,label' and sorted(r.split(',')[0] for r in rows[1:]) == [f'photo-{n}' for n in range(1, 7)]


def test_a_validation_csv_names_the_validation_images(tmp_path, csv_data, capsys):
    rows = list(csv.reader(open(csv_data / 'train.csv')))
    train = write_rows(tmp_path / 'train.csv', rows[:31])
    val = write_rows(tmp_path / 'val.csv', rows[:1] + rows[31:])
    main.train(**fast_options(tmp_path, csv_data, train_labels=str(train), val_labels=str(val)))
    assert '30 training and 10 validation images' in capsys.readouterr().out
    # a validation CSV that names training images too: they are left out of training, and counted
    both = write_rows(tmp_path / 'both.csv', rows[:1] + rows[21:])
    main.train(**fast_options(tmp_path / 'both', csv_data, train_labels=str(both), val_labels=str(val)))
    out, err = capsys.readouterr()
    assert '10 training and 10 validation images' in out and 'validation images: 10' in err
    assert 'images the CSV does not name: 20' in err  # img-0 to img-19: the validation CSV's are no strays
    # val of the run with another validation CSV: the images are still those of its training folder
    where = dict(checkpoint_dir=str(tmp_path / 'checkpoints'), use_gpu=False, num_workers=0, vis=False)
    main.val(**where, val_labels=str(write_rows(tmp_path / 'val5.csv', rows[:1] + rows[31:36])))
    assert '5 validation images' in capsys.readouterr().out


def test_a_validation_csv_over_a_kaggle_folder_takes_its_images_out_of_training(tmp_path, tiny_data):
    names = ['cat.0.jpg', 'cat.1.jpg', 'cat.2.jpg', 'dog.0.jpg', 'dog.1.jpg', 'dog.2.jpg']
    val = write_rows(tmp_path / 'val.csv', [('id', 'label'), *((name, name.split('.')[0]) for name in names)])
    cfg = DefaultConfig()
    cfg.check_values(fast_options(tmp_path, tiny_data, val_labels=str(val)))
    train_data, val_data = engine.training_data(cfg, tiny_data / 'train')
    assert sorted(Path(p).name for p in val_data.paths) == names
    assert len(train_data) == 40 - len(names) and not set(train_data.paths) & set(val_data.paths)
    # a validation CSV of one class: the validation set takes the training set's classes
    cats = write_rows(tmp_path / 'cats.csv', [('id', 'label'), *((name, 'cat') for name in names[:3])])
    cfg.val_labels = str(cats)
    train_data, val_data = engine.training_data(cfg, tiny_data / 'train')
    assert len(train_data) == 40 - 3 and val_data.classes == ['cat', 'dog'] and set(val_data.targets) == {0}


@pytest.mark.slow
def test_kfold_on_csv_data_names_the_csv_ids(tmp_path, csv_data):
    main.kfold(folds=2, **csv_options(tmp_path, csv_data, name='k'))
    ids = {row['id'] for row in csv.DictReader(open(csv_data / 'train.csv'))}
    oof = list(csv.DictReader(open(tmp_path / 'checkpoints' / 'k' / 'oof.csv')))
    assert len(oof) == 40 and {row['id'] for row in oof} == ids
    suspects = list(csv.DictReader(open(tmp_path / 'checkpoints' / 'k' / 'suspect_labels.csv')))
    assert all(row['id'] in ids for row in suspects)


TIMM = 'timm/test_resnet'  # timm's own tiny ResNet for tests


@pytest.fixture(scope='module')
def timm_weights(tmp_path_factory):
    """A file of 1000-class weights of TIMM, as an ImageNet checkpoint downloaded once would be."""
    import timm

    torch.manual_seed(5)
    file = tmp_path_factory.mktemp('timm') / 'test_resnet.pth'
    torch.save(timm.create_model(TIMM.removeprefix('timm/')).state_dict(), file)
    return file


def test_a_timm_model_takes_its_features_from_a_file_and_renormalises_its_input(timm_weights):
    model = build_model(TIMM, num_classes=3, pretrained_path=str(timm_weights)).eval()
    stored = torch.load(timm_weights, weights_only=True)
    features = {k: v for k, v in model.net.state_dict().items() if not k.startswith('fc.')}
    assert all(torch.equal(v, stored[k]) for k, v in features.items())
    assert model.head().out_features == 3
    own = model.net.pretrained_cfg
    pixels = torch.rand(2, 3, 32, 32)
    imagenet = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    its_own = (pixels - torch.tensor(own['mean']).view(1, 3, 1, 1)) / torch.tensor(own['std']).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(imagenet), model.net(its_own))


def test_a_timm_model_uses_its_own_input_size_unless_told(capsys, timm_weights):
    cfg = DefaultConfig().parse({'model': TIMM})
    check_options(cfg)
    assert cfg.image_size == 160 and 'its own input size' in capsys.readouterr().out
    cfg = DefaultConfig().parse({'model': TIMM, 'image_size': 48})
    check_options(cfg)
    assert cfg.image_size == 48
    with pytest.raises(UserError, match='does not hold weights of timm/test_convnext'):
        build_model('timm/test_convnext', pretrained_path=str(timm_weights))


@pytest.mark.slow
def test_a_timm_model_trains_resumes_exports_and_explains(tmp_path, tiny_data, timm_weights):
    options = fast_options(tmp_path, tiny_data, model=TIMM, pretrained_path=str(timm_weights), ema_decay=0.5)
    options.pop('amp')  # the default: bf16 where the CPU has it
    main.train(**options)
    main.train(**{**options, 'resume': 'latest', 'max_epoch': 2})
    run = newest_run(tmp_path / 'checkpoints')
    assert len((run / 'metrics.jsonl').read_text().splitlines()) == 2
    where = ['--checkpoint_dir=' + options['checkpoint_dir'], '--use_gpu=False', '--vis=False']
    exported = run_main('export', *where)
    assert exported.returncode == 0, exported.stderr
    image = str(tiny_data / 'test1' / '1.jpg')
    onnx = subprocess.run([sys.executable, str(ROOT / 'tools' / 'predict_onnx.py'), str(run / 'model.onnx'), image],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    explained = run_main('predict', image, '--explain=True', f'--out={tmp_path / "p.csv"}', *where)
    assert explained.returncode == 0, explained.stderr
    by_torch = next(line.split() for line in explained.stdout.splitlines() if line.startswith(image))
    by_onnx = onnx.stdout.split()
    assert by_onnx[1] == by_torch[1] and float(by_onnx[2]) == pytest.approx(float(by_torch[2]), abs=0.01)  # bf16
    assert (tmp_path / '1-cam.png').is_file()


@pytest.mark.slow
def test_a_timm_model_on_csv_data_trains_under_torchrun(tmp_path, csv_data):
    labels = tmp_path / 'train.csv'  # with a row of no image: one warning, not one a process
    labels.write_text((csv_data / 'train.csv').read_text() + 'ghost,cat\n')
    result = torchrun('train', *as_flags(csv_options(tmp_path, csv_data, model=TIMM, train_labels=str(labels))))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count('left out ids without an image: 1 (ghost)') == 1, result.stderr
    assert 'timm/test_resnet: 372,882 parameters on cpu in each of 2 processes' in result.stdout
    assert 'labels from train.csv; 2 classes: cat, dog' in result.stdout
    assert 'x 2 processes' in (newest_run(tmp_path / 'checkpoints') / 'config.json').read_text()


def test_a_name_timm_lacks_is_an_error_with_the_closest_names():
    with pytest.raises(UserError, match='did you mean timm/convnext_tiny or'):
        check_options(DefaultConfig().parse({'model': 'timm/convnext_tinyy'}))


@pytest.mark.slow
def test_timm_and_matplotlib_are_imported_only_by_what_needs_them(tmp_path, tiny_data):
    code = (
        'import sys; sys.path.insert(0, sys.argv[1]); import main; main.train(**eval(sys.argv[2])); '
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'timm', 'matplotlib'}))"
    )
    for model, imported in (('SqueezeNet', '[]'), (TIMM, "['timm']")):
        options = repr(fast_options(tmp_path / model.replace('/', '-'), tiny_data, model=model))
        result = subprocess.run([sys.executable, '-c', code, str(ROOT), options], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1] == imported
