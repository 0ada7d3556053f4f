"""The runs verb: the training runs in checkpoint_dir, newest first, and the options that set
them apart. It reads config.json and metrics.jsonl only, so it answers at once."""

import json
import sys

from config import NOT_RECIPE

# options that name where things go or how fast they run, not what was trained
NOT_TELLING = {
    'env',
    'vis',
    'vis_server',
    'vis_port',
    'tensorboard',
    'checkpoint_dir',
    'name',
    'result_file',
    'resume',
    'load_model_path',
    'num_workers',
    'nice_workers',
    'print_freq',
    'debug_file',
    'use_gpu',
    'test_data_root',
    'tta',
}


def list_runs(checkpoint_dir):
    """[{name, model, classes, epochs, max_epoch, best_accuracy, log_loss, started, interrupted,
    options}] of the runs in checkpoint_dir, newest first."""
    runs = []
    for folder in sorted(checkpoint_dir.iterdir()) if checkpoint_dir.is_dir() else []:
        config = folder / 'config.json'
        if folder.is_symlink() or not config.is_file():
            continue
        try:
            made = json.loads(config.read_text())
            metrics = folder / 'metrics.jsonl'
            records = (
                [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                if metrics.is_file()
                else []
            )
        except (OSError, ValueError) as e:  # a file cut short by a kill or a full disk: say so, list the others
            print(f'{folder.name}: cannot be read ({type(e).__name__})', file=sys.stderr)
            continue
        best = max(records, key=lambda r: r['val_accuracy'], default=None)
        runs.append(
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
            }
        )
    return sorted(runs, key=lambda r: (r['started'], r['name']), reverse=True)


def differing_options(runs):
    """The options whose values differ between `runs` (model and max_epoch are shown anyway)."""
    keys = {key for run in runs for key in run['options']} - NOT_RECIPE - {'model', 'max_epoch'}
    return sorted(key for key in keys if len({repr(run['options'].get(key)) for run in runs}) > 1)


def print_runs(checkpoint_dir):
    found = list_runs(checkpoint_dir)
    if not found:
        print(f'no runs in {checkpoint_dir} yet: python main.py train makes one')
    differing = differing_options(found)
    for entry in found:
        best = (
            'not validated yet'
            if entry['best_accuracy'] is None
            else f'best acc {entry["best_accuracy"]:.2%}  log loss {entry["log_loss"]:.4f}'
        )
        apart = ' '.join(f'{key}={entry["options"].get(key)}' for key in differing)
        print(
            f'{entry["name"]}  {entry["model"]}  {",".join(entry["classes"])}  '
            f'{entry["epochs"]}/{entry["max_epoch"]} epochs  {best}  started {entry["started"]}'
            + (f'  interrupted {entry["interrupted"]}' if entry['interrupted'] else '')
            + (f'  {apart}' if apart else '')
        )
