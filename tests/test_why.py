"""Why is it wrong: Grad-CAM pictures of where a model looked, k-fold training with out-of-fold
predictions, the folds as one model, and the suspect labels found from the out-of-fold
probabilities. One k-fold of SqueezeNets on demo images with flipped labels serves most tests."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main
from config import DefaultConfig, UserError
from conftest import as_flags, assert_one_line_error, fast_options, newest_run, run_main, torchrun
from data import DogCat, Split
from data.demo import _draw, make_demo_data
from data.transforms import model_input
from models import build_model
from training.checkpoint import load_trained
from training.explain import find_layer, heatmaps, overlay
from training.report import LOOKED
from verbs import kfold

FOLDS = 3


@pytest.fixture(scope='module')
def flipped_demo(tmp_path_factory):
    """200 demo images (stripes: cat, spots: dog), 20 of them drawn as the other class."""
    root = tmp_path_factory.mktemp('flipped')
    make_demo_data(root, n_train=200, n_test=6, seed=0, flip_labels=0.1)
    return root


@pytest.fixture(scope='module')
def trained_folds(flipped_demo, tmp_path_factory):
    """(kfold folder, options): a 3-fold kfold of SqueezeNets at 64 px on flipped_demo."""
    tmp_path = tmp_path_factory.mktemp('kfold')
    # whole images (crop_scale 1), small batches and a rate that stays up for the first
    # epochs: a SqueezeNet from scratch learns the patterns from about 130 images
    options = fast_options(
        tmp_path, flipped_demo, name='flipped', image_size=64, crop_scale=1.0, max_epoch=16, lr_scheduler='cosine'
    )
    kfold.run_kfold(options, FOLDS, train=main.train_with)
    return tmp_path / 'checkpoints' / 'flipped', options


def rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # the shared k-fold fixture trains 3 x 16 epochs
def test_suspect_labels_find_most_flipped_images_near_the_top(trained_folds, flipped_demo):
    parent, options = trained_folds
    # what finding the flipped labels relies on: folds that learned the patterns (90% is the most
    # that 10% flipped labels leave)
    assert json.loads((parent / 'kfold.json').read_text())['oof']['accuracy'] > 0.75
    flipped = set((flipped_demo / 'flipped.txt').read_text().split())
    listed = [Path(row['file']).name for row in rows(parent / 'suspect_labels.csv')]
    found = flipped & set(listed[: 2 * len(flipped)])
    assert len(found) > 0.5 * len(flipped), (len(found), len(flipped), listed)
    suspect = rows(parent / 'suspect_labels.csv')[0]
    assert suspect['label'] != suspect['likely_label'] and float(suspect['p_label']) < 0.5
    # the same command again trains nothing, and with TensorBoard on shows the suspects there
    saved = {file: file.stat().st_mtime_ns for file in parent.glob('fold-*/*.pth')}
    kfold.run_kfold({**options, 'tensorboard': True}, FOLDS, train=main.train_with)
    assert {file: file.stat().st_mtime_ns for file in parent.glob('fold-*/*.pth')} == saved
    board = EventAccumulator(str(parent), size_guidance={'images': 0})
    board.Reload()
    assert 'suspect labels' in board.Tags()['images']


@pytest.mark.slow  # the shared k-fold fixture trains 3 x 16 epochs
def test_every_training_image_is_predicted_once_by_the_model_that_did_not_train_on_it(
    trained_folds, flipped_demo, tmp_path, capsys
):
    parent, options = trained_folds
    oof = rows(parent / 'oof.csv')
    files = [row['file'] for row in oof]
    assert sorted(files) == sorted(DogCat(flipped_demo / 'train', 'train', split=Split(0)).paths)
    for k in range(1, FOLDS + 1):
        trained_on = set(DogCat(flipped_demo / 'train', 'train', split=Split(folds=FOLDS, fold=k)).paths)
        assert not trained_on & {row['file'] for row in oof if row['fold'] == str(k)}
    # fold 2's rows are fold 2's model's own predictions, and val on fold 2 takes its split
    held = [row for row in oof if row['fold'] == '2']
    checkpoints = options['checkpoint_dir']
    out = tmp_path / 'fold-2.csv'
    main.predict(
        *[row['file'] for row in held], out=str(out), load_model_path=str(parent / 'fold-2'), amp=False, use_gpu=False
    )
    assert [float(r['p_dog']) for r in rows(out)] == pytest.approx([float(r['p_dog']) for r in held], abs=1e-4)
    capsys.readouterr()
    main.val(load_model_path=str(parent / 'fold-2'), checkpoint_dir=checkpoints, num_workers=0)
    assert f'{len(held)} validation images' in capsys.readouterr().out


@pytest.mark.slow  # the shared k-fold fixture trains 3 x 16 epochs
def test_runs_lists_a_kfold_as_one_entry_with_its_out_of_fold_figures(trained_folds, capsys):
    parent, options = trained_folds
    oof = json.loads((parent / 'kfold.json').read_text())['oof']
    capsys.readouterr()
    main.runs(checkpoint_dir=options['checkpoint_dir'])
    lines = capsys.readouterr().out.splitlines()  # no config: line, runs trains nothing
    assert lines[0] == (
        f'flipped/  kfold of 3/3 folds, out-of-fold acc {oof["accuracy"]:.2%}  log loss {oof["log_loss"]:.4f}  '
        f'{oof["suspects"]} suspect labels'
    )
    assert [line.split()[0] for line in lines[1:]] == ['fold-1', 'fold-2', 'fold-3']


@pytest.mark.slow  # the shared k-fold fixture trains 3 x 16 epochs
def test_the_folds_as_one_model_average_their_probabilities(trained_folds, flipped_demo, tmp_path):
    parent, options = trained_folds
    test1 = str(flipped_demo / 'test1')
    common = dict(checkpoint_dir=options['checkpoint_dir'], use_gpu=False, num_workers=0)
    for k in range(1, FOLDS + 1):
        main.predict(test1, out=str(tmp_path / f'fold-{k}.csv'), load_model_path=str(parent / f'fold-{k}'), **common)
    main.predict(test1, out=str(tmp_path / 'all.csv'), load_model_path=str(parent), **common)
    main.test(load_model_path=str(parent), result_file=str(tmp_path / 'result.csv'), test_data_root=test1, **common)
    folds = np.array([[float(r['p_dog']) for r in rows(tmp_path / f'fold-{k}.csv')] for k in range(1, FOLDS + 1)])
    mean = folds.mean(axis=0)
    assert [float(r['p_dog']) for r in rows(tmp_path / 'all.csv')] == pytest.approx(mean, abs=2e-4)
    submitted = [float(r['label']) for r in rows(tmp_path / 'result.csv')]
    assert submitted == pytest.approx(np.clip(mean, 0.005, 0.995), abs=2e-4)
    assert not np.allclose(folds[0], folds[1], atol=1e-3)  # three models, not one three times


def composites(count=32):
    """64 px images, stripes on one half and spots on the other (on the left in every other
    one): (images, whether the stripes are on the left)."""
    rng = np.random.default_rng(0)
    pictures, stripes_left = [], []
    for j in range(count):
        stripes, spots = (np.asarray(_draw(label, rng, (64, 65), 0)) for label in (0, 1))
        halves = (stripes[:, :32], spots[:, 32:]) if j % 2 == 0 else (spots[:, :32], stripes[:, 32:])
        pictures.append(torch.from_numpy(np.concatenate(halves, axis=1)).permute(2, 0, 1))
        stripes_left.append(j % 2 == 0)
    return model_input(torch.stack(pictures), torch.device('cpu')), torch.tensor(stripes_left)


@pytest.mark.slow  # the shared k-fold fixture trains 3 x 16 epochs
def test_grad_cam_of_the_predicted_class_falls_on_its_pattern(trained_folds):
    parent, _ = trained_folds
    cfg = DefaultConfig()
    cfg.load_model_path = str(parent / 'fold-1')
    model = load_trained(cfg).model
    rng = np.random.default_rng(1)  # what the test relies on: the model tells the patterns apart
    plain = [torch.from_numpy(np.asarray(_draw(j % 2, rng, (64, 65), 0))[:, :64]).permute(2, 0, 1) for j in range(16)]
    with torch.no_grad():
        told = model(model_input(torch.stack(plain), torch.device('cpu'))).argmax(dim=1)
    assert (told == torch.arange(16) % 2).float().mean() >= 0.9
    images, stripes_left = composites()
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
    assert 0 < predicted.sum() < len(predicted)  # both classes predicted: each pattern is seen
    maps = heatmaps(model, images, predicted)
    left, right = maps[..., :32].sum(dim=(1, 2)), maps[..., 32:].sum(dim=(1, 2))
    own_left = stripes_left == (predicted == 0)  # stripes: cat (0), spots: dog (1)
    on_pattern = torch.where(own_left, left > right, right > left)
    assert on_pattern.float().mean() > 0.75, (on_pattern.sum(), find_layer(model, 64)[0])


def test_the_layer_is_found_in_every_kind_of_model_and_can_be_named():
    for name, size, layer in (
        ('ResNet34', 64, 'net.layer4'),
        ('ResNet34', 32, 'net.layer3'),  # layer4 is 1x1 there
        ('SqueezeNet', 64, 'net.classifier.1'),
        ('AlexNet', 64, 'net.features.10'),
        ('mobilenet_v3_small', 64, 'net.features'),
    ):
        model = build_model(name, 2).eval()
        assert find_layer(model, size)[0] == layer, name
        maps = heatmaps(model, torch.randn(2, 3, size, size), torch.tensor([0, 1]), layer)
        assert maps.shape == (2, size, size) and 0 <= maps.min() and maps.max() <= 1
    with pytest.raises(
        UserError, match=r'--cam_layer=.net.layer5.: ResNet34 has no layer of that name; did you mean .*net.layer4'
    ):
        find_layer(build_model('ResNet34', 2), 64, 'net.layer5')


def test_dashboards_show_where_the_model_looked_and_leave_training_as_it_was(tmp_path, one_picture, monkeypatch):
    from training import report
    from utils.visualize import Visualizer

    sent = {}
    monkeypatch.setattr(Visualizer, '_call', lambda self, *args, **kwargs: None)  # no server needed
    monkeypatch.setattr(Visualizer, 'captioned_images', lambda self, name, items, **kw: sent.setdefault(name, items))
    # bf16 autocast where this CPU has it (--amp=auto): the maps are computed in fp32 all the same
    options = dict(model='ResNet34', max_epoch=2, vis=True, tensorboard=True, amp='auto')
    main.train(**fast_options(tmp_path / 'shown', one_picture, **options))
    (run,) = (tmp_path / 'shown' / 'checkpoints').glob('2*')
    board = EventAccumulator(str(run), size_guidance={'images': 0})
    board.Reload()
    assert len(board.Images(LOOKED)) == 2 and len(board.Images('most wrong (validation)')) == 2
    looked, wrong = sent[LOOKED], sent['most wrong (validation)']
    assert len(looked) == len(wrong) > 0 and all(isinstance(picture, Image.Image) for picture, _ in looked)
    for _, caption in looked:
        true, guess = re.fullmatch(r'\S+ (cat|dog)->(cat|dog) \d\.\d\d', caption).groups()
        assert true != guess
    # the same run without the maps ends with the same weights and statistics
    monkeypatch.setattr(report.Reporter, 'where_it_looked', lambda *args: [])
    main.train(**fast_options(tmp_path / 'plain', one_picture, **options))
    (other,) = (tmp_path / 'plain' / 'checkpoints').glob('2*')
    ours, theirs = (torch.load(r / 'last.pth', weights_only=True)['model'] for r in (run, other))
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['compiled', 'torchrun'])
def test_grad_cam_pictures_after_compile_and_under_torchrun_from_rank_0(tmp_path, one_picture, mode):
    # a layer named as the plain model names it: the compiled and the DDP-wrapped model name it otherwise
    options = fast_options(tmp_path, one_picture, max_epoch=2, tensorboard=True, cam_layer='net.features.7')
    if mode == 'compiled':
        main.train(**options, compile=True)
    else:
        result = torchrun('train', *as_flags(options))
        assert result.returncode == 0, result.stderr[-3000:]
        assert 'warning' not in result.stderr
    run = newest_run(tmp_path / 'checkpoints')
    assert len(list(run.glob('events.out.tfevents.*'))) == 1  # rank 0's alone
    board = EventAccumulator(str(run), size_guidance={'images': 0})
    board.Reload()
    looked, wrong = board.Images(LOOKED), board.Images('most wrong (validation)')
    assert [e.step for e in looked] == [e.step for e in wrong] and len(looked) == 2  # every epoch
    assert all(a.encoded_image_string != b.encoded_image_string for a, b in zip(looked, wrong))  # the maps drawn


@pytest.mark.slow  # the shared k-fold fixture trains 3 x 16 epochs
def test_predict_explain_writes_a_picture_per_image_beside_the_csv(trained_folds, flipped_demo, tmp_path):
    parent, options = trained_folds
    test1 = flipped_demo / 'test1'
    common = dict(checkpoint_dir=options['checkpoint_dir'], use_gpu=False, num_workers=0)
    out = tmp_path / 'mine' / 'predictions.csv'
    main.predict(str(test1), out=str(out), explain=True, load_model_path=str(parent / 'fold-1'), **common)
    pictures = sorted(p.name for p in out.parent.glob('*.png'))
    assert pictures == sorted(f'{p.stem}-cam.png' for p in test1.glob('*.jpg'))
    assert Image.open(out.parent / pictures[0]).size[0] >= 64
    main.predict(str(test1 / '1.jpg'), explain=True, load_model_path=str(parent), **common)  # the folds as one
    assert (parent / 'explained' / '1-cam.png').is_file()
    with pytest.raises(UserError, match='--cam_layer'):
        main.predict(str(test1), explain=True, cam_layer='net.nothing', load_model_path=str(parent), **common)


def test_predict_explain_again_keeps_its_pictures_and_predicts_the_photos_only(tmp_path, tiny_data, capsys):
    options = fast_options(tmp_path, tiny_data, image_size=64)
    main.train(**options)
    photos = tmp_path / 'photos'
    photos.mkdir()
    for n in (1, 2):
        (photos / f'{n}.jpg').write_bytes((tiny_data / 'test1' / f'{n}.jpg').read_bytes())
    out = photos / 'predictions.csv'  # the pictures go beside it, among the photos
    for _ in range(2):
        main.predict(str(photos), out=str(out), explain=True, **options)
        assert [row['path'] for row in rows(out)] == [str(photos / '1.jpg'), str(photos / '2.jpg')]
    assert sorted(p.name for p in photos.glob('*.png')) == ['1-cam-2.png', '1-cam.png', '2-cam-2.png', '2-cam.png']


def test_a_kfold_is_one_model_once_its_last_fold_has_ended(tmp_path, tiny_data, capsys):
    options = fast_options(tmp_path, tiny_data, max_epoch=2, name='k')

    def stop_in_fold_2(run):
        def on_epoch(epoch, metrics, last):
            if run['fold'] == 2:
                raise KeyboardInterrupt  # fold 2 has a best.pth of its first epoch, and more to train

        return main.train_with(run, on_epoch)

    with pytest.raises(KeyboardInterrupt):
        kfold.run_kfold(options, 2, train=stop_in_fold_2)
    parent, common = tmp_path / 'checkpoints' / 'k', dict(checkpoint_dir=options['checkpoint_dir'], num_workers=0)
    with pytest.raises(UserError, match='has a trained model'):
        main.test(**common, result_file=str(tmp_path / 'r.csv'))  # the kfold is latest, and no model yet
    kfold.run_kfold(options, 2, train=main.train_with)
    capsys.readouterr()
    main.val(**common, load_model_path=str(parent), train_data_root=options['train_data_root'])  # other data
    out = capsys.readouterr().out  # the options' share, 0.3 of 40 images, not a fold of one member's
    assert f'using the 2 folds of {parent} as one model' in out and '12 validation images' in out
    with pytest.raises(UserError, match='none left to validate on'):
        main.val(**common, load_model_path=str(parent))  # its own held-out images: the folds trained on them all
    with pytest.raises(UserError, match='is a kfold, a model per fold; start from one'):
        main.train(**{**options, 'name': '', 'load_model_path': 'k'})


def test_a_kfold_continues_only_on_the_images_it_split(tmp_path, tiny_data):
    shutil.copytree(tiny_data / 'train', tmp_path / 'data' / 'train')
    options = fast_options(tmp_path, tmp_path / 'data')

    def stop_in_fold_2(run):
        if run['fold'] == 2:
            raise KeyboardInterrupt
        return main.train_with(run)

    with pytest.raises(KeyboardInterrupt):
        kfold.run_kfold(options, 2, train=stop_in_fold_2)
    (tmp_path / 'data' / 'train' / 'cat.0.jpg').unlink()  # a wrong label removed, say: the folds shift
    kfold.run_kfold(options, 2, train=main.train_with)  # the same command
    first, second = sorted((tmp_path / 'checkpoints').glob('kfold-*'))
    assert not (first / 'oof.csv').exists() and len(rows(second / 'oof.csv')) == 39  # fold 1 not taken on


def test_kfold_resumes_the_fold_it_was_in(tmp_path, tiny_data):
    options = fast_options(tmp_path, tiny_data, max_epoch=2)
    trained = []

    def train(run, stop_at=None):
        trained.append(run)

        def on_epoch(epoch, metrics, last):
            if (run['fold'], epoch) == stop_at:
                raise KeyboardInterrupt

        return main.train_with(run, on_epoch)

    with pytest.raises(KeyboardInterrupt):
        kfold.run_kfold(options, 3, train=lambda run: train(run, stop_at=(2, 0)))
    (parent,) = (tmp_path / 'checkpoints').glob('kfold-*')
    first = (parent / 'fold-1' / 'last.pth').stat().st_mtime_ns
    (parent / 'fold-3').mkdir()  # a fold killed before its first epoch was saved
    (parent / 'fold-3' / 'config.json').write_text('{}')
    trained.clear()
    kfold.run_kfold(options, 3, train=train)  # the same command
    assert [(run['fold'], run.get('resume'), run.get('name')) for run in trained] == [
        (2, str(parent / 'fold-2'), None),
        (3, None, 'fold-3'),
    ]
    assert (parent / 'fold-1' / 'last.pth').stat().st_mtime_ns == first
    epochs = [json.loads(line)['epoch'] for line in (parent / 'fold-2' / 'metrics.jsonl').read_text().splitlines()]
    assert epochs == [1, 2]
    assert len(rows(parent / 'oof.csv')) == 40 and list((tmp_path / 'checkpoints').glob('kfold-*')) == [parent]


def test_demo_data_lists_the_labels_it_flips(tmp_path):
    make_demo_data(tmp_path / 'plain', n_train=20, n_test=0, seed=3)
    make_demo_data(tmp_path / 'flipped', n_train=20, n_test=0, seed=3, flip_labels=0.2)
    flipped = (tmp_path / 'flipped' / 'flipped.txt').read_text().split()
    assert len(set(flipped)) == 4 and all((tmp_path / 'flipped' / 'train' / name).is_file() for name in flipped)
    assert not (tmp_path / 'plain' / 'flipped.txt').exists()
    # the images drawn before the first flipped one are those of the same seed without flips
    order = [f'{("cat", "dog")[i % 2]}.{i // 2}.jpg' for i in range(20)]
    before = order[: min(map(order.index, flipped))]
    assert before and all(
        (tmp_path / 'plain' / 'train' / name).read_bytes() == (tmp_path / 'flipped' / 'train' / name).read_bytes()
        for name in before
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    'case, flags, message',
    [
        ('one class', ['--folds=2'], 'holds one class only'),
        ('too few', ['--folds=21'], 'has 20 images of cat, fewer than --folds=21'),
        ('one fold', ['--folds=1'], '--folds=1 is invalid'),
        ('latest', ['--folds=2', '--name=latest'], 'checkpoints/latest names the newest run; choose another name'),
        ('val_ratio', ['--folds=2', '--val_ratio=0.5'], '--val_ratio: each fold validates on its fold'),
    ],
)
def test_kfold_refuses_what_it_cannot_split_in_one_line(tmp_path, tiny_data, case, flags, message):
    data = tiny_data
    if case == 'one class':
        data = tmp_path / 'cats'
        (data / 'train').mkdir(parents=True)
        for file in (tiny_data / 'train').glob('cat.*.jpg'):
            (data / 'train' / file.name).write_bytes(file.read_bytes())
    options = fast_options(tmp_path, data)
    del options['result_file'], options['test_data_root']
    assert_one_line_error(run_main('kfold', *flags, *as_flags(options)), message)
    assert not (tmp_path / 'checkpoints').exists()  # refused before anything is made


def test_the_photo_shows_through_the_hottest_part_of_the_map():
    stripes = np.tile(np.repeat(np.array([0, 255], dtype=np.uint8), 4), (32, 4))  # 32 x 32, stripes 4 px wide
    blended = overlay(Image.fromarray(stripes).convert('RGB'), torch.ones(8, 8))  # hottest everywhere
    grey = np.asarray(blended.convert('L'), dtype=np.float32)
    assert grey[:, 4:8].mean() - grey[:, 0:4].mean() >= 255 / 2 - 2  # half the stripes' contrast is kept


def test_kfold_scores_each_fold_on_the_images_it_held_out_at_any_seed(tmp_path, tiny_data):
    options = fast_options(tmp_path, tiny_data, name='seeded', seed=1)
    kfold.run_kfold(options, 2, train=main.train_with)
    oof = rows(tmp_path / 'checkpoints' / 'seeded' / 'oof.csv')
    root = tiny_data / 'train'
    assert sorted(row['file'] for row in oof) == sorted(DogCat(root, 'train', split=Split(0)).paths)
    for k in (1, 2):
        held = {row['file'] for row in oof if row['fold'] == str(k)}
        # as the fold's run split them
        trained_on = set(DogCat(root, 'train', 32, split=Split(seed=1, folds=2, fold=k)).paths)
        assert held and not held & trained_on


def independent_cam(model, images, targets, layer):
    """Grad-CAM straight from Captum at the layer named: what the pictures should show."""
    from captum.attr import LayerAttribution, LayerGradCam

    module = dict(model.named_modules())[layer]
    cam = LayerGradCam(model, module).attribute(images, target=targets, relu_attributions=True).detach()
    cam = LayerAttribution.interpolate(cam, tuple(images.shape[-2:]), 'bilinear')[:, 0]
    return cam / cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)


@pytest.mark.parametrize('layer', ['', 'net.layer2'])  # found (net.layer3 at 32 px), or named
def test_the_dashboards_map_is_the_predicted_classs_at_the_layer_asked_for(tiny_data, layer):
    from training.explain import explain_rows
    from utils.runtime import Runtime

    torch.manual_seed(0)
    model, classes = build_model('ResNet34', 2).eval(), ['cat', 'dog']
    data = DogCat(tiny_data / 'train', 'val', 32, classes=classes)
    labels = torch.tensor([data[i][1] for i in range(4)])
    wrong = 1 - labels  # the most-wrong images: every prediction the other class
    metrics = {'probs': torch.nn.functional.one_hot(wrong, 2).float() * 0.8 + 0.1, 'labels': labels,
               'indices': torch.arange(4)}  # fmt: skip
    rt = Runtime(torch.device('cpu'))
    pictures = explain_rows(model, data, metrics, [0, 1, 2, 3], classes, rt, layer)
    images = torch.stack([data[i][0] for i in range(4)])
    x = model_input(images, rt.device, rt.layout)
    named, other_layer = layer or 'net.layer3', 'net.layer3' if layer else 'net.layer2'
    got = [np.asarray(picture) for picture, _ in pictures]

    def shows(maps):
        images_ = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
        return all(np.array_equal(g, np.asarray(overlay(i, m))) for g, i, m in zip(got, images_, maps))

    assert shows(independent_cam(model, x, wrong, named))  # the predicted class's map, at the layer asked for
    assert not shows(independent_cam(model, x, labels, named))  # not the true label's
    assert not shows(independent_cam(model, x, wrong, other_layer))  # nor another layer's
