"""Runs side by side: every training run keeps its own folder, and nothing of an older run is lost."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest
import torch

import main
import utils.run_folders
from config import UserError
from conftest import ROOT, as_flags, assert_one_line_error, fast_options, newest_run, run_main, scripted_validation
from models import SqueezeNet
from training import engine
from utils.run_folders import new_run_dir


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_folders(checkpoints):
    return sorted(p for p in checkpoints.iterdir() if p.name != 'latest')


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory, tiny_data):
    """Two trainings in a row into one checkpoint_dir, with what each left right after it ran."""
    folder = tmp_path_factory.mktemp('runs')
    checkpoints = folder / 'checkpoints'
    kept = []
    for options in (dict(max_epoch=2), dict(max_epoch=1, lr=0.01)):
        main.train(**fast_options(folder, tiny_data, **options))
        run = newest_run(checkpoints)
        kept.append((run, digest(run / 'best.pth'), (run / 'metrics.jsonl').read_text()))
    return folder, kept


def test_a_second_run_keeps_the_first_runs_files(two_runs):
    folder, kept = two_runs
    assert run_folders(folder / 'checkpoints') == sorted(run for run, _, _ in kept)
    for run, best, metrics in kept:
        assert digest(run / 'best.pth') == best and (run / 'metrics.jsonl').read_text() == metrics
        assert sorted(p.name for p in run.iterdir()) == ['best.pth', 'config.json', 'last.pth', 'metrics.jsonl']
    first, second = (run for run, _, _ in kept)
    assert first.name.endswith('-SqueezeNet') and first != second
    assert newest_run(folder / 'checkpoints') == second  # latest moved to the second


def test_config_json_says_how_the_run_was_made(two_runs):
    _, kept = two_runs
    made = json.loads((kept[1][0] / 'config.json').read_text())
    assert made['options']['lr'] == 0.01 and made['options']['max_epoch'] == 1
    assert made['classes'] == ['cat', 'dog'] and made['device'] == 'cpu'
    assert made['versions']['torch'] == torch.__version__ and made['versions']['python']
    assert made['command'] and made['started']
    head = subprocess.run(['git', '-C', str(ROOT), 'rev-parse', 'HEAD'], capture_output=True, text=True)
    assert made['git_commit'] == (head.stdout.strip() or None)


@pytest.mark.slow
def test_runs_lists_both_newest_first_with_their_figures(two_runs):
    folder, kept = two_runs
    result = run_main('runs', f'--checkpoint_dir={folder / "checkpoints"}')
    assert result.returncode == 0, result.stderr
    assert 'config:' not in result.stdout and not result.stderr  # it trains nothing, and asks for no GPU
    names = {run.name for run, _, _ in kept}
    lines = [line for line in result.stdout.splitlines() if line.split()[0] in names]
    assert [line.split()[0] for line in lines] == [kept[1][0].name, kept[0][0].name]
    for line, (run, _, metrics) in zip(lines, reversed(kept)):
        records = [json.loads(r) for r in metrics.splitlines()]
        best = max(reversed(records), key=lambda r: r['val_accuracy'])  # best.pth's: the later of a tie
        asked = json.loads((run / 'config.json').read_text())['options']['max_epoch']
        assert (
            f'SqueezeNet  cat,dog  {len(records)}/{asked} epochs  best acc {best["val_accuracy"]:.2%}  '
            f'log loss {best["val_log_loss"]:.4f}  started ' in line
        )
        assert 'interrupted' not in line
        assert line.endswith(f'lr={json.loads((run / "config.json").read_text())["options"]["lr"]}')  # what differs
        assert 'seed=' not in line  # the same in both


def test_resuming_latest_continues_the_newest_run_in_its_folder(tmp_path, tiny_data, capsys):
    main.train(**fast_options(tmp_path, tiny_data, name='one'))
    main.train(**fast_options(tmp_path, tiny_data, name='two'))
    capsys.readouterr()
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=2, resume='latest'))
    assert 'run folder ' + str(tmp_path / 'checkpoints' / 'two') in capsys.readouterr().out
    epochs = [
        json.loads(line)['epoch']
        for line in (tmp_path / 'checkpoints' / 'two' / 'metrics.jsonl').read_text().splitlines()
    ]
    assert epochs == [1, 2]
    assert len((tmp_path / 'checkpoints' / 'one' / 'metrics.jsonl').read_text().splitlines()) == 1
    assert run_folders(tmp_path / 'checkpoints') == [tmp_path / 'checkpoints' / n for n in ('one', 'two')]
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=2, resume='one'))  # a run by its name
    assert newest_run(tmp_path / 'checkpoints').name == 'one'


def test_a_name_that_is_taken_is_an_error(tmp_path, tiny_data):
    main.train(**fast_options(tmp_path, tiny_data, name='mine'))
    result = run_main('train', *as_flags(fast_options(tmp_path, tiny_data, name='mine')))
    assert_one_line_error(result, '--name=mine:', 'is taken', '--resume=mine')


def test_a_named_run_stopped_in_its_first_epoch_says_how_to_start_it_again(tmp_path, tiny_data, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, 'train_one_epoch', ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        main.train(**fast_options(tmp_path, tiny_data, name='mine'))
    monkeypatch.undo()
    unfinished = r'has not finished an epoch \(if it has stopped, remove that folder'
    with pytest.raises(UserError, match=r'--name=mine: .* holds a run that ' + unfinished):
        main.train(**fast_options(tmp_path, tiny_data, name='mine'))
    for option in ('resume', 'load_model_path'):
        with pytest.raises(UserError, match=rf'--{option}=mine: .* has no (last|best)\.pth: its run ' + unfinished):
            main.train(**fast_options(tmp_path, tiny_data, **{option: 'mine'}))
    shutil.rmtree(tmp_path / 'checkpoints' / 'mine')  # as it says
    main.train(**fast_options(tmp_path, tiny_data, name='mine'))
    (tmp_path / 'checkpoints' / 'mine' / 'last.pth').unlink()  # a finished run whose best.pth is kept alone
    (tmp_path / 'checkpoints' / 'sweep-or-kfold').mkdir()  # a folder of runs, which --resume refuses
    for name in ('mine', 'sweep-or-kfold'):
        with pytest.raises(UserError, match=rf'--name={name}: .* is taken; choose another name$'):
            main.train(**fast_options(tmp_path, tiny_data, name=name))


def test_runs_started_at_once_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr(utils.run_folders.time, 'strftime', lambda pattern: '20261202-141503')  # the same second
    made, start = [], threading.Barrier(8)

    def make():
        start.wait()
        made.append(new_run_dir(tmp_path, 'ResNet34'))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 8 and all(p.is_dir() for p in made)
    assert sorted(p.name for p in made)[:2] == ['20261202-141503-ResNet34', '20261202-141503-ResNet34-2']


@pytest.mark.slow
def test_two_trainings_from_two_terminals_at_once(tmp_path, tiny_data):
    options = as_flags(fast_options(tmp_path, tiny_data))
    both = [
        subprocess.Popen(
            [sys.executable, str(ROOT / 'main.py'), 'train', *options],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for process in both:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    folders = run_folders(tmp_path / 'checkpoints')
    assert len(folders) == 2
    for folder in folders:
        assert len((folder / 'metrics.jsonl').read_text().splitlines()) == 1  # each wrote only its own


@pytest.mark.slow
def test_val_test_and_predict_use_the_newest_run_and_its_data_by_default(two_runs, tmp_path, tiny_data):
    folder, kept = two_runs
    newest = kept[1][0]
    options = [f'--checkpoint_dir={folder / "checkpoints"}', '--use_gpu=False', '--num_workers=0']
    val = run_main('val', *options, cwd=tmp_path)  # no data options, from another folder
    assert val.returncode == 0, val.stderr
    assert f'using {newest / "best.pth"} (the newest run)' in val.stdout
    assert 'train_data_root=' in val.stdout and '12 validation images' in val.stdout

    for expected in ('result.csv', 'result-2.csv'):  # a second test never overwrites the first
        test = run_main('test', *options)
        assert test.returncode == 0, test.stderr
        assert f'wrote 8 predictions to {newest / expected}' in test.stdout
    assert (newest / 'result.csv').read_text() == (newest / 'result-2.csv').read_text()

    predict = run_main('predict', str(tiny_data / 'test1' / '1.jpg'), *options)
    assert predict.returncode == 0, predict.stderr
    assert f'using {newest / "best.pth"} (the newest run)' in predict.stdout
    explicit = tmp_path / 'mine.csv'
    assert run_main('test', *options, f'--result_file={explicit}').returncode == 0 and explicit.exists()


@pytest.mark.slow
def test_best_is_the_finished_last_written_once_and_stays_apart(tmp_path, tiny_data, one_picture, monkeypatch):
    # every epoch validates at 50% on one picture: each ties the best, and best.pth is last.pth's second name
    main.train(**fast_options(tmp_path / 'still', one_picture, max_epoch=2))
    run = newest_run(tmp_path / 'still' / 'checkpoints')
    assert os.stat(run / 'best.pth').st_ino == os.stat(run / 'last.pth').st_ino
    # best in epoch 4 of 5: the last epoch's save leaves best.pth alone
    scripted_validation(monkeypatch, [0.5, 0.6, 0.7, 0.9, 0.8], [0.9, 0.8, 0.7, 0.6, 0.65])
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=5, model='ResNet34'))
    run = newest_run(tmp_path / 'checkpoints')
    accuracies = [json.loads(line)['val_accuracy'] for line in (run / 'metrics.jsonl').read_text().splitlines()]
    best, last = torch.load(run / 'best.pth', weights_only=True), torch.load(run / 'last.pth', weights_only=True)
    assert (best['epoch'], last['epoch']) == (3, 4) and accuracies[3] > accuracies[4]
    assert os.stat(run / 'best.pth').st_ino != os.stat(run / 'last.pth').st_ino
    assert not torch.equal(best['model']['net.fc.weight'], last['model']['net.fc.weight'])
    assert 'optimizer' in last and 'optimizer' not in best  # apart, the best keeps its weights only
    assert best['best_accuracy'] == last['best_accuracy'] == max(accuracies)


def test_a_checkpoint_folder_from_before_runs_is_still_usable_by_path(tmp_path, tiny_data):
    old = tmp_path / 'checkpoints'  # files directly in checkpoints/, as written before run folders
    old.mkdir()
    model = SqueezeNet()
    torch.save(
        {'model': model.state_dict(), 'classes': ['cat', 'dog'], 'config': {'model': 'SqueezeNet', 'image_size': 32}},
        old / 'best.pth',
    )
    options = fast_options(tmp_path, tiny_data)
    del options['model'], options['image_size'], options['result_file']
    main.test(**options)  # no latest run: the old best.pth
    assert (old / 'result.csv').read_text().startswith('id,label\n')
    main.test(**options, load_model_path=str(old / 'best.pth'))
    assert (old / 'result-2.csv').exists()
    with pytest.raises(UserError, match=f'--result_file={tmp_path} is a folder; give a file name'):
        main.test(**options, result_file=str(tmp_path))


def test_resuming_takes_the_runs_data_and_a_finished_run_says_to_raise_max_epoch(tmp_path, tiny_data, capsys):
    main.train(**fast_options(tmp_path, tiny_data, name='done'))
    options = fast_options(tmp_path, tiny_data, resume='done', max_epoch=2)
    del options['train_data_root']  # the default, data/train, is not where the run's data is
    del options['num_workers']  # the default, one a core: the run's augmentation drew from none
    del options['vis'], options['tensorboard']  # the defaults, True: a run made without curves goes on without
    main.train(**options)
    assert f'train_data_root={tiny_data / "train"} num_workers=0 vis=False tensorboard=False' in capsys.readouterr().out
    assert not list((tmp_path / 'checkpoints' / 'done').glob('events.out.tfevents.*'))
    with pytest.raises(UserError, match='has trained its 2 epochs; raise --max_epoch'):
        main.train(**options)


@pytest.mark.parametrize('name', ['a/b', '..', 'latest'])
def test_a_run_name_is_a_plain_folder_name(tmp_path, tiny_data, name):
    with pytest.raises(UserError, match=f'--name={re.escape(name)}'):
        main.train(**fast_options(tmp_path, tiny_data, name=name))


def test_runs_lists_the_readable_runs_and_names_a_broken_one(tmp_path, tiny_data, capsys):
    main.train(**fast_options(tmp_path, tiny_data, name='good'))
    main.train(**fast_options(tmp_path, tiny_data, name='cut'))
    with open(tmp_path / 'checkpoints' / 'cut' / 'metrics.jsonl', 'a') as f:
        f.write('{"epoch": 2, "val_acc')  # a line cut short by a kill
    capsys.readouterr()
    main.runs(checkpoint_dir=str(tmp_path / 'checkpoints'))
    out, err = capsys.readouterr()
    assert 'good  SqueezeNet' in out and 'cut: cannot be read (JSONDecodeError)' in err
    sweep = tmp_path / 'checkpoints' / 'sweep-cut'
    shutil.copytree(tmp_path / 'checkpoints' / 'good', sweep / 'trial-0')
    (sweep / 'sweep.json').write_text('{"space": ["lr=1e-4..1e-2"], "met')
    main.runs(checkpoint_dir=str(tmp_path / 'checkpoints'))
    out, err = capsys.readouterr()
    assert 'sweep-cut/  1 runs' in out and f'{sweep / "sweep.json"} cannot be read (JSONDecodeError)' in err
    with pytest.raises(UserError, match='sweep.json cannot be read'):  # one line, not a traceback
        main.test(**fast_options(tmp_path, tiny_data, load_model_path='sweep-cut'))


def test_a_verb_takes_the_newest_run_with_a_trained_model_and_says_so(tmp_path, tiny_data, capsys, monkeypatch):
    from training import engine

    main.train(**fast_options(tmp_path, tiny_data, name='trained'))

    def crash(*args, **kwargs):
        raise MemoryError('out of memory in epoch 1')

    monkeypatch.setattr(engine, 'train_one_epoch', crash)
    with pytest.raises(MemoryError):
        main.train(**fast_options(tmp_path, tiny_data, name='crashed'))  # the newest run: no best.pth
    monkeypatch.undo()
    checkpoints = tmp_path / 'checkpoints'
    assert newest_run(checkpoints).name == 'crashed'
    capsys.readouterr()
    options = fast_options(tmp_path, tiny_data)
    main.predict(str(tiny_data / 'test1' / '1.jpg'), **options)
    used = checkpoints / 'trained' / 'best.pth'
    assert f'using {used} (the newest run with a trained model; crashed has none yet)' in capsys.readouterr().out
    main.test(**{**options, 'load_model_path': 'trained', 'result_file': ''})  # writes into trained/: still older
    (checkpoints / 'latest').unlink()  # removed by hand: the newest run's folder stands in
    main.predict(str(tiny_data / 'test1' / '1.jpg'), **options)
    assert f'using {used} (the newest run with a trained model; crashed has none yet)' in capsys.readouterr().out
    with pytest.raises(UserError, match='bset.pth does not exist'):  # a mistyped file is not replaced
        main.predict(str(tiny_data / 'test1' / '1.jpg'), **options, load_model_path=str(used.parent / 'bset.pth'))
    used.unlink()
    with pytest.raises(UserError, match=f'no run in {checkpoints} has a trained model'):
        main.predict(str(tiny_data / 'test1' / '1.jpg'), **options)


def test_a_stop_after_the_last_epoch_is_saved_leaves_a_complete_run(tmp_path, tiny_data, capsys):
    def stop_at_the_end(epoch, metrics, last):  # Ctrl-C while the last epoch's pictures are drawn, say
        if last:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        main.train_with(fast_options(tmp_path, tiny_data, max_epoch=2, name='done'), stop_at_the_end)
    out = capsys.readouterr().out
    run = tmp_path / 'checkpoints' / 'done'
    assert f'the run in {run} is complete' in out and 'which is lost' not in out and '--resume' not in out
    assert 'interrupted' not in json.loads((run / 'config.json').read_text())
    main.runs(checkpoint_dir=str(tmp_path / 'checkpoints'))
    assert (
        'done  SqueezeNet  cat,dog  2/2 epochs' in (listed := capsys.readouterr().out) and 'interrupted' not in listed
    )


def test_a_resumed_run_on_moved_data_is_validated_and_tested_where_its_data_is_now(tmp_path, tiny_data, monkeypatch):
    scripted_validation(monkeypatch, accuracies=[0.9, 0.5], losses=[0.3, 0.6])  # best.pth: the epoch before the move
    moved = tmp_path / 'moved'
    shutil.copytree(tiny_data, moved)
    main.train(**fast_options(tmp_path, moved, name='mv'))
    moved.rename(tmp_path / 'there')
    main.train(**fast_options(tmp_path, tmp_path / 'there', resume='mv', max_epoch=2))
    run = tmp_path / 'checkpoints' / 'mv'
    assert not os.path.samefile(run / 'best.pth', run / 'last.pth')
    options = fast_options(tmp_path, tiny_data)
    for data_option in ('train_data_root', 'test_data_root', 'result_file'):
        del options[data_option]
    main.val(**options, load_model_path='mv')
    main.test(**options, load_model_path='mv')
    assert (run / 'result.csv').read_text().count('\n') == 1 + len(list((tmp_path / 'there' / 'test1').iterdir()))
