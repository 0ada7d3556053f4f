"""The command line: python-fire dispatches the verbs; mistakes a user can make become one line."""
import bdb
import dataclasses
import inspect
import os
import signal
import sys

import fire

from utils import UserError, raise_interrupt, unknown


def run(verbs, argv=None):
    """Call the verb named in argv with its --options.

    Exit codes: 2 for a UserError (one line, no traceback); 128 + the signal's number when
    interrupted (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a killed command.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or any(word in ('-h', '--help') for word in argv):
        argv = ['help']  # ours lists every option; fire's cannot see inside **kwargs
    if int(os.environ.get('RANK', 0)) > 0:
        sys.stdout = open(os.devnull, 'w')  # under torchrun, rank 0 alone talks; errors still show
    signal.signal(signal.SIGINT, raise_interrupt)
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        verb = verbs.get(argv[0])
        if verb is None:
            raise unknown('verb', argv[0], verbs)
        _check_options(argv[1:], verb_options(verb))
        if not any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(verb).parameters.values()):
            _reject_stray_words(argv)
        fire.Fire(verbs, command=argv, name='main.py')
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        signum = getattr(e, 'signum', signal.SIGINT)
        print(f'stopped by {signal.Signals(signum).name}', file=sys.stderr)
        sys.exit(128 + signum)
    except bdb.BdbQuit:
        print('quit from the debugger', file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def verb_options(verb, own=False):
    """{option: default} that `verb` takes: its own keyword parameters, and (unless `own`) every
    field of DefaultConfig when it takes **options."""
    from config import DefaultConfig

    options, params = {}, inspect.signature(verb).parameters.values()
    for p in params:
        if p.kind is p.VAR_KEYWORD and not own:
            options.update((f.name, getattr(DefaultConfig(), f.name)) for f in dataclasses.fields(DefaultConfig))
        elif p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            options[p.name] = p.default
    return options


def _check_options(words, options):
    """Refuse an option `verb` does not take, naming the closest it does (before fire, whose own
    message for a verb's parameters names nothing)."""
    for word in words:
        if word == '--':
            return
        if word.startswith('--'):
            name = word[2:].split('=', 1)[0].replace('-', '_')
            if name not in options:
                raise unknown('option', name, options, prefix='--')


def _reject_stray_words(argv):
    """Refuse a word that is neither the verb nor an option's value.

    Fire would call the verb first and complain about the word after, so `main.py train 0.1`
    (a forgotten --lr=) would train with the defaults before it said anything.
    """
    takes_value = False
    for word in argv[1:]:
        if word == '--':  # fire's own flags follow
            return
        if word.startswith('-'):
            takes_value = '=' not in word
        elif takes_value:
            takes_value = False
        else:
            raise UserError(f"unexpected word {word!r}: options are written --name=value")
