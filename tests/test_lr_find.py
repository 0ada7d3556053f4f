"""lr_find: the learning-rate range test before a run."""

import csv

import pytest
import torch

import main
from config import UserError
from conftest import as_flags, assert_one_line_error, fast_options, newest_run, run_main, torchrun
from training import engine, recipe
from verbs import lr_find

# ResNet34 learns the tiny set within a few dozen steps, so its loss has somewhere to fall
OPTIONS = dict(model='ResNet34', tensorboard=True)


def curve(folder):
    rows = list(csv.DictReader(open(next(folder.glob('*lr_find-*')) / 'lr_find.csv')))
    return [float(r['lr']) for r in rows], [float(r['smoothed_loss']) for r in rows]


@pytest.mark.slow
def test_the_curve_falls_then_rises_and_the_suggestion_lies_inside_it(tmp_path, tiny_data, capsys):
    options = fast_options(tmp_path, tiny_data, **OPTIONS)
    options.pop('amp')  # the default: bf16 where the CPU has it
    main.lr_find(steps=60, **options)
    out = capsys.readouterr().out
    rates, losses = curve(tmp_path / 'checkpoints')
    lowest = losses.index(min(losses))
    assert 0 < lowest < len(losses) - 1 and losses[0] > min(losses) < losses[-1]
    assert rates == sorted(rates) and rates[0] == pytest.approx(1e-7)
    suggested = float(out.split('suggested --lr: ')[1].split()[0])
    assert rates[0] < suggested < rates[-1]
    command = next(line for line in out.splitlines() if line.startswith('python main.py train '))
    assert command.endswith(f'--lr={suggested:.1e}') and f'--train_data_root={tiny_data / "train"}' in command
    folder = next((tmp_path / 'checkpoints').glob('*lr_find-*'))
    assert (folder / 'lr_find.png').read_bytes()[:4] == b'\x89PNG' and list(folder.glob('events.out.tfevents.*'))
    assert not (tmp_path / 'checkpoints' / 'latest').exists()  # not a run: val, test and --resume never take it


def test_it_tests_from_trains_starting_weights_and_a_train_after_it_is_unchanged(
    tmp_path, tiny_data, monkeypatch, capsys
):
    starts, real = [], recipe.model_of

    def recorded(*args, **kwargs):
        model, model_without_ddp = real(*args, **kwargs)
        starts.append({k: v.clone() for k, v in model_without_ddp.state_dict().items()})
        return model, model_without_ddp

    monkeypatch.setattr(lr_find, 'model_of', recorded)
    monkeypatch.setattr(main, 'model_of', recorded)
    options = dict(OPTIONS, tensorboard=False)
    main.lr_find(steps=20, **fast_options(tmp_path / 'after', tiny_data, **options))
    assert 'lr_find.png\n' in capsys.readouterr().out  # not '... and TensorBoard', which is off
    main.train(**fast_options(tmp_path / 'after', tiny_data, **options))
    main.train(**fast_options(tmp_path / 'alone', tiny_data, **options))
    assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])  # the weights train starts from
    after, alone = (
        torch.load(newest_run(tmp_path / run / 'checkpoints') / 'last.pth', weights_only=True)
        for run in ('after', 'alone')
    )
    assert all(torch.equal(after['model'][k], alone['model'][k]) for k in alone['model'])


def test_it_takes_the_steps_the_recipe_takes(tmp_path, tiny_data, monkeypatch):
    seen, real = [], engine.forward_backward

    def spy(training, images, targets, rt, scale, sync):
        seen.append((type(training.optimizer).__name__, training.criterion.label_smoothing, scale, sync, rt.layout))
        return real(training, images, targets, rt, scale, sync)

    monkeypatch.setattr(engine, 'forward_backward', spy)
    recipe = dict(optimizer='sgd', label_smoothing=0.1, grad_accum_steps=2, channels_last=True)
    main.lr_find(steps=10, **fast_options(tmp_path, tiny_data, **OPTIONS, **recipe))
    recorded = len(curve(tmp_path / 'checkpoints')[0])  # a step whose loss diverged is taken, not recorded
    assert len(seen) in (2 * recorded, 2 * recorded + 2)  # two batches a step
    assert {s[:3] for s in seen} == {('SGD', 0.1, 0.5)} and [s[3] for s in seen[:2]] == [False, True]
    assert seen[0][4] == torch.channels_last


def test_bad_steps_and_a_resume_are_clear_errors(tmp_path, tiny_data):
    assert_one_line_error(run_main('lr_find', '--steps=3', *as_flags(fast_options(tmp_path, tiny_data))), '--steps=3')
    with pytest.raises(UserError, match='drop --resume'):
        main.lr_find(**fast_options(tmp_path, tiny_data, resume='latest'))


@pytest.mark.slow
def test_under_torchrun_it_tests_the_batch_of_all_processes(tmp_path, tiny_data):
    result = torchrun('lr_find', '--steps=10', *as_flags(fast_options(tmp_path, tiny_data)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count('lr_find: ') == 1 and len(list((tmp_path / 'checkpoints').glob('*lr_find-*'))) == 1
    assert 'torchrun --nproc_per_node=2 main.py train ' in result.stdout


def test_batches_left_with_one_image_by_unreadable_files_are_passed_over(tmp_path, tiny_data):
    train = tmp_path / 'train'
    train.mkdir()
    for n in range(6):
        for kind in ('cat', 'dog'):
            (train / f'{kind}.{n}.jpg').write_bytes((tiny_data / 'train' / f'{kind}.{n}.jpg').read_bytes())
            (train / f'{kind}.{n + 6}.jpg').write_bytes(b'')
    # ResNet34 at 32 px: the last BatchNorm sees a 1x1 map, which one image cannot train it on
    main.lr_find(steps=10, **fast_options(tmp_path, tiny_data, train_data_root=str(train), batch_size=2, **OPTIONS))
    assert len(curve(tmp_path / 'checkpoints')[0]) >= 5
    for file in train.glob('*.jpg'):
        file.write_bytes(b'')
    with pytest.raises(UserError, match='none of the 16 training images could be read'):
        main.lr_find(steps=10, **fast_options(tmp_path, tiny_data, train_data_root=str(train), batch_size=2))
