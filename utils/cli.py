"""The command line: python-fire dispatches the verbs; mistakes a user can make become one line."""

import ast
import bdb
import dataclasses
import os
import signal
import sys
from pathlib import Path

import fire

from config import DefaultConfig, UserError, option_help, unknown
from utils import raise_interrupt


def run(verbs):
    """Call the verb named on the command line, whose words answer_early() has checked, with its
    --options. Exit codes: 2 for a UserError; 128 + the signal's number when interrupted (130 for
    Ctrl-C, 143 for SIGTERM), as a shell reports it, or when the output's reader has gone (141)."""
    if int(os.environ.get('RANK', 0)) > 0:
        sys.stdout = open(os.devnull, 'w')  # under torchrun, rank 0 alone talks; errors still show
    signal.signal(signal.SIGINT, raise_interrupt)
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        fire.Fire(verbs, command=sys.argv[1:], name='main.py')
        _flush_stdout()
    except BrokenPipeError:
        _reader_gone()
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


def answer_early(main_file, argv):
    """`help`, and a mistyped verb, option or value, answered before main.py imports torch:
    at once instead of seconds later. Anything else returns to main.py, which runs it."""
    try:
        # ours lists every option; fire's cannot see inside **kwargs
        if not argv or argv[0] == 'help' or any(word in ('-h', '--help') for word in argv):
            print_help(main_file)
            _flush_stdout()
            sys.exit(0)
        check_words(main_file, argv)
    except BrokenPipeError:
        _reader_gone()
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


def _flush_stdout():
    # here, not at exit, where a reader gone (`| head`) would print a traceback; None: started with it closed
    if sys.stdout is not None:
        sys.stdout.flush()


def _reader_gone():
    """The program reading our output (`| head`) has stopped: stop without a traceback, as a shell's
    tools do, with the exit code of a writer that SIGPIPE stopped (the idiom of Python's signal docs)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else Python's flush at exit fails again
    sys.exit(128 + getattr(signal, 'SIGPIPE', 13))


@dataclasses.dataclass
class Verb:
    doc: str
    options: dict  # its own: {name: default}
    takes_config: bool  # **options: every field of DefaultConfig
    takes_words: bool  # *paths


def verbs_of(main_file):
    """{verb: Verb} read from main.py's source (its VERBS table and the functions it names),
    so that help and the checks need none of the imports main.py makes."""
    tree = ast.parse(Path(main_file).read_text(encoding='utf-8'))
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    table = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], 'id', None) == 'VERBS'
    )
    verbs = {}
    for key, value in zip(table.keys, table.values):
        args = functions[value.id].args
        with_defaults = args.args[len(args.args) - len(args.defaults) :]
        options = {a.arg: ast.literal_eval(d) for a, d in zip(with_defaults, args.defaults)}
        options.update((a.arg, ast.literal_eval(d)) for a, d in zip(args.kwonlyargs, args.kw_defaults))
        verbs[key.value] = Verb(
            ast.get_docstring(functions[value.id]), options, args.kwarg is not None, args.vararg is not None
        )
    return verbs


def check_words(main_file, argv):
    """Raise a UserError for a verb, option or option value that is not one, naming the closest."""
    verbs = verbs_of(main_file)
    verb = verbs.get(argv[0])
    if verb is None:
        raise unknown('verb', argv[0], verbs)
    options = {*(f.name for f in dataclasses.fields(DefaultConfig) if verb.takes_config), *verb.options}
    given = {}
    for word, following in zip(argv[1:], argv[2:] + ['']):
        if word == '--':
            break
        if word.startswith('--'):
            name, _, value = word[2:].partition('=')
            name = name.replace('-', '_')
            if name not in options:
                raise unknown('option', name, options, prefix='--')
            if name not in verb.options:
                given[name] = (
                    value if '=' in word else following if following and not following.startswith('-') else True
                )
    if verb.takes_config:
        DefaultConfig().check_values(given)
    if not verb.takes_words:
        _reject_stray_words(argv)


def print_help(main_file):
    """The verbs, each with its own options, and the options of DefaultConfig."""
    print('usage: python main.py VERB [--option=value ...]   (--some-option works too)\n\nverbs:')
    for name, verb in verbs_of(main_file).items():
        doc = verb.doc.splitlines()
        print(f'  {name:<10} {doc[0]}')
        meanings = dict(line.split(': ', 1) for line in doc if line.startswith('--'))
        for option, default in verb.options.items():
            print(f'{"":14}--{option:<12} {default!r:<14} {meanings.get("--" + option, "")}')
    print('\noptions of DefaultConfig, which every verb but demo_data and help takes (default, meaning):')
    for name, (default, comment) in option_help().items():
        print(f'  --{name:<16} {default!r:<18} {comment}')


def _reject_stray_words(argv):
    """Refuse a word that is neither the verb nor an option's value: fire would call the verb first
    and complain after, so `main.py train 0.1` (a forgotten --lr=) would train with the defaults."""
    takes_value = False
    for word in argv[1:]:
        if word == '--':  # fire's own flags follow
            return
        if word.startswith('-'):
            takes_value = '=' not in word
        elif takes_value:
            takes_value = False
        else:
            raise UserError(f'unexpected word {word!r}: options are written --name=value')
