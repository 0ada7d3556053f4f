"""The runs verb: the training runs in checkpoint_dir, newest first, and the options that set
them apart; a folder of runs (a sweep's trials, a kfold's folds) as one entry with its runs
beneath it. It reads the runs' JSON files only, so it answers at once."""

import collections
import sys

from config import NOT_RECIPE, UserError
from training.report import read_metrics
from utils.run_folders import KfoldRecord, SweepRecord, TrialRecord, read_config


def list_runs(checkpoint_dir):
    """read_run()'s entries of the runs in checkpoint_dir, newest first; a folder of run folders
    (a sweep's trials, a kfold's folds) is one entry {name, started, sweep, kfold, members}."""
    runs = []
    for folder in sorted(checkpoint_dir.iterdir()) if checkpoint_dir.is_dir() else []:
        if folder.is_symlink() or not folder.is_dir():
            continue
        if (folder / 'config.json').is_file():
            runs += read_run(folder)
            continue
        members = [run for sub in sorted(folder.iterdir()) if (sub / 'config.json').is_file() for run in read_run(sub)]
        if members:
            try:
                sweep, made = SweepRecord.load(folder), KfoldRecord.load(folder)
            except UserError as e:
                print(e, file=sys.stderr)
                sweep = made = None
            for member in members if sweep else []:
                member['trial'] = member['trial'] or TrialRecord(-1, 'running', None, sweep.metric, {})  # until it ends
            members.sort(key=lambda r: (r['started'], r['name']))  # in the order they ran
            runs.append({'name': folder.name, 'started': members[-1]['started'], 'sweep': sweep, 'kfold': made,
                         'members': members})  # fmt: skip
    return sorted(runs, key=lambda r: (r['started'], r['name']), reverse=True)


def read_run(folder):
    """[the listing's entry of the run in `folder`], or [] when its files cannot be read."""
    try:
        made, records, trial = read_config(folder), read_metrics(folder), TrialRecord.load(folder)
    except (OSError, ValueError, TypeError, KeyError, UserError) as e:  # a file cut short: say so, list the others
        print(f'{folder.name}: cannot be read ({type(e).__name__})', file=sys.stderr)
        return []
    # the epoch best.pth holds: of the best accuracy, the later of a tie
    best = max(reversed(records), key=lambda r: r['val_accuracy'], default=None)
    return [
        {
            'name': folder.name,
            'model': made['options']['model'],
            'classes': made['classes'],
            'epochs': records[-1]['epoch'] if records else 0,
            'max_epoch': made['options']['max_epoch'],
            'best_accuracy': best and best['val_accuracy'],
            'log_loss': best and best['val_log_loss'],
            'started': made['started'],
            'interrupted': made.get('interrupted'),
            'options': made['options'],
            'trial': trial,
        }
    ]


def differing_options(runs):
    """The options whose values differ between `runs` (model and max_epoch are shown anyway)."""
    keys = {key for run in runs for key in run['options']} - NOT_RECIPE - {'model', 'max_epoch'}
    return sorted(key for key in keys if len({repr(run['options'].get(key)) for run in runs}) > 1)


def print_runs(checkpoint_dir):
    found = list_runs(checkpoint_dir)
    if not found:
        print(f'no runs in {checkpoint_dir} yet: python main.py train makes one')
    differing = differing_options([entry for entry in found if 'members' not in entry])
    for entry in found:
        if 'members' not in entry:
            print(run_line(entry, differing))
            continue
        print(f'{entry["name"]}/  {group_line(entry)}')
        apart = differing_options(entry['members'])
        for member in entry['members']:
            print('  ' + run_line(member, apart))


def group_line(entry):
    """What a folder of runs is: a sweep with its trials' states, a kfold with its figures, or runs."""
    members, sweep, made = entry['members'], entry['sweep'], entry['kfold']
    if sweep:
        states = collections.Counter(member['trial'].state for member in members)
        counts = ', '.join(f'{n} {state}' for state, n in sorted(states.items()))
        return f'sweep of {len(members)} trials ({counts}), {sweep.metric} on ' + ' '.join(sweep.space)
    if made:
        oof = made.oof
        return f'kfold of {len(members)}/{made.folds} folds, ' + (
            f'out-of-fold acc {oof["accuracy"]:.2%}  log loss {oof["log_loss"]:.4f}  {oof["suspects"]} suspect labels'
            if oof
            else 'no out-of-fold predictions yet'
        )
    return f'{len(members)} runs'


def run_line(entry, differing):
    """A run's line: its figures, and its values of the options in `differing`."""
    best = 'not validated yet'
    if entry['best_accuracy'] is not None:
        best = f'best acc {entry["best_accuracy"]:.2%}  log loss {entry["log_loss"]:.4f}'
    trial = entry['trial']
    state = trial.state + (f' {trial.metric} {trial.value:.4f}' if trial.value is not None else '') if trial else ''
    apart = ' '.join(f'{key}={entry["options"].get(key)}' for key in differing)
    return (
        f'{entry["name"]}  ' + (f'{state}  ' if state else '') + f'{entry["model"]}  {",".join(entry["classes"])}  '
        f'{entry["epochs"]}/{entry["max_epoch"]} epochs  {best}  started {entry["started"]}'
        + (f'  interrupted {entry["interrupted"]}' if entry['interrupted'] else '')
        + (f'  {apart}' if apart else '')
    )
