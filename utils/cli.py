"""The command line: python-fire dispatches the verbs; mistakes a user can make become one line."""
import sys

import fire

from utils import UserError


def run(verbs, argv=None):
    """Call the verb named in argv with its --options; exit 2 on a UserError, 130 on Ctrl-C."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or any(word in ('-h', '--help') for word in argv):
        argv = ['help']  # ours lists every option; fire's cannot see inside **kwargs
    try:
        _reject_stray_words(argv)
        fire.Fire(verbs, command=argv, name='main.py')
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)


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
