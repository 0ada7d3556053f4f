"""Using what you trained (predict) and starting from ImageNet weights (no network needed)."""

import csv
import shutil
import urllib.error

import pytest
import torch
from torchvision.models import SqueezeNet1_1_Weights, squeezenet1_1

import main
from config import UserError
from conftest import as_flags, fast_options, imagenet_weights_in_cache, newest_run, run_main
from models import SqueezeNet, build_model
from training.checkpoint import load_weights


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_data):
    """A checkpoint trained for one epoch on the tiny data, with its config."""
    folder = tmp_path_factory.mktemp('trained')
    main.train(**fast_options(folder, tiny_data))
    return newest_run(folder / 'checkpoints') / 'best.pth'


@pytest.mark.slow
def test_predict_prints_a_line_per_image_and_writes_csv(tmp_path, tiny_data, trained):
    photos = tmp_path / 'photos'
    shutil.copytree(tiny_data / 'test1', photos / 'album')
    (photos / 'album' / 'broken.jpg').write_bytes(b'oops')
    (photos / 'album' / 'notes.txt').write_text('not an image')
    single = tiny_data / 'train' / 'cat.0.jpg'
    result = run_main(
        'predict',
        str(photos),
        str(single),
        str(photos / 'album' / '1.jpg'),  # named again: predicted once
        f'--load_model_path={trained}',
        f'--out={tmp_path}/mine.csv',
        '--use_gpu=False',
        '--num_workers=0',
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(('/', str(tmp_path)))]
    assert len(lines) == 9  # 8 album photos and the single file; broken.jpg is reported, not printed
    for line in lines:
        path, label, p_dog = line.split()
        assert label == ('dog' if float(p_dog) >= 0.5 else 'cat')
    assert 'could not read 1 files' in result.stderr and 'broken.jpg' in result.stderr
    with open(tmp_path / 'mine.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['path'] for r in rows] == [line.split()[0] for line in lines]
    assert all(0 <= float(r['p_dog']) <= 1 for r in rows)


@pytest.mark.slow
def test_predict_takes_model_and_size_from_the_checkpoint(tmp_path, tiny_data, trained):
    # trained as SqueezeNet at 32 px; the defaults (ResNet34, 224) must not apply
    result = run_main('predict', str(tiny_data / 'test1' / '1.jpg'), f'--load_model_path={trained}', '--use_gpu=False')
    assert result.returncode == 0, result.stderr
    assert 'model=SqueezeNet image_size=32' in result.stdout
    clash = run_main('predict', str(tiny_data / 'test1' / '1.jpg'), f'--load_model_path={trained}', '--model=AlexNet')
    assert clash.returncode == 2 and "--model='AlexNet' conflicts with" in clash.stderr


@pytest.mark.slow
def test_predict_errors_are_one_line(tmp_path, trained):
    missing = run_main('predict', str(tmp_path / 'nope.jpg'), f'--load_model_path={trained}')
    assert missing.returncode == 2 and missing.stderr.strip() == f'error: {tmp_path}/nope.jpg does not exist'
    empty = run_main('predict', f'--load_model_path={trained}')
    assert empty.returncode == 2 and 'predict needs images or folders' in empty.stderr


def imagenet_squeezenet_in_cache(torch_home, monkeypatch):
    """A 1000-class SqueezeNet state dict where torchvision's cache keeps it."""
    return imagenet_weights_in_cache(torch_home, monkeypatch, squeezenet1_1, SqueezeNet1_1_Weights.IMAGENET1K_V1, 123)


def test_pretrained_backbone_equals_the_cached_imagenet_weights(tmp_path, monkeypatch):
    state = imagenet_squeezenet_in_cache(tmp_path / 'torch-home', monkeypatch)
    model = build_model('SqueezeNet', pretrained=True)
    mine = model.net.state_dict()
    for name, tensor in state.items():
        if name.startswith('features.'):
            assert torch.equal(mine[name], tensor), name
    assert model.head().out_channels == 2
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_pretrained_path_loads_a_file_and_refuses_other_architectures(tmp_path):
    torch.manual_seed(7)
    state = squeezenet1_1(num_classes=1000).state_dict()
    torch.save(state, tmp_path / 'imagenet.pth')
    model = build_model('SqueezeNet', pretrained_path=tmp_path / 'imagenet.pth')
    assert torch.equal(model.net.features[0].weight, state['features.0.weight'])
    with pytest.raises(UserError, match='does not hold ImageNet weights of AlexNet'):
        build_model('AlexNet', pretrained_path=tmp_path / 'imagenet.pth')


def test_missing_weights_offline_say_which_file_goes_where(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty-home'))

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(UserError) as error:
        build_model('SqueezeNet', pretrained=True)
    message = str(error.value)
    assert f'{tmp_path / "empty-home" / "hub" / "checkpoints"}' in message
    assert 'squeezenet1_1-b8a52dc0.pth' in message and '--pretrained_path' in message


def test_frozen_features_stay_fixed_while_the_head_learns(tmp_path, tiny_data, monkeypatch):
    imagenet_squeezenet_in_cache(tmp_path / 'torch-home', monkeypatch)
    main.train(**fast_options(tmp_path, tiny_data, pretrained=True, freeze_features=True))
    trained = load_weights(SqueezeNet(), newest_run(tmp_path / 'checkpoints') / 'last.pth')
    torch.manual_seed(0)  # as train() does with --seed=0 before it builds the model
    start = build_model('SqueezeNet', pretrained=True)
    for name, tensor in trained.state_dict().items():
        if name.startswith('net.features.'):
            assert torch.equal(tensor, start.state_dict()[name]), name
    assert not torch.equal(trained.head().weight, start.head().weight)
    optimizer = torch.load(newest_run(tmp_path / 'checkpoints') / 'last.pth', weights_only=True)['optimizer']
    assert len(optimizer['param_groups'][0]['params']) == 2  # the head's weight and bias only


def test_frozen_batchnorm_keeps_its_statistics():
    from models import ResNet34

    model = ResNet34().freeze_features().train()
    before = model.net.bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(model.net.bn1.running_mean, before)
    assert model.net.fc.training and not model.net.bn1.training


@pytest.mark.slow
def test_train_with_pretrained_through_the_command_line(tmp_path, tiny_data, monkeypatch):
    cached = imagenet_squeezenet_in_cache(tmp_path / 'torch-home', monkeypatch)  # TORCH_HOME reaches the child
    result = run_main('train', *as_flags(fast_options(tmp_path, tiny_data, pretrained=True)))
    assert result.returncode == 0, result.stderr
    # four Adam steps of lr 0.001 move a weight by a few thousandths: the features trained from
    # the cached ImageNet weights, not from a fresh initialisation, which is far from them
    trained = load_weights(SqueezeNet(), newest_run(tmp_path / 'checkpoints') / 'last.pth').net.state_dict()
    torch.manual_seed(0)
    fresh = squeezenet1_1(num_classes=1000).state_dict()
    features = [name for name in cached if name.startswith('features.') and name.endswith('weight')]
    assert features
    for name in features:
        assert (trained[name] - cached[name]).abs().max() < 0.02, name
        assert (fresh[name] - cached[name]).abs().max() > 0.1, name
