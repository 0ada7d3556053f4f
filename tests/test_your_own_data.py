"""Making it your own without editing code: any classes, a folder per class, any torchvision model."""

import csv
import json
import shutil
import warnings

import pytest
import torch
from PIL import Image

import main
from config import UserError
from conftest import as_flags, assert_one_line_error, fast_options, imagenet_weights_in_cache, newest_run, run_main
from data import DogCat, Split
from data.decode import load_pixels
from data.demo import make_demo_data
from data.transforms import eval_transform, train_transform
from models import SqueezeNet, build_model
from utils.files import load_checkpoint

CLASSES = ['cat', 'dog', 'fox']


@pytest.fixture(scope='module')
def three_classes(tmp_path_factory):
    """train/<class>/N.jpg for cat, dog and fox (15 each), and test1/photo-N.jpg (6)."""
    root = tmp_path_factory.mktemp('three')
    make_demo_data(root, n_train=45, n_test=6, seed=2, classes=3, layout='folders')
    return root


@pytest.fixture(scope='module')
def trained_on_three(tmp_path_factory, three_classes):
    folder = tmp_path_factory.mktemp('run3')
    result = run_main('train', *as_flags(fast_options(folder, three_classes, max_epoch=2)))
    assert result.returncode == 0, result.stderr
    return folder, result


@pytest.mark.slow
def test_a_folder_per_class_trains_with_the_class_names_everywhere(trained_on_three):
    folder, result = trained_on_three
    assert '33 training and 12 validation images' in result.stdout
    assert 'one folder per class; 3 classes: cat, dog, fox' in result.stdout
    state = load_checkpoint(newest_run(folder / 'checkpoints') / 'best.pth')
    assert state['classes'] == CLASSES and state['model']['net.classifier.1.weight'].shape[0] == 3
    record = json.loads((newest_run(folder / 'checkpoints') / 'metrics.jsonl').read_text().splitlines()[-1])
    assert record['classes'] == CLASSES and len(record['confusion']) == 3
    assert sum(map(sum, record['confusion'])) == 12 and len(record['recall']) == 3


@pytest.mark.slow
def test_val_test_and_predict_take_the_classes_from_the_checkpoint(trained_on_three, three_classes, tmp_path):
    folder, _ = trained_on_three
    options = fast_options(
        folder,
        three_classes,
        load_model_path=newest_run(folder / 'checkpoints') / 'best.pth',
        result_file=tmp_path / 'result.csv',
    )
    del options['model'], options['image_size']
    val = run_main('val', *as_flags(options))
    assert val.returncode == 0, val.stderr
    assert '12 validation images' in val.stdout
    header = next(line for line in val.stdout.splitlines() if line.startswith('true \\ predicted'))
    assert header.split()[3:] == ['cat', 'dog', 'fox']  # a column per class of the checkpoint
    assert all(f'true {c}' in val.stdout for c in CLASSES) and 'recall' in val.stdout

    test = run_main('test', *as_flags(options))
    assert test.returncode == 0, test.stderr
    with open(tmp_path / 'result.csv', newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['id', *CLASSES]  # Kaggle's multi-class format
    assert [r[0] for r in rows[1:]] == sorted(f'photo-{i}' for i in range(1, 7))  # ids: the names
    assert all(sum(map(float, r[1:])) == pytest.approx(1, abs=2e-4) for r in rows[1:])

    predict = run_main(
        'predict',
        str(three_classes / 'test1'),
        f'--load_model_path={options["load_model_path"]}',
        f'--out={tmp_path}/mine.csv',
        '--use_gpu=False',
    )
    assert predict.returncode == 0, predict.stderr
    lines = [line.split() for line in predict.stdout.splitlines() if line.startswith(str(three_classes))]
    assert len(lines) == 6 and all(label in CLASSES and 0 < float(p) <= 1 for _, label, p in lines)
    with open(tmp_path / 'mine.csv', newline='') as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ['path', 'label', 'p_cat', 'p_dog', 'p_fox']
    for (_, label, p), row in zip(lines, table):  # the printed probability is the named class's
        assert row['label'] == label and row[f'p_{label}'] == p
        assert max(CLASSES, key=lambda c: float(row[f'p_{c}'])) == label


@pytest.mark.slow
def test_data_of_other_classes_is_refused_naming_both_lists(trained_on_three, tiny_data):
    folder, _ = trained_on_three
    result = run_main(
        'val',
        f'--load_model_path={newest_run(folder / "checkpoints") / "best.pth"}',
        f'--train_data_root={three_classes_with_a_new_one(folder)}',
        '--use_gpu=False',
    )
    assert_one_line_error(
        result, 'holds the classes cat, dog, fox, owl', 'the model knows cat, dog, fox', 'owl is new to it'
    )


def three_classes_with_a_new_one(folder):
    root = folder / 'with-owl'
    if not root.exists():
        make_demo_data(root, n_train=12, n_test=1, seed=3, classes=3, layout='folders')
        shutil.copytree(root / 'train' / 'fox', root / 'train' / 'owl')
    return root / 'train'


def test_separate_validation_data_and_a_class_missing_from_it(tmp_path, three_classes, capsys):
    val_root = tmp_path / 'val'
    shutil.copytree(three_classes / 'train' / 'cat', val_root / 'cat')
    shutil.copytree(three_classes / 'train' / 'dog', val_root / 'dog')
    main.train(**fast_options(tmp_path, three_classes, val_data_root=str(val_root)))
    captured = capsys.readouterr()
    assert '45 training and 30 validation images' in captured.out  # nothing held out of train
    assert captured.err.count('has no images of fox') == 1
    record = json.loads((newest_run(tmp_path / 'checkpoints') / 'metrics.jsonl').read_text())
    assert record['recall'][2] is None and sum(record['confusion'][2]) == 0


def kaggle_names(root, counts):
    root.mkdir(parents=True, exist_ok=True)
    for name, n in counts.items():
        for i in range(n):
            Image.new('RGB', (40, 30), (9 * i, 50, 90)).save(root / f'{name}.{i}.jpg')
    return root


def test_the_kaggle_layout_takes_any_class_word(tmp_path):
    root = kaggle_names(tmp_path / 'train', {'fox': 4, 'owl': 4, 'cat': 4})
    data = DogCat(root, 'train', image_size=32, split=Split(0.5))
    assert data.classes == ['cat', 'fox', 'owl'] and data.layout.startswith('Kaggle layout')
    assert sorted(data.targets) == [0, 0, 1, 1, 2, 2]


def one_kaggle_class(root):
    kaggle_names(root, {'cat': 3})


def files_beside_class_folders(root):
    kaggle_names(root, {'cat': 1, 'dog': 2})
    kaggle_names(root / 'Cat', {'x': 2})
    kaggle_names(root / 'Dog', {'y': 3})


def one_class_folder(root):
    kaggle_names(root / 'only', {'x': 2})


@pytest.mark.slow
@pytest.mark.parametrize(
    'make, fragments',
    [
        (one_kaggle_class, ['holds one class only (cat: 3)', 'two or more']),
        (files_beside_class_folders, ['mixes the two layouts', '(cat: 1, dog: 2)', '(Cat: 2, Dog: 3)']),
        (one_class_folder, ['holds one class only (only: 2)']),
    ],
)
def test_layout_errors_say_what_was_found_per_class(tmp_path, make, fragments):
    make(tmp_path / 'data')
    result = run_main('train', f'--train_data_root={tmp_path / "data"}', '--use_gpu=False', '--vis=False')
    assert_one_line_error(result, *fragments)


def test_one_class_says_where_the_others_may_be(tmp_path):
    kaggle_names(tmp_path / 'unzipped' / 'train', {'cat': 2, 'dog': 2})  # train/train/cat.0.jpg
    with pytest.raises(UserError, match=r'one class only \(train: 4\).*: --train_data_root=.*unzipped/train\?$'):
        DogCat(tmp_path / 'unzipped', 'train')
    for name in ('cat/1.jpg', 'cat/2.jpg', 'dog/1.tif'):  # a format this project does not read
        (tmp_path / 'mixed' / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (40, 30)).save(tmp_path / 'mixed' / name)
    with pytest.raises(UserError, match=r'one class only \(cat: 2\).*; also there: dog, dog/1.tif \(images are \.jpg'):
        DogCat(tmp_path / 'mixed', 'train')


def test_petimages_layout_skips_unreadable_files_and_ignores_the_rest(tmp_path, tiny_data):
    root = tmp_path / 'PetImages'
    for kind, folder in (('cat', 'Cat'), ('dog', 'Dog')):
        (root / folder).mkdir(parents=True)
        for source in sorted((tiny_data / 'train').glob(f'{kind}.*.jpg')):
            shutil.copy(source, root / folder / source.name.split('.', 1)[1])
        (root / folder / '666.jpg').write_bytes(b'')  # the Microsoft release has broken files
        (root / folder / 'Thumbs.db').write_bytes(b'\xd0\xcf')
        (root / folder / '.ipynb_checkpoints').mkdir()  # a hidden folder's copies are no training images
        shutil.copy(source, root / folder / '.ipynb_checkpoints' / 'copy.jpg')
    main.train(**fast_options(tmp_path, tiny_data, train_data_root=str(root), val_ratio=0.5))
    record = json.loads((newest_run(tmp_path / 'checkpoints') / 'metrics.jsonl').read_text())
    assert record['skipped'] == 2 and record['classes'] == ['Cat', 'Dog']
    data = DogCat(root, 'train', image_size=32, split=Split(0.5))
    assert data.ignored == ['Cat/Thumbs.db', 'Dog/Thumbs.db']
    assert not [path for path in DogCat(root, 'train', split=Split(0)).paths if '.ipynb_checkpoints' in path]


def test_augmentation_options_are_stored_and_turn_the_randomness_off(tmp_path, tiny_data):
    main.train(**fast_options(tmp_path, tiny_data, crop_scale=1.0, hflip=False))
    config = load_checkpoint(newest_run(tmp_path / 'checkpoints') / 'last.pth')['config']
    assert (config['crop_scale'], config['hflip']) == (1.0, False)
    train = DogCat(tiny_data / 'train', 'train', 32, transform=train_transform(32, crop_scale=1.0, hflip=False))
    image, _, index = train[0]  # no crop, no mirror: the central square, as evaluation sees it
    assert torch.equal(image, eval_transform(32)(load_pixels(train.paths[index])))
    flipping = DogCat(tiny_data / 'train', 'train', 32, transform=train_transform(32, crop_scale=1.0, hflip=True))
    flips = {bool((flipping[0][0] != image).any()) for _ in range(20)}
    assert flips == {False, True}  # mirrored half the time, else the same square


@pytest.mark.slow
@pytest.mark.parametrize('name', ['mobilenet_v3_small', 'resnet18'])
def test_a_torchvision_model_by_name_trains_saves_loads_and_predicts(tmp_path, tiny_data, name):
    result = run_main('train', *as_flags(fast_options(tmp_path, tiny_data, model=name)))
    assert result.returncode == 0, result.stderr
    best = newest_run(tmp_path / 'checkpoints') / 'best.pth'
    assert load_checkpoint(best)['config']['model'] == name
    predicted = run_main('predict', str(tiny_data / 'test1' / '1.jpg'), f'--load_model_path={best}', '--use_gpu=False')
    assert predicted.returncode == 0, predicted.stderr
    assert f'model={name} image_size=32' in predicted.stdout
    assert predicted.stdout.splitlines()[-1].split()[1] in ('cat', 'dog')


@pytest.mark.slow
def test_an_unknown_model_name_lists_the_closest():
    assert_one_line_error(
        run_main('train', '--model=resnet5O'), "--model='resnet5O' is invalid", 'did you mean resnet50'
    )


def test_pretrained_torchvision_model_gets_a_head_for_n_classes(tmp_path, monkeypatch):
    from torchvision.models import ResNet18_Weights, resnet18

    imagenet = imagenet_weights_in_cache(tmp_path, monkeypatch, resnet18, ResNet18_Weights.DEFAULT, 5)
    model = build_model('resnet18', 5, pretrained=True)
    assert torch.equal(model.net.conv1.weight, imagenet['conv1.weight'])
    assert model.head() is model.net.fc and model.net.fc.out_features == 5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    model.freeze_features()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ['net.fc.weight', 'net.fc.bias']


@pytest.mark.parametrize('name', ['googlenet', 'inception_v3'])
def test_googlenet_and_inception_see_their_imagenet_weights_input_as_torchvisions_do(name):
    from torchvision import models

    imagenet = models.get_model(name, weights=None, init_weights=False).state_dict()  # the weights' keys and shapes
    # torchvision's model as it builds it with its ImageNet weights
    reference = models.get_model(name, weights=None, init_weights=False, transform_input=True)
    reference.load_state_dict(imagenet)
    with warnings.catch_warnings():
        warnings.simplefilter('error', FutureWarning)  # torchvision's about its initialisation: none
        model = build_model(name, 5)
    model.net.load_state_dict({k: v for k, v in imagenet.items() if not k.startswith(('fc.', 'aux', 'AuxLogits'))},
                              strict=False)  # fmt: skip
    model.net.fc = reference.fc = torch.nn.Identity()  # the features the head is trained on
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(model.eval()(images), reference.eval()(images), rtol=1e-4, atol=1e-9)


def test_a_checkpoint_of_cat_and_dog_tests_them_and_refuses_data_of_other_classes(tmp_path, tiny_data):
    old = tmp_path / 'old.pth'
    torch.save(
        {
            'model': SqueezeNet().state_dict(),
            'classes': ['cat', 'dog'],
            'config': {'model': 'SqueezeNet', 'image_size': 32},
        },
        old,
    )
    main.test(**{**fast_options(tmp_path, tiny_data, load_model_path=str(old)), 'model': 'SqueezeNet'})
    assert (tmp_path / 'result.csv').read_text().startswith('id,label\n1,')
    with pytest.raises(UserError, match='holds the classes cat, dog, fox'):
        main.val(
            **fast_options(
                tmp_path,
                tiny_data,
                load_model_path=str(old),
                train_data_root=str(three_classes_with_a_new_one(tmp_path).parent / 'train'),
            )
        )
