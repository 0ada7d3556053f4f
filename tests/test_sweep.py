"""The sweep verb: trials that are ordinary runs in one folder, pruned when they fall behind or
diverge, a study that several processes share and a second start continues."""

import contextlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

import main
from config import UserError
from conftest import ROOT, as_flags, assert_one_line_error, fast_options, newest_run, run_main, torchrun
from training import engine, recipe
from training.checkpoint import model_file
from utils.files import load_checkpoint
from utils.run_folders import KfoldRecord
from utils.runtime import Runtime
from verbs import sweep

SPACE = 'lr=1e-4..1e-2:log batch_size=4..8 label_smoothing=0|0.1'


def sweep_options(folder, data, **more):
    """fast_options without batch_size, which the spaces here search."""
    options = fast_options(folder, data)
    del options['batch_size']
    return {**options, **more}


def sweep_here(trials, space, options, **more):
    """main.sweep in this process: (what it printed, the sweep's folder)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main.sweep(trials=trials, space=space, **options, **more)
    checkpoints = ROOT / options['checkpoint_dir']
    folders = [p for p in checkpoints.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return out.getvalue(), folders[0]


def trials_of(folder, storage=None):
    """{number: FrozenTrial} of the sweep in `folder`, surplus trials left out."""
    study = optuna.load_study(study_name=folder.name, storage=storage or f'sqlite:///{folder / "study.db"}')
    return {t.number: t for t in study.get_trials() if not t.user_attrs.get('surplus')}


def trial_record(folder, number):
    return json.loads((folder / f'trial-{number}' / 'trial.json').read_text())


def epochs_of(run):
    return [json.loads(line)['epoch'] for line in (run / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def swept(tmp_path_factory, tiny_data):
    """Three trials of two epochs on SPACE, with TensorBoard."""
    base = tmp_path_factory.mktemp('sweep')
    options = sweep_options(base, tiny_data, max_epoch=2, tensorboard=True)
    out, folder = sweep_here(3, SPACE, options)
    return base, options, out, folder


def test_a_sweep_runs_its_trials_as_runs_with_distinct_options_in_range(swept):
    base, options, out, folder = swept
    trials = trials_of(folder)
    assert sorted(trials) == [0, 1, 2] and all(t.state.name == 'COMPLETE' for t in trials.values())
    drawn = [t.params for t in trials.values()]
    assert len({tuple(sorted(p.items())) for p in drawn}) == 3
    for number, params in enumerate(drawn):
        assert 1e-4 <= params['lr'] <= 1e-2 and type(params['batch_size']) is int and 4 <= params['batch_size'] <= 8
        assert params['label_smoothing'] in (0, 0.1)
        run = folder / f'trial-{number}'
        files = {p.name for p in run.iterdir()}
        assert {'config.json', 'metrics.jsonl', 'last.pth', 'best.pth', 'trial.json'} <= files
        assert any(name.startswith('events.out.tfevents.') for name in files)
        made = json.loads((run / 'config.json').read_text())['options']
        assert {key: made[key] for key in params} == params  # the run trained with what was drawn
        assert epochs_of(run) == [1, 2]
        records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
        kept = load_checkpoint(run / 'best.pth')['epoch']  # the epoch of the best accuracy, the later of a tie
        assert trials[number].value == records[kept]['val_log_loss']  # the figure of the weights it saved
        assert trial_record(folder, number) == {
            'number': number,
            'state': 'complete',
            'value': trials[number].value,
            'metric': 'log_loss',
            'params': params,
            'note': '',
        }
    best = min(trials.values(), key=lambda t: t.value)
    assert newest_run(ROOT / options['checkpoint_dir']) == folder  # the newest run: the sweep
    assert model_file(folder) == folder / f'trial-{best.number}' / 'best.pth'  # its model: the best trial's
    assert f'best: trial {best.number}, log loss {best.value:.4f}' in out
    again = out.split('best: ')[1].splitlines()[1]
    assert again.startswith('python main.py train ') and f'--lr={best.params["lr"]!r}' in again.split()
    assert f'--batch_size={best.params["batch_size"]}' in again.split()
    table = out.split('trials of sweep ')[1].splitlines()
    assert table[1].split() == 'trial state log loss epochs seconds lr batch_size label_smoothing'.split()
    assert [line.split()[:2] for line in table[2:5]] == [[str(n), 'complete'] for n in range(3)]


def test_every_trial_shows_the_sweeps_options_in_tensorboard_hparams(swept):
    _, _, _, folder = swept
    trials = trials_of(folder)
    assert any(t.params['label_smoothing'] == 0 for t in trials.values())  # a default, shown all the same
    for number, trial in trials.items():
        board = EventAccumulator(str(folder / f'trial-{number}'))
        board.Reload()
        start = HParamsPluginData.FromString(board.PluginTagToContent('hparams')['_hparams_/session_start_info'])
        shown = {
            key: getattr(value, value.WhichOneof('kind')) for key, value in start.session_start_info.hparams.items()
        }
        assert {key: shown.get(key) for key in trial.params} == pytest.approx(trial.params)


def test_runs_lists_a_sweep_as_one_entry_with_its_trials(swept, tmp_path, capsys):
    base, options, _, folder = swept
    checkpoints = tmp_path / 'checkpoints'
    shutil.copytree(folder, checkpoints / folder.name)
    shutil.copytree(folder / 'trial-0', checkpoints / folder.name / 'trial-3')
    running = checkpoints / folder.name / 'trial-3'  # one that has not ended: no trial.json yet
    (running / 'trial.json').unlink()
    made = json.loads((running / 'config.json').read_text())
    (running / 'config.json').write_text(json.dumps({**made, 'started': '2099-01-01 00:00:00'}))
    capsys.readouterr()
    main.runs(checkpoint_dir=str(checkpoints))
    lines = capsys.readouterr().out.splitlines()  # no config: line, runs trains nothing
    assert lines[0].startswith(f'{folder.name}/  sweep of 4 trials (3 complete, 1 running), log_loss on {SPACE}')
    trials = trials_of(folder)
    for line, number in zip(lines[1:4], range(3)):
        params = trials[number].params
        assert line.startswith(
            f'  trial-{number}  complete log_loss {trials[number].value:.4f}  SqueezeNet  cat,dog  2/2 '
        )
        assert line.endswith(
            f'batch_size={params["batch_size"]} label_smoothing={params["label_smoothing"]} lr={params["lr"]}'
        )
    assert lines[4].startswith('  trial-3  running  SqueezeNet') and len(lines) == 5


def test_a_trial_works_with_val_and_resume_as_any_run(swept, tmp_path, tiny_data, capsys):
    base, options, _, folder = swept
    checkpoints = tmp_path / 'checkpoints'
    shutil.copytree(ROOT / options['checkpoint_dir'], checkpoints)
    trial = checkpoints / folder.name / 'trial-1'
    capsys.readouterr()
    main.val(load_model_path=str(trial), checkpoint_dir=str(checkpoints), use_gpu=False, num_workers=0, amp=False)
    out = capsys.readouterr().out
    losses = [json.loads(line)['val_log_loss'] for line in (trial / 'metrics.jsonl').read_text().splitlines()]
    assert any(f'12 validation images: loss {loss:.4f}' in out for loss in losses)  # its best.pth's epoch
    main.val(checkpoint_dir=str(checkpoints), use_gpu=False, num_workers=0)  # latest: the sweep, its best trial
    best = min(trials_of(folder).values(), key=lambda t: t.value).number
    assert (
        f'using {checkpoints / folder.name / f"trial-{best}" / "best.pth"} (the newest run)' in capsys.readouterr().out
    )
    with pytest.raises(UserError, match=f'--resume=latest: {folder.name} is a sweep or a kfold, a folder of runs'):
        main.train(**fast_options(tmp_path, tiny_data, resume='latest', max_epoch=3))
    main.train(**fast_options(tmp_path, tiny_data, resume=str(trial), max_epoch=3))
    assert f'run folder {trial}' in capsys.readouterr().out and epochs_of(trial) == [1, 2, 3]
    main.train(**fast_options(tmp_path, tiny_data, resume=f'{folder.name}/trial-1', max_epoch=4))  # by name
    assert epochs_of(trial) == [1, 2, 3, 4]


def test_a_trial_whose_loss_becomes_nan_is_pruned_and_keeps_its_folder(tmp_path, tiny_data):
    out, folder = sweep_here(3, 'lr=1e-3|1e3', sweep_options(tmp_path, tiny_data, batch_size=8))
    trials = trials_of(folder)
    assert {t.params['lr'] for t in trials.values()} == {1e-3, 1e3}  # both drawn (the seed is fixed)
    for number, trial in trials.items():
        record = trial_record(folder, number)
        if trial.params['lr'] == 1e3:
            assert trial.state.name == 'PRUNED' and record['state'] == 'pruned'
            assert record['note'].startswith('the loss became nan in epoch 1')
            assert f'trial {number} pruned (the loss became nan' in out
            assert (folder / f'trial-{number}' / 'config.json').exists()
        else:
            assert trial.state.name == 'COMPLETE' and record['state'] == 'complete'


def bad_rate_falls_behind(real):
    """engine.validate that validates for real, then reports a log loss set by the trial's rate:
    0.1 is the bad one."""

    def validate(training, *args, **kwargs):
        metrics = real(training, *args, **kwargs)
        return {**metrics, 'log_loss': 2.0 if training.optimizer.param_groups[0]['lr'] == 0.1 else 0.5}

    return validate


def test_the_median_pruner_stops_a_trial_that_falls_behind(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(engine, 'validate', bad_rate_falls_behind(engine.validate))
    _, folder = sweep_here(3, 'lr=0.1|1e-3', sweep_options(tmp_path, tiny_data, batch_size=8, max_epoch=3))
    assert_pruned_behind_the_median(folder)


def test_a_trial_that_trained_all_its_epochs_is_complete_however_it_compares(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(engine, 'validate', bad_rate_falls_behind(engine.validate))
    _, folder = sweep_here(3, 'lr=0.1|1e-3', sweep_options(tmp_path, tiny_data, batch_size=8, max_epoch=2))
    trials = trials_of(folder)
    assert [t.state.name for t in trials.values()] == ['COMPLETE'] * 3
    assert [t.params['lr'] for t in trials.values()] == [1e-3, 1e-3, 0.1]  # behind the median after epoch 2 of 2


def test_a_trial_that_stopped_early_is_complete_however_it_compares(tmp_path, tiny_data, monkeypatch):
    falls_behind, calls = bad_rate_falls_behind(engine.validate), itertools.count()

    def never_better(*args, **kwargs):  # a validation loss that grows: each trial stops after epoch 2 of 3
        loss = float(next(calls))
        return {**falls_behind(*args, **kwargs), 'loss': loss, 'model_loss': loss}

    monkeypatch.setattr(engine, 'validate', never_better)
    options = sweep_options(tmp_path, tiny_data, batch_size=8, max_epoch=3, early_stop=1)
    _, folder = sweep_here(3, 'lr=0.1|1e-3', options)
    trials = trials_of(folder)
    assert [t.state.name for t in trials.values()] == ['COMPLETE'] * 3
    assert [t.params['lr'] for t in trials.values()] == [1e-3, 1e-3, 0.1]  # behind the median at its last epoch
    assert all(epochs_of(folder / f'trial-{number}') == [1, 2] for number in trials)


def assert_pruned_behind_the_median(folder):
    """The trials of lr=0.1|1e-3 under bad_rate_falls_behind: 0.1 pruned once two trials completed."""
    trials, complete = trials_of(folder), []
    for number, trial in sorted(trials.items()):
        # MedianPruner(n_startup_trials=2, n_warmup_steps=1): from the second epoch on, worse than
        # the median of the trials completed so far, once there are two
        values = sorted(t.intermediate_values[1] for t in complete)
        median = (values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2 if values else None
        behind = trial.params['lr'] == 0.1 and len(complete) >= 2 and median < 2.0
        assert trial.state.name == ('PRUNED' if behind else 'COMPLETE'), number
        if behind:
            assert epochs_of(folder / f'trial-{number}') == [1, 2]  # stopped after epoch 2 of 3
            assert (folder / f'trial-{number}' / 'last.pth').exists()
            assert trial_record(folder, number)['note'] == 'behind the median after epoch 2'
        else:
            complete.append(trial)
    assert any(t.state.name == 'PRUNED' for t in trials.values())  # the seeds draw 1e-3 twice, then 0.1


@pytest.mark.slow
def test_under_torchrun_every_process_trains_each_trial_and_stops_when_rank_0_prunes(tmp_path, tiny_data):
    # main.py in two processes, each with the validation of the median pruner's test
    script = tmp_path / 'patched_main.py'
    script.write_text(
        'import runpy, sys\n'
        f'sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / "tests")!r})\n'
        'import test_sweep\nfrom training import engine\n'
        'engine.validate = test_sweep.bad_rate_falls_behind(engine.validate)\n'
        f'runpy.run_path({str(ROOT / "main.py")!r}, run_name="__main__")\n'
    )
    options = sweep_options(tmp_path, tiny_data, batch_size=8, max_epoch=3)
    result = torchrun('sweep', *as_flags(options), '--trials=3', '--space=lr=0.1|1e-3', script=script)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = [p for p in (tmp_path / 'checkpoints').iterdir() if p.is_dir()]
    assert_pruned_behind_the_median(folder)  # the other process stopped with rank 0, or it would hang
    assert result.stdout.count('in each of 2 processes') == 3  # each trial trained data-parallel
    assert re.findall(r'^trial (\d) (\w+)', result.stdout, re.M) == [
        ('0', 'complete'),
        ('1', 'complete'),
        ('2', 'pruned'),
    ]
    for number in range(3):  # rank 0 alone wrote the trial's run, with both processes' options
        config = json.loads((folder / f'trial-{number}' / 'config.json').read_text())
        assert (
            config['device'] == 'cpu x 2 processes'
            and config['options']['lr'] == trials_of(folder)[number].params['lr']
        )
    # a study that refuses the command: every process ends with rank 0's one-line error
    again = torchrun('sweep', *as_flags({**options, 'name': folder.name}), '--trials=3', '--space=lr=0.1|1e-2')
    refusal = f'error: sweep {folder.name} was made with another --space, --metric or options'
    assert again.returncode != 0 and again.stderr.count(refusal) == 2, again.stderr[-3000:]


@pytest.mark.filterwarnings('ignore:.*eartbeat')  # optuna's own notes on the storage opened by hand
def test_a_trial_left_running_by_a_dead_process_is_marked_failed(tmp_path, tiny_data):
    options = sweep_options(tmp_path, tiny_data, batch_size=8)
    _, folder = sweep_here(1, 'lr=1e-3|2e-3', options)
    storage = optuna.storages.RDBStorage(f'sqlite:///{folder / "study.db"}', heartbeat_interval=1)
    dead = optuna.load_study(study_name=folder.name, storage=storage).ask()  # a process killed mid-trial
    storage.record_heartbeat(dead._trial_id)
    shutil.copytree(folder / 'trial-0', folder / 'trial-1', ignore=shutil.ignore_patterns('trial.json'))
    with contextlib.closing(sqlite3.connect(folder / 'study.db')) as db, db:  # its last sign of life: an hour ago
        db.execute(
            "UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour') WHERE trial_id = ?", (dead._trial_id,)
        )
    sweep_here(2, 'lr=1e-3|2e-3', options)
    assert [t.state.name for t in trials_of(folder).values()] == ['COMPLETE', 'FAIL', 'COMPLETE']
    assert trial_record(folder, 1)['state'] == 'failed'


@pytest.mark.parametrize(
    'space, fragments',
    [
        ('lrr=1e-3..1e-2', ['--space: unknown option --lrr; did you mean --lr?']),
        ('lr=1e-2..1e-3', ['--space: lr=1e-2..1e-3: the low end 0.01 is not below the high end 0.001']),
        ('lr=0..1e-2:log', ['--space: lr=0..1e-2:log: --lr=0.0 is invalid; it takes a number > 0']),
        ('lr=1e-4..1e-2:ln', ['--space: lr=1e-4..1e-2:ln: a range ends in :log or nothing, not :ln']),
        ('label_smoothing=0..1', ['label_smoothing=0..1: --label_smoothing=1.0 is invalid']),
        ('batch_size=4.5..8', ["batch_size=4.5..8: --batch_size='4.5' is invalid; it takes a whole number"]),
        ('model=SqueezeNet|ResNet35', ["model=SqueezeNet|ResNet35: --model='ResNet35' is invalid"]),
        ('model=SqueezeNet..ResNet34', ['model=SqueezeNet..ResNet34: --model is not a number; give choices']),
        (
            'model=SqueezeNet|AlexNet',
            ['model=SqueezeNet|AlexNet: --image_size=32 is invalid; it takes a whole number >= 63'],
        ),
        ('hflip=True|maybe', ["hflip=True|maybe: --hflip='maybe' is invalid; it takes True or False"]),
        ('num_workers=0|2', ['num_workers=0|2: --num_workers says where or how runs go']),
        ('image_size=32|64', ['image_size=32|64: --image_size is also given as --image_size=32; drop one']),
        ('lr=1e-3|1e-2 lr=1e-4..1e-2', ['lr=1e-4..1e-2: --lr is in --space twice']),
        ('lr=1e-3', ['lr=1e-3: one value is no search; give it as --lr=1e-3']),
        ('lr', ["--space: 'lr' is not a dimension"]),
        ('', ['--space is empty']),
    ],
)
def test_a_malformed_space_is_one_sentence_naming_the_dimension_before_anything_runs(
    tmp_path, tiny_data, space, fragments
):
    options = sweep_options(tmp_path, tiny_data)
    del options['model']
    with pytest.raises(UserError) as error:
        main.sweep(trials=2, space=space, **options)
    assert '\n' not in str(error.value) and all(fragment in str(error.value) for fragment in fragments)
    assert not (tmp_path / 'checkpoints').exists()  # no folder, no study


@pytest.mark.slow
def test_a_malformed_sweep_command_is_one_line_and_exit_2(tmp_path, tiny_data):
    result = run_main('sweep', *as_flags(sweep_options(tmp_path, tiny_data)), '--space=lr=1e-2..1e-3')
    assert_one_line_error(result, 'error: --space: lr=1e-2..1e-3: the low end 0.01 is not below the high end 0.001')


@pytest.mark.parametrize(
    'more, fragment',
    [
        (dict(trials=0), '--trials=0 is invalid; it takes a whole number >= 1'),
        (dict(metric='auc'), "--metric='auc' is invalid; it takes log_loss or accuracy"),
        (dict(name='a/b'), '--name=a/b: a sweep name is a folder name'),
        (dict(resume='latest'), '--resume: a sweep continues when the same command is started again'),
        (dict(train_data_root='no/such/folder'), '--train_data_root: folder'),  # latest left alone
    ],
)
def test_the_sweeps_own_options_are_checked_before_anything_runs(tmp_path, tiny_data, more, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        main.sweep(**{'trials': 2, 'space': 'hflip=True|False', **sweep_options(tmp_path, tiny_data), **more})
    assert not (tmp_path / 'checkpoints').exists()


def start_sweep(tmp_path, name, args):
    """`python main.py sweep ARGS` in its own process group, its output in tmp_path/NAME.out and .err."""
    with open(tmp_path / f'{name}.out', 'w') as out, open(tmp_path / f'{name}.err', 'w') as err:
        return subprocess.Popen(
            [sys.executable, str(ROOT / 'main.py'), 'sweep', *args],
            cwd=ROOT,
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
        )


def finish(process, seconds=240):
    try:
        return process.wait(timeout=seconds)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.slow
def test_two_processes_on_one_storage_split_the_trials(tmp_path, tiny_data):
    storage = f'sqlite:///{tmp_path / "shared.db"}'
    args = [*as_flags(sweep_options(tmp_path, tiny_data, batch_size=8)), '--trials=4', '--space=lr=1e-4..1e-2:log']
    both = [start_sweep(tmp_path, name, [*args, f'--storage={storage}']) for name in ('a', 'b')]
    for name, process in zip('ab', both):
        assert finish(process) == 0, (tmp_path / f'{name}.err').read_text()
    (folder,) = [p for p in (tmp_path / 'checkpoints').iterdir() if p.is_dir()]
    trials = trials_of(folder, storage)
    assert sorted(trials) == [0, 1, 2, 3] and {t.state.name for t in trials.values()} <= {'COMPLETE', 'PRUNED'}
    assert len({t.params['lr'] for t in trials.values()}) == 4  # drawn apart, though both have seed 0
    ran = [re.findall(r'^trial (\d+) (?:complete|pruned)', (tmp_path / f'{n}.out').read_text(), re.M) for n in 'ab']
    assert sorted(map(int, ran[0] + ran[1])) == [0, 1, 2, 3]  # each trial run once, by one of the two
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [f'trial-{n}' for n in range(4)]
    for number in range(4):
        assert epochs_of(folder / f'trial-{number}') == [1]


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_and_the_same_command_continues_it(tmp_path, tiny_data):
    args = [
        *as_flags(sweep_options(tmp_path, tiny_data, batch_size=8, max_epoch=2)),
        '--trials=3',
        '--space=lr=1e-4..1e-2:log',
    ]
    process = start_sweep(tmp_path, 'first', args)
    started = tmp_path / 'checkpoints'
    try:
        deadline = time.monotonic() + 120
        while not list(started.glob('*/trial-1/config.json')):  # trial 1 is training
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / 'first.err').read_text()
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGINT)
    finally:
        code = finish(process)
    out, err = (tmp_path / 'first.out').read_text(), (tmp_path / 'first.err').read_text()
    assert code == 130 and 'stopped by SIGINT' in err, err
    assert 'trial 1 failed (interrupted)' in out and 'trials of sweep ' in out
    (folder,) = [p for p in started.iterdir() if p.is_dir()]
    first = (folder / 'trial-0' / 'metrics.jsonl').read_text()
    again = run_main('sweep', *args)
    assert again.returncode == 0, again.stderr
    assert f'sweep {folder}: 1 of 3 trials finished' in again.stdout
    table = again.stdout.split('trials of sweep ')[1].splitlines()
    assert table[3].split()[:2] == ['1', 'failed']  # as its trial.json and runs say
    trials = trials_of(folder)
    assert [t.state.name for t in trials.values()] == ['COMPLETE', 'FAIL', 'COMPLETE', 'COMPLETE']
    assert trial_record(folder, 1)['state'] == 'failed' and trial_record(folder, 1)['note'] == 'interrupted'
    assert trials[2].params == trials[1].params  # the cut trial's options, tried again first
    assert (folder / 'trial-0' / 'metrics.jsonl').read_text() == first  # trial 0 was not run again


@pytest.mark.slow
def test_optuna_loads_only_when_a_sweep_runs():
    code = (
        'import sys, main, verbs.sweep; '
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('optuna', 'sqlalchemy')))"
    )
    found = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0 and found.stdout.strip() == '[]', found.stderr + found.stdout[:200]


@pytest.mark.parametrize('word, below_1e3', [('lr=1e-5..1e-1:log', 0.5), ('lr=1e-5..1e-1', 0.01)])
def test_a_log_range_draws_as_many_values_from_each_decade(word, below_1e3):
    dimension = sweep.parse_dimension(word, {}, [])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = [dimension.suggest(study.ask()) for _ in range(400)]
    assert all(1e-5 <= lr <= 1e-1 for lr in drawn)
    # log: 1e-5..1e-3 is half the range; linear: a hundredth of it
    assert sum(lr < 1e-3 for lr in drawn) / len(drawn) == pytest.approx(below_1e3, abs=0.06)


def test_a_tie_of_trials_is_the_earliest_for_the_sweep_and_for_the_verbs(tmp_path, one_picture):
    # one picture under every name: every trial validates at 50%
    options = sweep_options(tmp_path, one_picture, max_epoch=1)
    out, folder = sweep_here(5, 'lr=1e-4..1e-2:log', options, metric='accuracy')
    assert 'best: trial 0, accuracy 0.5000' in out
    assert model_file(folder) == folder / 'trial-0' / 'best.pth'
    cfg = main.options({**options, 'load_model_path': 'latest'})  # the sweep: its best trial's weights to start from
    _, model = recipe.model_of(cfg, ['cat', 'dog'], Runtime(torch.device('cpu')))
    kept = load_checkpoint(folder / 'trial-0' / 'best.pth')['model']
    assert all(torch.equal(tensor, kept[key]) for key, tensor in model.state_dict().items())


def test_a_draw_whose_values_do_not_go_together_is_pruned_and_the_sweep_goes_on(tmp_path, tiny_data):
    options = sweep_options(tmp_path, tiny_data, max_epoch=1)
    del options['model'], options['image_size']
    out, folder = sweep_here(4, 'model=AlexNet|SqueezeNet image_size=32|64', options)
    trials = trials_of(folder).values()
    clashed = [t for t in trials if (t.params['model'], t.params['image_size']) == ('AlexNet', 32)]
    assert clashed and all(t.state.name == 'PRUNED' for t in clashed)  # AlexNet needs 63 px: drawn, pruned
    assert len(trials) == 4 and f'trial {clashed[0].number} pruned (--image_size=32 is invalid' in out


def test_a_sweep_never_takes_a_kfolds_folder(tmp_path, tiny_data):
    folder = tmp_path / 'checkpoints' / 'k'
    KfoldRecord(2, {}).save(folder)
    with pytest.raises(UserError, match='is a training run or a kfold, not a sweep'):
        main.sweep(trials=1, space='hflip=True|False', **sweep_options(tmp_path, tiny_data), name='k')
    assert sorted(p.name for p in folder.iterdir()) == ['kfold.json']


def test_the_largest_seed_draws_trials_and_trains_them(tmp_path, tiny_data):
    # a loader worker seeds itself from the run's seed, the epoch and more: a larger number still
    options = sweep_options(tmp_path, tiny_data, max_epoch=1, seed=2**32 - 1, num_workers=1)
    out, folder = sweep_here(1, 'lr=1e-3..1e-2:log', options)
    assert [t.state.name for t in trials_of(folder).values()] == ['COMPLETE']
