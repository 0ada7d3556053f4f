"""The verbs called in-process on tiny generated data."""

import csv
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

import main
from config import UserError
from conftest import fast_options, newest_run, scripted_validation
from models import SqueezeNet
from training import engine, recipe
from training.checkpoint import load_weights
from training.report import read_metrics
from utils.files import load_checkpoint
from utils.runtime import Runtime


def test_train_keeps_last_and_best_checkpoints_and_a_metrics_file(tmp_path, tiny_data):
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=2))
    last = load_checkpoint(newest_run(tmp_path / 'checkpoints') / 'last.pth')
    assert set(last) >= {'model', 'optimizer', 'scheduler', 'epoch', 'best_accuracy', 'config'}
    assert last['epoch'] == 1 and last['config']['model'] == 'SqueezeNet'
    assert (newest_run(tmp_path / 'checkpoints') / 'best.pth').exists()
    records = [
        json.loads(line) for line in (newest_run(tmp_path / 'checkpoints') / 'metrics.jsonl').read_text().splitlines()
    ]
    assert [r['epoch'] for r in records] == [1, 2]
    assert all(0 <= r['val_accuracy'] <= 1 and r['skipped'] == 0 for r in records)
    assert last['best_accuracy'] == max(r['val_accuracy'] for r in records)
    assert not list((tmp_path / 'checkpoints').glob('*/.*.tmp'))


def weights(path):
    return load_checkpoint(path)['model']


def test_resume_continues_at_the_next_epoch_and_ends_where_an_unbroken_run_does(tmp_path, tiny_data):
    whole = tmp_path / 'whole'
    main.train(**fast_options(whole, tiny_data, max_epoch=2))

    parts = tmp_path / 'parts'
    main.train(**fast_options(parts, tiny_data, max_epoch=1))
    assert load_checkpoint(newest_run(parts / 'checkpoints') / 'last.pth')['epoch'] == 0
    main.train(
        **fast_options(parts, tiny_data, max_epoch=2, resume=str(newest_run(parts / 'checkpoints') / 'last.pth'))
    )

    resumed = load_checkpoint(newest_run(parts / 'checkpoints') / 'last.pth')
    assert resumed['epoch'] == 1
    epochs = [
        json.loads(line)['epoch']
        for line in (newest_run(parts / 'checkpoints') / 'metrics.jsonl').read_text().splitlines()
    ]
    assert epochs == [1, 2]
    for name, tensor in weights(newest_run(whole / 'checkpoints') / 'last.pth').items():
        assert torch.equal(tensor, resumed['model'][name]), name


def records(folder):
    return [
        json.loads(line) for line in (newest_run(folder / 'checkpoints') / 'metrics.jsonl').read_text().splitlines()
    ]


@pytest.mark.slow
def test_resume_keeps_the_learning_rate_schedule_and_the_best_accuracy(tmp_path, tiny_data, capsys, monkeypatch):
    # the best accuracy comes in epoch 4 and the loss stalls in epoch 5: a break after epoch 4
    # leaves both a best accuracy and a plateau decay for the resumed run to get right
    accuracies, losses = [0.5, 0.6, 0.7, 0.9, 0.8, 0.8, 0.85], [0.9, 0.8, 0.7, 0.6, 0.65, 0.55, 0.58]
    options = dict(max_epoch=7, model='ResNet34')
    # the whole run's 7 epochs, then the same 7 again: 4 before the break, 3 resumed
    scripted_validation(monkeypatch, accuracies * 2, losses * 2)
    whole = tmp_path / 'whole'
    main.train(**fast_options(whole, tiny_data, **options))
    parts = tmp_path / 'parts'
    main.train(**fast_options(parts, tiny_data, **{**options, 'max_epoch': 4}))
    best_before = load_checkpoint(newest_run(parts / 'checkpoints') / 'last.pth')['best_accuracy']
    capsys.readouterr()
    main.train(**fast_options(parts, tiny_data, **options, resume=str(newest_run(parts / 'checkpoints') / 'last.pth')))
    assert f'best accuracy so far {best_before:.2%}' in capsys.readouterr().out

    lrs = [r['lr'] for r in records(whole)]
    assert [r['lr'] for r in records(parts)] == lrs
    assert min(lrs[4:]) < lrs[3], lrs  # the plateau schedule decayed after the break
    assert best_before > max(r['val_accuracy'] for r in records(parts)[4:])  # the best came before it
    resumed = load_checkpoint(newest_run(parts / 'checkpoints') / 'last.pth')
    assert (
        resumed['best_accuracy']
        == max(r['val_accuracy'] for r in records(parts))
        == load_checkpoint(newest_run(whole / 'checkpoints') / 'last.pth')['best_accuracy']
    )
    assert resumed['scheduler'] == load_checkpoint(newest_run(whole / 'checkpoints') / 'last.pth')['scheduler']
    for name, tensor in weights(newest_run(whole / 'checkpoints') / 'last.pth').items():
        assert torch.equal(tensor, resumed['model'][name]), name


def test_resume_refuses_options_that_would_make_another_run(tmp_path, tiny_data):
    main.train(**fast_options(tmp_path, tiny_data))
    last = str(newest_run(tmp_path / 'checkpoints') / 'last.pth')
    with pytest.raises(UserError, match=r'--lr=0.5 conflicts with .*last.pth, which was made with lr=0.001'):
        main.train(**fast_options(tmp_path, tiny_data, max_epoch=2, resume=last, lr=0.5))


def test_a_run_holds_out_the_same_images_when_resumed_or_validated_or_says_it_cannot(tmp_path, tiny_data, capsys):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    main.train(**fast_options(tmp_path, data, name='run'))
    moved = tmp_path / 'moved'
    shutil.copytree(data, moved)  # the same images elsewhere: the same share held out
    main.train(**fast_options(tmp_path, moved, max_epoch=2, resume='run'))
    main.val(**fast_options(tmp_path, moved, load_model_path='run'))
    assert 'warning' not in capsys.readouterr().err
    shutil.copy(moved / 'train' / 'cat.0.jpg', moved / 'train' / 'cat.99.jpg')  # the cats' share drawn anew
    with pytest.raises(UserError, match=r'last\.pth validated on other images than its training folder gives now'):
        main.train(**fast_options(tmp_path, moved, max_epoch=3, resume='run'))
    main.val(**fast_options(tmp_path, moved, load_model_path='run'))
    assert 'these are not the images' in capsys.readouterr().err


def test_resume_from_weights_only_says_to_use_load_model_path(tmp_path, tiny_data):
    path = SqueezeNet().save(tmp_path / 'weights.pth')
    with pytest.raises(UserError, match='--load_model_path'):
        main.train(**fast_options(tmp_path, tiny_data, resume=str(path)))


def test_a_run_started_from_weights_resumes_without_them(tmp_path, tiny_data):
    path = SqueezeNet().save(tmp_path / 'weights.pth')
    main.train(**fast_options(tmp_path, tiny_data, load_model_path=str(path)))
    path.unlink()  # the resumed run's weights come from its last.pth: the file it started from may go
    main.train(**fast_options(tmp_path, tiny_data, load_model_path=str(path), max_epoch=2, resume='latest'))
    assert [r['epoch'] for r in read_metrics(newest_run(tmp_path / 'checkpoints'))] == [1, 2]


def test_unreadable_images_are_skipped_and_counted(tmp_path, tiny_data, capsys):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data / 'train', data / 'train')
    for name in ('cat.0.jpg', 'dog.0.jpg', 'cat.1.jpg', 'dog.1.jpg'):
        (data / 'train' / name).write_bytes(b'\xff\xd8 truncated')
    # batch_size=1: each broken file makes a batch with nothing left in it
    main.train(**fast_options(tmp_path, data, batch_size=1, max_epoch=1))
    record = json.loads((newest_run(tmp_path / 'checkpoints') / 'metrics.jsonl').read_text())
    assert record['skipped'] == 4
    assert {p.rsplit('/', 1)[1] for p in record['skipped_files']} == {
        'cat.0.jpg',
        'dog.0.jpg',
        'cat.1.jpg',
        'dog.1.jpg',
    }
    assert 'skipped 4 unreadable' in capsys.readouterr().out


def checkpoint_that_always_says(tmp_path, p_dog_logit):
    """A SqueezeNet checkpoint whose answer is fixed: logits (0, p_dog_logit) for every image."""
    model = SqueezeNet()
    head = model.net.classifier[1]  # 1x1 conv, followed by ReLU and pooling
    torch.nn.init.zeros_(head.weight)
    head.bias.data = torch.tensor([max(0.0, -p_dog_logit), max(0.0, p_dog_logit)])
    path = tmp_path / 'fixed.pth'
    torch.save(
        {'model': model.state_dict(), 'classes': ['cat', 'dog'], 'config': {'model': 'SqueezeNet', 'image_size': 32}},
        path,
    )
    return path


@pytest.mark.parametrize('logit, expected', [(1.0, 0.7311), (10.0, 0.995), (-10.0, 0.005)])
def test_submission_holds_p_dog_clipped_sorted_by_numeric_id(tmp_path, tiny_data, logit, expected):
    test1 = tmp_path / 'test1'  # ids that sort otherwise as text: 1, 10, 100, 2, 20, 3, 9
    test1.mkdir()
    for kaggle_id, source in zip((100, 2, 10, 1, 20, 9, 3), sorted((tiny_data / 'test1').iterdir())):
        shutil.copy(source, test1 / f'{kaggle_id}.jpg')
    options = fast_options(
        tmp_path,
        tiny_data,
        test_data_root=str(test1),
        load_model_path=str(checkpoint_that_always_says(tmp_path, logit)),
    )
    del options['model'], options['image_size']  # taken from the checkpoint
    main.test(**options)
    with open(tmp_path / 'result.csv', newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['id', 'label']
    assert [r[0] for r in rows[1:]] == ['1', '2', '3', '9', '10', '20', '100']
    assert all(float(r[1]) == pytest.approx(expected, abs=1e-4) for r in rows[1:])


@pytest.mark.parametrize('logit, printed', [(-1.0, 'cat  0.7311'), (1.0, 'dog  0.7311'), (-0.0, 'dog  0.5000')])
def test_predict_prints_the_probability_of_the_class_it_prints(tmp_path, tiny_data, capsys, logit, printed):
    # P(dog) = sigmoid(logit) for every image: a cat is printed with P(cat), a dog with P(dog)
    options = fast_options(tmp_path, tiny_data, load_model_path=str(checkpoint_that_always_says(tmp_path, logit)))
    del options['model'], options['image_size']
    main.predict(str(tiny_data / 'test1'), out=str(tmp_path / 'p.csv'), **options)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(tiny_data))]
    assert len(lines) == 8 and all(line.endswith(f'.jpg  {printed}') for line in lines)
    with open(tmp_path / 'p.csv', newline='') as f:
        p_dog = f'{1 / (1 + math.exp(-logit)):.4f}'
        assert [row[1:] for row in list(csv.reader(f))[1:]] == [[printed.split()[0], p_dog]] * 8  # P(dog) as before


def test_val_reports_loss_accuracy_confusion_and_log_loss(tmp_path, tiny_data, capsys):
    main.train(**fast_options(tmp_path, tiny_data))
    capsys.readouterr()
    options = fast_options(tmp_path, tiny_data)
    del options['model']
    main.val(**options)
    out = capsys.readouterr().out
    assert '12 validation images: loss' in out and 'accuracy' in out and 'Kaggle log loss' in out
    assert 'true cat' in out and 'true dog' in out


@pytest.mark.parametrize('logit', [1.0, -2.0, 10.0])
def test_val_figures_are_those_of_a_model_whose_answers_are_known(tmp_path, tiny_data, capsys, logit):
    # the 12 validation images are 6 cats and 6 dogs; the model says P(dog) = sigmoid(logit) to each
    options = fast_options(tmp_path, tiny_data, load_model_path=str(checkpoint_that_always_says(tmp_path, logit)))
    del options['model'], options['image_size']
    main.val(**options)
    out = capsys.readouterr().out
    p_dog = 1 / (1 + math.exp(-logit))
    loss = -(math.log(p_dog) + math.log(1 - p_dog)) / 2  # half dogs, half cats
    clipped = min(max(p_dog, 0.005), 0.995)  # Kaggle's log loss is taken on clipped probabilities
    log_loss = -(math.log(clipped) + math.log(1 - clipped)) / 2
    assert f'12 validation images: loss {loss:.4f}  accuracy 50.00%  Kaggle log loss {log_loss:.4f}' in out
    says_dog = logit > 0  # rows: the true class; columns: the predicted one
    cat_row, dog_row = ((0, 6), (0, 6)) if says_dog else ((6, 0), (6, 0))
    assert re.search(rf'true cat +{cat_row[0]} +{cat_row[1]}\n +true dog +{dog_row[0]} +{dog_row[1]}\n', out), out


def test_evaluate_counts_every_validation_image_once(tmp_path, tiny_data):
    options = fast_options(tmp_path, tiny_data)
    from config import DefaultConfig
    from data import DogCat, Split

    cfg = DefaultConfig().parse(options)
    data = DogCat(tiny_data / 'train', 'val', 32, split=Split(cfg.val_ratio, cfg.seed))
    model = SqueezeNet().eval()
    rt = Runtime(torch.device('cpu'))
    metrics = engine.score(engine.infer(model, engine.make_loader(data, cfg, rt), rt))
    assert sum(map(sum, metrics['confusion'])) == len(data) == 12
    assert sorted(metrics['indices'].tolist()) == list(range(12))
    assert metrics['accuracy'] == pytest.approx((metrics['confusion'][0][0] + metrics['confusion'][1][1]) / 12)


@pytest.mark.parametrize('flags', [{'amp': True}, {'channels_last': True}, {'amp': True, 'channels_last': True}])
def test_mixed_precision_and_channels_last_train_on_the_cpu(tmp_path, tiny_data, flags):
    main.train(**fast_options(tmp_path, tiny_data, model='ResNet34', **flags))
    state = load_checkpoint(newest_run(tmp_path / 'checkpoints') / 'last.pth')
    assert all(torch.isfinite(t).all() for t in state['model'].values() if t.is_floating_point())
    assert state['model']['net.fc.weight'].dtype == torch.float32  # autocast leaves weights in fp32


@pytest.mark.parametrize('ampere, dtype, scaled', [(True, torch.bfloat16, False), (False, torch.float16, True)])
def test_amp_is_bf16_where_the_gpu_has_it_and_scaled_fp16_before(monkeypatch, ampere, dtype, scaled):
    from utils import runtime

    asked = []
    monkeypatch.setattr(
        torch.cuda,
        'is_bf16_supported',
        lambda including_emulation=True: asked.append(including_emulation) or (ampere or including_emulation),
    )  # pre-Ampere GPUs only emulate bf16
    assert runtime.amp_dtype(torch.device('cuda')) == dtype and asked == [False]
    monkeypatch.setattr(runtime, 'amp_dtype', lambda device: dtype)  # the CPU standing in for the GPU
    assert as_amp(torch.device('cpu'), True).grad_scaler().is_enabled() == scaled
    assert not as_amp(torch.device('cpu'), False).grad_scaler().is_enabled()


@pytest.mark.parametrize('instructions', [(), ('_is_avx512_bf16_supported',), ('_is_amx_tile_supported',)])
def test_amp_on_a_cpu_is_bf16_only_with_bf16_instructions(monkeypatch, capsys, instructions):
    from utils import runtime

    for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'):
        monkeypatch.setattr(torch.cpu, name, lambda has=name in instructions: has, raising=False)
    runtime._warn_once.cache_clear()
    cpu = torch.device('cpu')
    for _ in range(2):
        with as_amp(cpu, True).autocast():
            assert torch.is_autocast_enabled('cpu') == bool(instructions)
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if instructions else torch.float32)
    warnings = capsys.readouterr().err.count('this CPU has no bf16 instructions')
    assert warnings == (0 if instructions else 1)  # said once, not at every step
    assert not as_amp(cpu, True).grad_scaler().is_enabled()
    with as_amp(cpu, False).autocast():
        assert not torch.is_autocast_enabled('cpu')


def as_amp(device, amp):
    """The Runtime that --amp=amp makes on `device`."""
    from utils import runtime

    return runtime.Runtime(device, dtype=runtime.compute_dtype(device, amp))


def cpu_flags():
    """The CPU's feature flags as Linux lists them ('' elsewhere)."""
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
        return []


def test_bf16_detection_agrees_with_the_cpu_and_autocast_computes_in_bf16_where_it_has_it():
    from utils import runtime

    has_bf16 = bool({'avx512_bf16', 'amx_bf16', 'amx_tile'} & set(cpu_flags()))
    assert runtime.cpu_has_bf16() == has_bf16
    model = torch.nn.Linear(4, 4)
    with as_amp(torch.device('cpu'), True).autocast():
        out = model(torch.ones(2, 4))
    assert out.dtype == (torch.bfloat16 if has_bf16 else torch.float32)


def test_bf16_detection_fails_loudly_when_torch_moves_its_api(monkeypatch):
    from utils import runtime

    monkeypatch.delattr(torch.cpu, '_is_amx_tile_supported')
    with pytest.raises(AttributeError, match='_is_amx_tile_supported'):
        runtime.cpu_has_bf16()


def test_a_run_resumes_with_loss_scaling_turned_on_or_off(tmp_path, tiny_data, monkeypatch, capsys):
    """A checkpoint of a run without a gradient scaler (CPU, bf16 or no --amp) resumes on a GPU
    that needs one (fp16), and back: the fp16 path, GradScaler included, runs here on the CPU."""
    from utils import runtime

    main.train(**fast_options(tmp_path, tiny_data, max_epoch=1))
    last = newest_run(tmp_path / 'checkpoints') / 'last.pth'
    assert load_checkpoint(last)['scaler'] == {}
    monkeypatch.setattr(runtime, 'amp_dtype', lambda device: torch.float16)
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=2, amp=True, resume=str(last)))
    state = load_checkpoint(last)
    assert state['epoch'] == 1 and state['scaler']['scale'] > 0  # the fp16 run kept a loss scale
    assert all(torch.isfinite(t).all() for t in state['model'].values() if t.is_floating_point())
    monkeypatch.undo()
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=3, amp=False, resume=str(last)))
    assert load_checkpoint(last)['epoch'] == 2 and 'resuming' in capsys.readouterr().out


def test_model_input_normalises_a_uint8_batch_like_torchvision():
    from torchvision.transforms import Normalize

    from data.transforms import MEAN, STD, model_input

    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = Normalize(MEAN, STD)(batch.float() / 255)
    plain = model_input(batch, torch.device('cpu'))
    nhwc = model_input(batch, torch.device('cpu'), torch.channels_last)
    assert torch.allclose(plain, expected, atol=1e-5) and torch.allclose(nhwc, expected, atol=1e-5)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)


def test_center_square_is_resize_then_center_crop_in_one_step():
    from PIL import Image
    from torchvision import transforms as classic

    from data.transforms import CenterSquare

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)).resize(
        (400, 240), Image.BILINEAR
    )  # smooth, so both resamplers agree closely
    ours = CenterSquare(64)(torch.from_numpy(np.asarray(image)).permute(2, 0, 1)).float()
    theirs = (
        torch.from_numpy(np.array(classic.Compose([classic.Resize(64), classic.CenterCrop(64)])(image)))
        .permute(2, 0, 1)
        .float()
    )
    assert ours.shape == theirs.shape == (3, 64, 64)
    assert (ours - theirs).abs().mean() < 4


def test_compiled_training_saves_a_plain_checkpoint(tmp_path, tiny_data):
    from torch._dynamo.utils import counters

    counters.clear()
    main.train(**fast_options(tmp_path, tiny_data, compile=True))
    assert counters['stats']['unique_graphs'] > 0  # dynamo captured the model: it was compiled
    state = load_checkpoint(newest_run(tmp_path / 'checkpoints') / 'last.pth')
    assert not any('_orig_mod' in key for key in state['model'])
    load_weights(SqueezeNet(), newest_run(tmp_path / 'checkpoints') / 'last.pth')


class Niceness:
    """A 'transform' that reports the priority of the process it runs in."""

    def __call__(self, image):
        return torch.tensor(os.nice(0))


@pytest.mark.skipif(not hasattr(os, 'nice'), reason='no process priorities on this system')
@pytest.mark.parametrize('device, nice_workers, raised', [('cpu', True, 19), ('cpu', False, 0), ('meta', True, 0)])
def test_loader_workers_yield_the_cores_to_training_on_the_cpu_only(tmp_path, tiny_data, device, nice_workers, raised):
    from config import DefaultConfig
    from data import ImageFiles

    cfg = DefaultConfig().parse(fast_options(tmp_path, tiny_data, num_workers=2, nice_workers=nice_workers))
    images = sorted((tiny_data / 'train').glob('*.jpg'))[:4]
    loader = engine.make_loader(ImageFiles(images, [0] * 4, Niceness()), cfg, Runtime(torch.device(device)))
    ours = os.nice(0)
    workers = torch.cat([batch.images for batch in loader]).tolist()
    assert workers == [min(19, ours + raised)] * 4
    assert os.nice(0) == ours  # the training process keeps its priority


class OpenFiles(torch.nn.Module):
    """A 'model' that notes how many files the process has open each time it runs."""

    def __init__(self):
        super().__init__()
        self.counts = []

    def forward(self, images):
        self.counts.append(len(os.listdir('/proc/self/fd')))
        return torch.zeros(len(images), 2)


@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='no /proc to count open files on this system')
def test_evaluation_holds_no_file_per_batch_from_the_workers(tmp_path, tiny_data):
    from config import DefaultConfig
    from data import ImageFiles
    from data.transforms import CenterSquare

    cfg = DefaultConfig().parse(fast_options(tmp_path, tiny_data, num_workers=2, batch_size=1))
    images = sorted(map(str, (tiny_data / 'train').glob('*.jpg')))
    rt = Runtime(torch.device('cpu'))
    loader = engine.make_loader(ImageFiles(images, list(range(40)), CenterSquare(16)), cfg, rt)
    model = OpenFiles()
    log_probs, targets, indices, skipped = engine.infer(model, loader, rt)
    assert len(model.counts) == 20 and sorted(indices.tolist()) == list(range(40)) and not skipped
    # kept as they came, the batches' tensors held 2 more files open with every batch: +34 by the last
    assert max(model.counts) - min(model.counts) <= 10  # the batches in flight


def test_amp_auto_is_bf16_exactly_where_the_cpu_computes_it_and_never_fp16(monkeypatch):
    from utils import runtime

    cpu = torch.device('cpu')
    native = bool({'avx512_bf16', 'amx_bf16', 'amx_tile'} & set(cpu_flags()))
    assert runtime.compute_dtype(cpu, 'auto') == (torch.bfloat16 if native else None)
    assert as_amp(cpu, 'auto').precision == ('bf16 mixed precision' if native else 'fp32')
    assert runtime.compute_dtype(cpu, 'False') is None and not as_amp(cpu, 'auto').grad_scaler().is_enabled()
    for ampere in (True, False):  # a GPU that only emulates bf16 computes auto in fp32, not fp16
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True, a=ampere: a)
        assert runtime.compute_dtype(torch.device('cuda'), 'auto') == (torch.bfloat16 if ampere else None)


def test_the_default_run_says_how_it_computes_and_resumes_across_precisions(tmp_path, tiny_data, capsys):
    main.train(**fast_options(tmp_path, tiny_data, amp=False))
    assert 'computing in fp32' in capsys.readouterr().out
    options = fast_options(tmp_path, tiny_data, max_epoch=2, resume='latest')
    del options['amp']  # the default: auto
    main.train(**options)
    out = capsys.readouterr().out
    native = bool({'avx512_bf16', 'amx_bf16', 'amx_tile'} & set(cpu_flags()))
    assert ('computing in bf16 mixed precision (--amp=auto)' if native else 'computing in fp32') in out
    assert 'resuming' in out
    assert load_checkpoint(newest_run(tmp_path / 'checkpoints') / 'last.pth')['config']['amp'] == 'auto'


def test_the_confusion_table_of_ten_classes_fits_a_terminal():
    from training.report import confusion_table

    classes = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']
    matrix = [[1000 * (i == j) + j for j in range(10)] for i in range(10)]
    lines = confusion_table(matrix, classes).splitlines()
    assert len(lines) == 11 and max(map(len, lines)) <= 100
    header, seven = lines[0], lines[8]
    assert seven.startswith('  true seven') and seven.split()[2:] == [str(j + 1000 * (j == 7)) for j in range(10)]
    for j, name in enumerate(classes):  # each count right under its class
        assert header.index(name) + len(name) == seven.index(seven.split()[2 + j]) + len(seven.split()[2 + j])


def test_val_on_the_named_training_folder_holds_out_the_runs_own_share(tmp_path, tiny_data, capsys):
    main.train(**fast_options(tmp_path, tiny_data, val_ratio=0.5, seed=3))
    options = fast_options(tmp_path, tiny_data)
    del options['model']
    main.val(**options)  # the data named, as after moving it: not the default share of 0.3 at seed 0
    named = capsys.readouterr().out
    main.val(**{k: v for k, v in options.items() if 'data_root' not in k})
    assert '20 validation images' in named and named.splitlines()[-5:] == capsys.readouterr().out.splitlines()[-5:]


@pytest.mark.parametrize('named', ['first', 'latest', 'folder'])
def test_a_run_starts_from_the_best_weights_of_a_run_named_as_val_names_it(tmp_path, tiny_data, named):
    main.train(**fast_options(tmp_path, tiny_data, name='first'))
    best = tmp_path / 'checkpoints' / 'first' / 'best.pth'
    value = str(best.parent) if named == 'folder' else named
    cfg = main.options(fast_options(tmp_path, tiny_data, load_model_path=value))
    _, model = recipe.model_of(cfg, ['cat', 'dog'], Runtime(torch.device('cpu')))
    kept = load_checkpoint(best)['model']
    assert all(torch.equal(tensor, kept[key]) for key, tensor in model.state_dict().items())


def test_a_run_of_other_classes_gives_a_new_run_its_features_and_a_new_head(tmp_path, tiny_data, capsys):
    main.train(**fast_options(tmp_path, tiny_data, name='first'))
    kept = load_checkpoint(tmp_path / 'checkpoints' / 'first' / 'best.pth')['model']
    cfg = main.options(fast_options(tmp_path, tiny_data, load_model_path='first'))
    for classes in (['cat', 'dog', 'fox'], ['fox', 'wolf']):  # another number of classes, or other names
        _, model = recipe.model_of(cfg, classes, Runtime(torch.device('cpu')))
        state, head = model.state_dict(), ('net.classifier.1.weight', 'net.classifier.1.bias')
        assert all(torch.equal(tensor, kept[key]) for key, tensor in state.items() if key not in head)
        assert state[head[0]].shape[0] == len(classes) and not torch.equal(
            state[head[1]], kept[head[1]][: len(classes)]
        )
    assert capsys.readouterr().out.count('(cat, dog), a new head for ') == 2


def test_a_resume_keeps_the_command_that_made_the_run(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['main.py', 'train', '--max_epoch=1'])
    main.train(**fast_options(tmp_path, tiny_data))
    monkeypatch.setattr(sys, 'argv', ['main.py', 'train', '--resume=latest', '--max_epoch=2'])
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=2, resume='latest'))
    made = json.loads((newest_run(tmp_path / 'checkpoints') / 'config.json').read_text())
    assert made['command'][1:] == ['main.py', 'train', '--max_epoch=1'] and len(made['resumed']) == 1
