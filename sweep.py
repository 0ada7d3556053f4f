"""The sweep verb: Optuna picks the options of each trial from a search space, and every trial is
an ordinary training run in the sweep's folder, checkpoints/<sweep>/trial-<n>/.

The study lives in <sweep>/study.db unless --storage names another; any number of processes
started with the same command share it and split the trials, and the same command started
again continues it. Each trial reports its best validation figure every epoch, and a median
pruner stops those that fall behind; a trial whose loss becomes NaN or infinite is pruned too.
Under torchrun every process trains each trial: rank 0 alone talks to the study and hands the
others the trial's options and, after every epoch, whether to stop.
"""

import dataclasses
import hashlib
import json
import math
import os
import shlex
import time
import warnings

from config import NOT_RECIPE, DefaultConfig, UserError, unknown
from models import check_options
from utils.files import atomic_open
from utils.run_folders import point_latest
from utils.runtime import runtime

FORMS = 'name=LOW..HIGH, name=LOW..HIGH:log or name=A|B|C'
METRICS = {'log_loss': ('log loss', 'minimize'), 'accuracy': ('accuracy', 'maximize')}
HEARTBEAT = 20  # seconds between a running trial's signs of life in the storage
GRACE = 60  # a trial silent this long lost its process (a kill, a crash): it is marked failed
DIVERGED = 'the loss became'  # how engine's UserError for a NaN or infinite training loss begins


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
    """The Dimension of one word of --space, or a UserError naming it. Each choice and each end
    of a range is checked as the option given alone would be, beside the fixed options (a
    model's smallest image size, say)."""
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
        cfg = DefaultConfig()
        try:
            cfg.check_values({**fixed, name: raw})
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


def run_sweep(options, space, trials, metric, storage, train):
    """Run trials of train(options, on_epoch) until the study holds `trials` finished ones."""
    options = {key.replace('-', '_'): value for key, value in options.items()}
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise UserError(f'--trials={trials!r} is invalid; it takes a whole number >= 1')
    if metric not in METRICS:
        raise UserError(f'--metric={metric!r} is invalid; it takes {" or ".join(METRICS)}')
    if 'resume' in options:
        raise UserError('--resume: a sweep continues when the same command is started again')
    fixed = {key: value for key, value in options.items() if key != 'name'}
    base = DefaultConfig()
    base.check_values(fixed)
    check_options(base)
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
    if name in ('.', '..', 'latest') or '/' in name or '\\' in name:
        raise UserError(f'--name={name}: a sweep name is a folder name, without / or \\')
    folder = base.path('checkpoint_dir') / name
    if (folder / 'config.json').exists():
        raise UserError(f'--name={name}: {folder} is a training run, not a sweep; choose another name')
    direction = METRICS[metric][1]
    if int(os.environ.get('WORLD_SIZE', 1)) == 1:
        study = open_study(folder, storage, name, direction, command, metric)
        return lead(study, folder, base, fixed, dimensions, metric=metric, trials=trials, train=train)
    with runtime(base.use_gpu) as rt:  # one process group, which every trial's training uses
        if not rt.is_main:
            return follow(rt, train)
        try:
            study = open_study(folder, storage, name, direction, command, metric)
        except UserError as e:
            rt.broadcast(str(e))  # the other processes end with it, rather than wait to be killed
            raise
        lead(study, folder, base, fixed, dimensions, metric=metric, trials=trials, train=train, share=rt.broadcast)
        rt.broadcast(None)  # the end: the other processes stop waiting for a trial


def follow(rt, train):
    """A process of rank > 0 under torchrun: trains each trial's options that rank 0 hands it,
    and stops a trial when rank 0 says so; rank 0's text instead of options is its error."""

    def report(epoch, metrics, trial_rt):
        if rt.broadcast(None) is not None:
            raise Stopped

    while (run := rt.broadcast(None)) is not None:
        if isinstance(run, str):
            raise UserError(run)
        try:
            train(run, report)
        except Stopped:
            pass
        except UserError as e:
            if not str(e).startswith(DIVERGED):  # a diverged trial: rank 0 prunes it too
                raise


def lead(study, folder, base, fixed, dimensions, *, metric, trials, train, share=lambda obj: obj):
    """The sweep as rank 0 (or the only process) runs it: trials of `study` until it holds
    `trials` finished ones. Under torchrun share() hands each trial's options, and after each
    epoch whether to stop, to the other processes (it returns rank 0's object on every rank)."""
    name, (label, direction) = folder.name, METRICS[metric]

    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    counted = (*finished_states, TrialState.RUNNING)  # other processes' running trials count too
    pick = min if direction == 'minimize' else max

    def objective(trial):
        # a seed per trial: the same command draws the same trials, processes sharing a study draw apart
        study.sampler = optuna.samplers.TPESampler(seed=base.seed * 100_003 + trial.number)
        if sum(t.number < trial.number for t in study.get_trials(deepcopy=False, states=counted)) >= trials:
            study.stop()  # another process took the last trial meanwhile
            trial.set_user_attr('surplus', True)
            raise Surplus
        params = {d.name: d.suggest(trial) for d in dimensions}
        print(f'\nsweep {name}: trial {trial.number}, ' + ' '.join(f'{k}={v}' for k, v in params.items()))
        values, state, note = [], 'failed', ''

        def report(epoch, metrics, rt):
            stop = None
            if not math.isfinite(metrics[metric]):
                stop = f'the validation {label} became {metrics[metric]} in epoch {epoch + 1}'
            else:
                values.append(metrics[metric])
                trial.report(pick(values), epoch)
                if trial.should_prune():
                    stop = f'behind the median after epoch {epoch + 1}'
            if share(stop) is not None:  # every epoch, so that the other processes stop with this one
                raise optuna.TrialPruned(stop)

        run = {**fixed, **params, 'checkpoint_dir': str(folder), 'name': f'trial-{trial.number}'}
        run.setdefault('env', f'{name}-trial-{trial.number}')  # visdom: trials of two sweeps apart
        try:
            train(share(run), report)
            state = 'complete'
            return pick(values)
        except optuna.TrialPruned as e:
            state, note = 'pruned', str(e)
            raise
        except UserError as e:
            if not str(e).startswith(DIVERGED):
                raise
            state, note = 'pruned', str(e).split(';')[0]
            raise optuna.TrialPruned(note) from None
        except KeyboardInterrupt:
            note = 'interrupted'
            raise
        finally:
            write_trial(folder, trial.number, state, pick(values, default=None), metric, params, note)
            figure = f': {label} {pick(values):.4f}' if values else ''
            print(f'trial {trial.number} {state}{figure}' + (f' ({note})' if note else ''))

    finished = len(study.get_trials(deepcopy=False, states=finished_states))
    aim = 'minimised' if direction == 'minimize' else 'maximised'
    print(f'sweep {folder}: {finished} of {trials} trials finished, {label} {aim}; the same command continues it')
    started = time.perf_counter()
    try:
        if finished < trials:
            study.optimize(
                objective, n_trials=trials - finished, catch=(Surplus,), callbacks=[MaxTrialsCallback(trials, counted)]
            )
    finally:
        print_trials(study, dimensions, label, time.perf_counter() - started)
        if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            best, again = study.best_trial, {**fixed, **study.best_trial.params}
            run = folder / f'trial-{best.number}'
            print(f'best: trial {best.number}, {label} {best.value:.4f}, in {run}:')
            print('python main.py train ' + ' '.join(shlex.quote(f'--{k}={v}') for k, v in again.items()))
            if run.is_dir():  # not when it ran on another machine: val, test and predict take it by default
                point_latest(base.path('checkpoint_dir'), run)


def open_study(folder, storage, name, direction, command, metric):
    """The sweep's Optuna study, made or loaded; trials whose process died are marked failed."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's outcome is printed by run_sweep
    folder.mkdir(parents=True, exist_ok=True)
    url = str(storage) if storage else f'sqlite:///{folder / "study.db"}'

    def failed(study, trial):
        write_trial(folder, trial.number, 'failed', None, metric, trial.params, 'its process stopped answering')

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
                    direction=direction,
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
    with atomic_open(folder / 'sweep.json', 'w') as f:
        json.dump({'space': command['space'], 'metric': metric}, f, indent=2)
    return study


class Surplus(Exception):
    """A trial started after the study already held all the trials asked for."""


class Stopped(Exception):
    """Rank 0 pruned the trial: the other processes of a torchrun stop it too."""


def write_trial(folder, number, state, value, metric, params, note):
    """trial.json in the trial's folder (when it got one that far): what `runs` shows of it."""
    run = folder / f'trial-{number}'
    if run.is_dir():
        record = {'number': number, 'state': state, 'value': value, 'metric': metric, 'params': params, 'note': note}
        with atomic_open(run / 'trial.json', 'w') as f:
            json.dump(record, f, indent=2)


def print_trials(study, dimensions, label, seconds):
    """The table of the study's trials: state, best figure, epochs, time and the options drawn."""

    def cell(value):
        return '-' if value is None else f'{value:.4g}' if isinstance(value, float) else str(value)

    rows = [('trial', 'state', label, 'epochs', 'seconds', *(d.name for d in dimensions))]
    for t in study.get_trials(deepcopy=False):
        values = list(t.intermediate_values.values())
        took = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        row = [t.number, t.state.name.lower(), values[-1] if values else None, len(values), took and round(took)]
        if not t.user_attrs.get('surplus'):
            rows.append([cell(value) for value in row + [t.params.get(d.name) for d in dimensions]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f'\ntrials of sweep {study.study_name} ({seconds:.0f}s in this process):')
    for row in rows:
        print('  '.join(text.ljust(width) for text, width in zip(row, widths)).rstrip())
