"""The sweep verb: Optuna picks each trial's options from a search space, and every trial is an
ordinary training run in checkpoints/<sweep>/trial-<n>/. The study (<sweep>/study.db, or --storage)
is shared by every process started with the same command, and continued when it starts again; a
median pruner stops the trials that fall behind (docs/sweep.md). Under torchrun every process
trains each trial: rank 0 alone talks to the study and hands the others the trial's options and,
after every epoch, whether to stop.
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shlex
import time
import warnings
from pathlib import Path

from config import NOT_RECIPE, DefaultConfig, UserError, unknown, whole_number
from models import check_options
from training.engine import Diverged
from utils.run_folders import KfoldRecord, SweepRecord, TrialRecord, best_of, check_folder_name, point_latest
from utils.runtime import runtime

FORMS = 'name=LOW..HIGH, name=LOW..HIGH:log or name=A|B|C'
METRICS = {'log_loss': ('log loss', 'minimize'), 'accuracy': ('accuracy', 'maximize')}
HEARTBEAT = 20  # seconds between a running trial's signs of life in the storage
GRACE = 60  # a trial silent this long lost its process (a kill, a crash): it is marked failed


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One option of the search space: choices, or a range of numbers (on a log scale)."""

    text: str  # as written in --space
    name: str
    choices: tuple = ()
    low: float = 0
    high: float = 0
    log: bool = False

    def suggest(self, trial):
        if self.choices:
            return trial.suggest_categorical(self.name, self.choices)
        if isinstance(self.low, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


def parse_dimension(word, fixed, taken):
    """The Dimension of one word of --space, or a UserError naming it; each value is checked as the
    option given alone would be, beside the fixed options (a model's smallest image size, say)."""
    kinds = {f.name: f.type for f in dataclasses.fields(DefaultConfig)}
    name, _, value = word.partition('=')
    name, where = name.replace('-', '_'), f'--space: {word}: '
    if not value:
        raise UserError(f'--space: {word!r} is not a dimension; write {FORMS}')
    if name not in kinds:
        raise UserError(f'--space: {unknown("option", name, kinds, prefix="--")}')
    if name in NOT_RECIPE:
        raise UserError(f'{where}--{name} says where or how runs go, not what they train; give it fixed')
    if name in fixed or name in taken:
        again = f'also given as --{name}={fixed[name]}' if name in fixed else 'in --space twice'
        raise UserError(f'{where}--{name} is {again}; drop one')

    def checked(raw):
        try:
            cfg = DefaultConfig().check_values({**fixed, name: raw})
            check_options(cfg)
        except UserError as e:
            raise UserError(where + str(e)) from None
        return getattr(cfg, name)

    if '..' not in value:
        choices = tuple(dict.fromkeys(checked(choice) for choice in value.split('|')))
        if len(choices) < 2:
            raise UserError(f'{where}one value is no search; give it as --{name}={value}, or write {FORMS}')
        return Dimension(word, name, choices=choices)
    low, _, rest = value.partition('..')
    high, _, scale = rest.partition(':')
    if kinds[name] not in (int, float):
        raise UserError(f'{where}--{name} is not a number; give choices, A|B')
    if scale not in ('', 'log'):
        raise UserError(f'{where}a range ends in :log or nothing, not :{scale}')
    low, high = checked(low), checked(high)
    if not low < high:
        raise UserError(f'{where}the low end {low} is not below the high end {high}')
    if scale and low <= 0:
        raise UserError(f'{where}a log range needs a low end above 0')
    return Dimension(word, name, low=low, high=high, log=bool(scale))


@dataclasses.dataclass
class Plan:
    """What a sweep runs: trials of the options `fixed` and a draw of `dimensions`, each a run in `folder`."""

    folder: Path
    base: DefaultConfig  # the fixed options, checked
    fixed: dict
    dimensions: list
    metric: str
    trials: int


def run_sweep(options, space, trials, metric, storage, train):
    """Run trials of train(options, on_epoch) until the study holds `trials` finished ones."""
    whole_number('trials', trials, low=1)
    if metric not in METRICS:
        raise UserError(f'--metric={metric!r} is invalid; it takes {" or ".join(METRICS)}')
    if 'resume' in options:
        raise UserError('--resume: a sweep continues when the same command is started again')
    fixed = {key: value for key, value in options.items() if key != 'name'}
    base = DefaultConfig().check_values(fixed)
    check_options(base)
    base.require_dir('train_data_root')  # before the study and `latest` are touched
    dimensions = []
    for word in str(space).split():
        dimensions.append(parse_dimension(word, fixed, [d.name for d in dimensions]))
    if not dimensions:
        raise UserError(f'--space is empty; give it the options to search: {FORMS}')
    recipe = {key: value for key, value in fixed.items() if key not in NOT_RECIPE}
    # what makes a sweep the same one: it names the default folder, and a study refuses another
    command = json.loads(json.dumps({'space': [d.text for d in dimensions], 'metric': metric, 'options': recipe}))
    digest = hashlib.sha1(json.dumps(command, sort_keys=True).encode()).hexdigest()[:8]
    name = str(options.get('name') or f'sweep-{digest}')
    check_folder_name(name, 'sweep')
    folder = base.path('checkpoint_dir') / name
    if (folder / 'config.json').exists() or KfoldRecord.load(folder):
        raise UserError(f'--name={name}: {folder} is a training run or a kfold, not a sweep; choose another name')
    plan = Plan(folder, base, fixed, dimensions, metric, trials)
    if int(os.environ.get('WORLD_SIZE', 1)) == 1:
        return sweep_trials(open_study(plan, storage, command), plan, train)
    with runtime(base.use_gpu) as rt:  # one process group, which every trial's training uses
        if not rt.is_main:
            return train_as_told(rt, train)
        try:
            study = open_study(plan, storage, command)
        except UserError as e:
            rt.broadcast(str(e))  # the other processes end with it, rather than wait to be killed
            raise
        sweep_trials(study, plan, train, share=rt.broadcast)
        rt.broadcast(None)  # the end: the other processes stop waiting for a trial


def train_as_told(rt, train):
    """A process of rank > 0 under torchrun: trains each trial's options that rank 0 hands it,
    and stops a trial when rank 0 says so; rank 0's text instead of options is its error."""

    def report(epoch, metrics, last):
        if rt.broadcast(None) is not None:
            raise Stopped

    while (run := rt.broadcast(None)) is not None:
        if isinstance(run, str):
            raise UserError(run)
        with contextlib.suppress(Stopped, Diverged):  # a diverged trial: rank 0 prunes it too
            train(run, report)


def sweep_trials(study, plan, train, share=lambda obj: obj):
    """Trials of `study` until it holds plan.trials finished ones, those left unfinished first, as rank
    0 (or the only process) runs them; under torchrun share() hands each trial's options, and after
    each epoch whether to stop, to the other processes (it returns rank 0's object on every rank)."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    label, direction = METRICS[plan.metric]
    point_latest(plan.base.path('checkpoint_dir'), plan.folder)  # the newest run: its best trial is its model
    retried = {t.user_attrs.get('retry_of') for t in study.get_trials(deepcopy=False)}
    for cut in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if cut.number not in retried and cut.params and not cut.user_attrs.get('error'):
            study.enqueue_trial(cut.params, user_attrs={'retry_of': cut.number})
    finished = len(study.get_trials(deepcopy=False, states=counted()))
    aim = 'minimised' if direction == 'minimize' else 'maximised'
    print(
        f'sweep {plan.folder}: {finished} of {plan.trials} trials finished, {label} {aim}; '
        'the same command continues it'
    )
    started = time.perf_counter()
    try:
        if finished < plan.trials:
            study.optimize(
                functools.partial(run_trial, study=study, plan=plan, train=train, share=share),
                n_trials=plan.trials - finished,
                catch=(Surplus,),
                callbacks=[MaxTrialsCallback(plan.trials, counted(running=True))],
            )
    finally:
        print_trials(study, plan.dimensions, label, time.perf_counter() - started)
        best = best_of(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), plan.metric)
        if best is not None:  # the trial whose best.pth test, predict and serve take
            again = {**plan.fixed, **best.params}
            print(f'best: trial {best.number}, {label} {best.value:.4f}, in {plan.folder / f"trial-{best.number}"}:')
            print('python main.py train ' + ' '.join(shlex.quote(f'--{k}={v}') for k, v in again.items()))


def run_trial(trial, study, plan, train, share):
    """Optuna's objective: train a run on the trial's draw; its value is the figure of best.pth."""
    import optuna

    # a seed per trial: the same command draws the same trials, processes sharing a study draw apart
    study.sampler = optuna.samplers.TPESampler(seed=(plan.base.seed * 100_003 + trial.number) % 2**32)
    earlier = study.get_trials(deepcopy=False, states=counted(running=True))  # other processes' running ones too
    if sum(t.number < trial.number for t in earlier) >= plan.trials:
        study.stop()  # another process took the last trial meanwhile
        trial.set_user_attr('surplus', True)
        raise Surplus
    params = {d.name: d.suggest(trial) for d in plan.dimensions}
    print(f'\nsweep {plan.folder.name}: trial {trial.number}, ' + ' '.join(f'{k}={v}' for k, v in params.items()))
    run = {**plan.fixed, **params, 'checkpoint_dir': str(plan.folder), 'name': f'trial-{trial.number}'}
    try:
        check_options(DefaultConfig().check_values(run))
    except UserError as e:  # values that do not go together, such as AlexNet at 32 px: nothing to train
        print(f'trial {trial.number} pruned ({e})')
        raise optuna.TrialPruned(str(e)) from None
    run.setdefault('env', f'{plan.folder.name}-trial-{trial.number}')  # visdom: trials of two sweeps apart
    kept = Kept(trial, plan.metric, share)
    state, note = 'failed', ''
    try:
        train(share(run), kept.report)
        state = 'complete'
        return kept.value
    except optuna.TrialPruned as e:
        state, note = 'pruned', str(e)
        raise
    except Diverged as e:
        state, note = 'pruned', str(e).split(';')[0]
        raise optuna.TrialPruned(note) from None
    except KeyboardInterrupt:
        note = 'interrupted'
        raise
    except Exception:
        trial.set_user_attr('error', True)  # the same options would fail again: not retried
        raise
    finally:
        if (plan.folder / run['name']).is_dir():  # not when it failed before its run began
            TrialRecord(trial.number, state, kept.value, plan.metric, params, note).save(plan.folder / run['name'])
        figure = f': {METRICS[plan.metric][0]} {kept.value:.4f}' if kept.value is not None else ''
        print(f'trial {trial.number} {state}{figure}' + (f' ({note})' if note else ''))


def counted(running=False):
    """The trial states that count toward --trials; running=True: with the trials under way."""
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED) + ((TrialState.RUNNING,) if running else ())


class Kept:
    """A trial's figure of its best.pth's weights (the best validation accuracy, the later of a tie),
    reported to Optuna every epoch: train's on_epoch, which ends a trial the pruner stops."""

    def __init__(self, trial, metric, share):
        self.trial, self.metric, self.share = trial, metric, share
        self.accuracy, self.value = -1.0, None

    def report(self, epoch, metrics, last):
        import optuna

        stop = None
        if not math.isfinite(metrics[self.metric]):
            stop = f'the validation {METRICS[self.metric][0]} became {metrics[self.metric]} in epoch {epoch + 1}'
        else:
            if metrics['accuracy'] >= self.accuracy:
                self.accuracy, self.value = metrics['accuracy'], metrics[self.metric]
            self.trial.report(self.value, epoch)
            # a trial that has trained all its epochs (or stopped early) is complete, whatever the others did
            if not last and self.trial.should_prune():
                stop = f'behind the median after epoch {epoch + 1}'
        if self.share(stop) is not None:  # every epoch, so that the other processes stop with this one
            raise optuna.TrialPruned(stop)


def open_study(plan, storage, command):
    """The sweep's Optuna study, made or loaded; trials whose process died are marked failed."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's outcome is printed by run_sweep
    folder, name = plan.folder, plan.folder.name
    folder.mkdir(parents=True, exist_ok=True)
    url = str(storage) if storage else f'sqlite:///{folder / "study.db"}'

    def failed(study, trial):
        run = folder / f'trial-{trial.number}'
        if run.is_dir():
            note = 'its process stopped answering'
            TrialRecord(trial.number, 'failed', None, plan.metric, trial.params, note).save(run)

    for attempt in range(3):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental
                warnings.simplefilter('ignore')
                study = optuna.create_study(
                    storage=optuna.storages.RDBStorage(
                        url,
                        # two processes on one SQLite file wait for each other's writes
                        engine_kwargs={'connect_args': {'timeout': 60}} if url.startswith('sqlite') else None,
                        heartbeat_interval=HEARTBEAT,
                        grace_period=GRACE,
                        heartbeat_stale_trial_callback=failed,
                    ),
                    study_name=name,
                    direction=METRICS[plan.metric][1],
                    load_if_exists=True,
                    pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
                )
                optuna.storages.fail_stale_trials(study)
            break
        except (ImportError, ValueError, SQLAlchemyError) as e:
            # processes making one new database at once: those that lose find it made a moment later
            if attempt == 2 or not isinstance(e, SQLAlchemyError):
                reason = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
                raise UserError(f'--storage={url}: Optuna cannot open it ({reason})') from None
            time.sleep(1)
    stored = study.user_attrs.get('command')
    if stored is None:
        study.set_user_attr('command', command)
    elif stored != command:
        raise UserError(
            f'sweep {name} was made with another --space, --metric or options; give this one another --name'
        )
    SweepRecord(command['space'], plan.metric).save(folder)
    return study


class Surplus(Exception):
    """A trial started after the study already held all the trials asked for."""


class Stopped(Exception):
    """Rank 0 pruned the trial: the other processes of a torchrun stop it too."""


def print_trials(study, dimensions, label, seconds):
    """The table of the study's trials: state, best figure, epochs, time and the options drawn."""
    rows = [('trial', 'state', label, 'epochs', 'seconds', *(d.name for d in dimensions))]
    for t in study.get_trials(deepcopy=False):
        values = list(t.intermediate_values.values())
        took = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        state = 'failed' if t.state.name == 'FAIL' else t.state.name.lower()  # as trial.json and runs say
        row = [t.number, state, values[-1] if values else None, len(values), took and round(took)]
        if not t.user_attrs.get('surplus'):
            row += [t.params.get(d.name) for d in dimensions]
            rows.append(['-' if v is None else f'{v:.4g}' if isinstance(v, float) else str(v) for v in row])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f'\ntrials of sweep {study.study_name} ({seconds:.0f}s in this process):')
    for row in rows:
        print('  '.join(text.ljust(width) for text, width in zip(row, widths)).rstrip())
