"""What the README promises a new user, tried as one would: test-time mirror images only for a
run that trained on them, a resume after Ctrl-C mid-epoch that is exact and keeps its plan,
SqueezeNet learning at the defaults (and a warning where a run does not), submission ids that
cannot collide, the dashboards' addresses, a short config line, and runs told apart."""

import json
import math

import pytest
import torch

import main
from conftest import as_flags, assert_one_line_error, fast_options, newest_run, run_main
from models import build_model
from training import report
from training.checkpoint import load_weights
from utils.files import load_checkpoint


def records(folder):
    lines = (newest_run(folder / 'checkpoints') / 'metrics.jsonl').read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_tta_mirrors_only_for_a_run_trained_on_mirror_images(tmp_path, tiny_data):
    def val(folder, *more):
        options = fast_options(folder, tiny_data)
        del options['model'], options['image_size']
        result = run_main('val', *as_flags(options), *more)
        assert result.returncode == 0, result.stderr
        return result.stdout

    main.train(**fast_options(tmp_path / 'plain', tiny_data, hflip=False))
    plain, mirrored = val(tmp_path / 'plain'), val(tmp_path / 'plain', '--tta=True')
    assert 'was trained without mirror images (--hflip=False), so none are added' in mirrored
    figures = [line for line in plain.splitlines() if 'validation images' in line]
    assert figures and figures == [line for line in mirrored.splitlines() if 'validation images' in line]

    main.train(**fast_options(tmp_path / 'flipped', tiny_data))  # hflip: the default
    plain, mirrored = val(tmp_path / 'flipped'), val(tmp_path / 'flipped', '--tta=True')
    assert 'trained without mirror images' not in mirrored
    loss = [line for line in plain.splitlines() if 'validation images' in line]
    assert loss != [line for line in mirrored.splitlines() if 'validation images' in line]
    # ...and test and predict pass it on too
    options = fast_options(tmp_path / 'flipped', tiny_data)
    del options['model'], options['image_size'], options['result_file']
    for tta in ('False', 'True'):
        assert run_main('test', *as_flags(options), f'--tta={tta}').returncode == 0
        out = tmp_path / f'predict-{tta}.csv'
        assert (
            run_main('predict', str(tiny_data / 'test1'), *as_flags(options), f'--tta={tta}', f'--out={out}').returncode
            == 0
        )
    run = newest_run(tmp_path / 'flipped' / 'checkpoints')
    assert (run / 'result.csv').read_text() != (run / 'result-2.csv').read_text()
    assert (tmp_path / 'predict-False.csv').read_text() != (tmp_path / 'predict-True.csv').read_text()


@pytest.mark.parametrize('workers', [0, pytest.param(2, marks=pytest.mark.slow)])  # 2: workers seeded by epoch
def test_a_run_stopped_mid_epoch_resumes_to_the_weights_of_one_that_never_stopped(
    tmp_path, tiny_data, monkeypatch, workers
):
    whole, parts = tmp_path / 'whole', tmp_path / 'parts'
    main.train(**fast_options(whole, tiny_data, max_epoch=3, num_workers=workers))

    real = report.Reporter.train_loss

    def ctrl_c_mid_epoch_2(self, value, epoch, step):  # 4 batches an epoch: half-way into epoch 2
        if (epoch, step) == (1, 2):
            raise KeyboardInterrupt
        real(self, value, epoch, step)

    monkeypatch.setattr(report.Reporter, 'train_loss', ctrl_c_mid_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        main.train(**fast_options(parts, tiny_data, max_epoch=3, num_workers=workers))
    monkeypatch.undo()
    assert load_checkpoint(newest_run(parts / 'checkpoints') / 'last.pth')['epoch'] == 0  # epoch 1, whole

    options = fast_options(parts, tiny_data, resume='latest', num_workers=workers)
    del options['max_epoch']  # as Ctrl-C's message says: the run's own plan, 3 epochs
    main.train(**options)
    assert [r['epoch'] for r in records(parts)] == [1, 2, 3]
    assert [{**r, 'seconds': 0, 'images_per_second': 0} for r in records(parts)] == [
        {**r, 'seconds': 0, 'images_per_second': 0} for r in records(whole)
    ]
    a = load_checkpoint(newest_run(whole / 'checkpoints') / 'last.pth')['model']
    b = load_checkpoint(newest_run(parts / 'checkpoints') / 'last.pth')['model']
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_squeezenet_learns_at_the_default_learning_rate(tmp_path, tiny_data):
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=2))  # SqueezeNet at --lr=0.001
    assert all(abs(r['train_loss'] - math.log(2)) > 1e-3 for r in records(tmp_path))
    model = load_weights(build_model('SqueezeNet'), newest_run(tmp_path / 'checkpoints') / 'last.pth').eval()
    with torch.no_grad():
        answers = model(torch.randn(8, 3, 32, 32)).softmax(1)[:, 1]
    assert answers.std() > 1e-4  # not one answer for every image


def test_a_run_that_learns_nothing_says_so_with_what_to_try(capsys):
    record = {
        'epoch': 1,
        'lr': 1e-3,
        'train_loss': math.log(3),
        'val_loss': math.log(3),
        'val_accuracy': 1 / 3,
        'classes': ['a', 'b', 'c'],
        'seconds': 1.0,
        'images_per_second': 10,
        'skipped': 0,
    }
    report.warn_if_stuck(record, torch.tensor([[0.3, 0.3, 0.4]] * 6))  # one answer for every image
    out = capsys.readouterr().out
    assert 'the model gives every validation image the same probabilities' in out and 'ln(3) = 1.0986' in out
    # a training loss at ln(3) while the answers differ (a new user's 65% epoch): no alarm
    report.warn_if_stuck(record, torch.tensor([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.3, 0.3, 0.4]]))
    assert capsys.readouterr().out == ''


def test_two_test_images_that_would_share_an_id_are_named(tmp_path, tiny_data):
    folder = tmp_path / 'mine'
    folder.mkdir()
    for name in ('photo.jpg', 'photo.png', 'other.jpg'):
        (folder / name).write_bytes((tiny_data / 'test1' / '1.jpg').read_bytes())
    main.train(**fast_options(tmp_path, tiny_data))
    options = fast_options(tmp_path, tiny_data, test_data_root=str(folder))
    assert_one_line_error(run_main('test', *as_flags(options)), 'photo.jpg and photo.png', 'same id photo')


def test_the_first_lines_name_the_dashboards_and_only_the_options_given(tmp_path, tiny_data, capsys):
    main.train(**fast_options(tmp_path, tiny_data, vis=True, vis_port=9, tensorboard=True))  # nothing on port 9
    out = capsys.readouterr().out
    run = newest_run(tmp_path / 'checkpoints')
    assert f'curves: visdom http://127.0.0.1:9/env/{run.name}' in out
    assert f'curves: tensorboard --logdir {run.parent}' in out
    config = next(line for line in out.splitlines() if line.startswith('config: '))
    assert 'vis_port=9' in config and 'seed=' not in config and 'lr=' not in config


def test_a_removed_run_leaves_latest_to_the_newest_left(tmp_path, tiny_data, capsys):
    main.train(**fast_options(tmp_path, tiny_data, name='older'))
    main.train(**fast_options(tmp_path, tiny_data, name='newer'))
    for file in (tmp_path / 'checkpoints' / 'newer').iterdir():  # rm -r checkpoints/newer, as the README says
        file.unlink()
    (tmp_path / 'checkpoints' / 'newer').rmdir()
    capsys.readouterr()
    options = fast_options(tmp_path, tiny_data)
    del options['model'], options['image_size']
    main.val(**options)
    assert f'using {tmp_path / "checkpoints" / "older" / "best.pth"} (the newest run)' in capsys.readouterr().out
