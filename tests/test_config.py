import ast
import re

import pytest

import main
from config import ROOT, DefaultConfig, UserError, option_help


def test_overrides_are_applied_with_their_types():
    cfg = DefaultConfig().parse({'lr': 0.01, 'use_gpu': False, 'batch_size': 8, 'env': 123})
    assert (cfg.lr, cfg.use_gpu, cfg.batch_size, cfg.env) == (0.01, False, 8, '123')


def test_dashes_work_like_underscores():
    cfg = DefaultConfig().parse({'batch-size': 4, 'use-gpu': True, 'max-epoch': 3})
    assert (cfg.batch_size, cfg.use_gpu, cfg.max_epoch) == (4, True, 3)


@pytest.mark.parametrize('text, expected', [('True', True), ('false', False), ('yes', True), ('0', False)])
def test_bool_options_accept_words(text, expected):
    assert DefaultConfig().parse({'vis': text}).vis is expected


def test_unknown_option_names_the_closest_valid_ones():
    with pytest.raises(UserError, match=r'--lr_decy.*did you mean --lr_decay'):
        DefaultConfig().parse({'lr_decy': 0.5})


def test_unknown_option_far_from_any_points_to_help():
    with pytest.raises(UserError, match='main.py help'):
        DefaultConfig().parse({'zzzzzz': 1})


@pytest.mark.parametrize(
    'key, value, message',
    [
        ('lr', 'abc', r"--lr='abc' is invalid; it takes a number"),
        ('lr', -1, r'--lr=-1.0 is invalid; it takes a number > 0'),
        ('lr', 0, r'--lr=0.0 is invalid'),
        ('lr', 'inf', r"--lr='inf' is invalid; it takes a finite number"),
        ('clip_grad_norm', float('nan'), r'--clip_grad_norm=nan is invalid; it takes a finite number'),
        ('name', True, r'^--name takes a value: --name=\.\.\.$'),  # `--name` alone, which fire reads as True
        ('seed', -1, r'--seed=-1 is invalid; it takes a whole number from 0 to 4294967295'),
        ('seed', 2**32, r'--seed=4294967296 is invalid'),
        ('max_epoch', 0, r'--max_epoch=0 is invalid; it takes a whole number >= 1'),  # not --warmup_epochs's rule
        ('batch_size', 0, r'--batch_size=0 is invalid; it takes a whole number >= 1'),
        ('batch_size', 2.5, r'--batch_size=2.5 is invalid; it takes a whole number'),
        ('batch_size', -(10**400), r'--batch_size=-1000.* is invalid; it takes a whole number >= 1'),  # no overflow
        ('use_gpu', 'maybe', r'--use_gpu=.maybe. is invalid; it takes True or False'),
        ('model', 'ResNet35', r'--model=.ResNet35. is invalid; it takes one of ResNet34, SqueezeNet, AlexNet'),
        ('val_ratio', 1.0, r'--val_ratio=1.0 is invalid'),
        ('auto_augment', 'ta_wide', r"--auto_augment='ta_wide' is invalid; it takes trivial, rand or augmix"),
        ('random_erase', 1.5, r'--random_erase=1.5 is invalid; it takes a number in \[0, 1\]'),
        ('image_column', 'name', r"--image_column='name' is invalid; it takes a column of the CSV of --train_labels"),
    ],
)
def test_bad_values_name_the_option_and_what_it_accepts(key, value, message):
    with pytest.raises(UserError, match=message):
        main.options({key: value})  # what every verb does with its options


def test_image_size_too_small_for_the_model():
    with pytest.raises(UserError, match='>= 63 for AlexNet'):
        main.options({'model': 'AlexNet', 'image_size': 32})


def project_imports(path):
    """The modules of the project that the file at `path` imports, at any depth of its code."""
    ours = {p.stem for p in ROOT.iterdir() if p.suffix == '.py' or (p / '__init__.py').exists()}
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split('.')[0])
    return names & ours


FLOORS = {'main': 4, 'verbs': 3, 'training': 2, 'models': 1, 'data': 1, 'utils': 1, 'config': 0}


def test_imports_run_one_way():
    """main.py on top, imported by nothing; config.py at the bottom, importing nothing of ours; in
    between each floor imports only the floors below it and its own package, except that no verb
    imports another: main -> verbs -> training -> models, data, utils -> config."""
    assert project_imports(ROOT / 'config.py') == set()
    sources = [p for p in ROOT.rglob('*.py') if not {'tests', '.venv'} & set(p.relative_to(ROOT).parts)]
    assert [p.relative_to(ROOT) for p in sources if 'main' in project_imports(p) and p.name != 'main.py'] == []
    upward = []
    for path in sources:
        package = path.relative_to(ROOT).parts[0].removesuffix('.py')
        for name in project_imports(path) if package in FLOORS else ():  # tools/ stand outside
            same_floor = (
                FLOORS[name] == FLOORS[package]
                and package != 'verbs'
                and (name == package or package in {'models', 'data', 'utils'})
            )
            if not (FLOORS[name] < FLOORS[package] or same_floor):
                upward.append(f'{path.relative_to(ROOT)} imports {name}')
    assert upward == []


def test_missing_folder_is_named(tmp_path):
    cfg = DefaultConfig().parse({'train_data_root': str(tmp_path / 'nowhere')})
    with pytest.raises(UserError, match=f'--train_data_root: folder {tmp_path / "nowhere"} does not exist'):
        cfg.require_dir('train_data_root')


def test_relative_paths_are_taken_from_the_project_folder(monkeypatch, tmp_path):
    from config import ROOT

    monkeypatch.chdir(tmp_path)
    assert DefaultConfig().path('debug_file') == ROOT / 'tmp' / 'debug'


def test_parse_prints_the_effective_config_once(capsys):
    DefaultConfig().parse({'lr': 0.5})
    out = capsys.readouterr().out
    assert out.count('config:') == 1 and 'lr=0.5' in out
    assert 'seed=' not in out  # only what differs from the defaults


def test_inherit_takes_stored_values_unless_given():
    cfg = DefaultConfig().parse({'batch_size': 4})
    cfg.inherit({'model': 'AlexNet', 'image_size': 96, 'batch_size': 64}, ('model', 'image_size'), 'ck.pth')
    assert (cfg.model, cfg.image_size, cfg.batch_size) == ('AlexNet', 96, 4)


def test_inherit_refuses_a_conflicting_given_value():
    cfg = DefaultConfig().parse({'model': 'ResNet34'})
    with pytest.raises(UserError, match=r"--model='ResNet34' conflicts with ck.pth.*model='AlexNet'"):
        cfg.inherit({'model': 'AlexNet'}, ('model',), 'ck.pth')


def test_every_option_has_a_comment_for_help():
    options = option_help()
    assert set(options) >= {
        'env',
        'vis_port',
        'model',
        'train_data_root',
        'test_data_root',
        'load_model_path',
        'batch_size',
        'use_gpu',
        'num_workers',
        'print_freq',
        'debug_file',
        'result_file',
        'max_epoch',
        'lr',
        'lr_decay',
        'weight_decay',
        'image_size',
        'seed',
    }
    assert all(comment for _, comment in options.values()), options


def test_to_dict_is_plain_values():
    values = DefaultConfig().to_dict().values()
    assert all(isinstance(v, (str, int, float, bool)) for v in values)


def test_the_readmes_option_table_shows_real_options_with_their_defaults():
    # the README keeps the most used options; `python main.py help` lists them all (test_cli)
    from config import ROOT

    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    rows = re.findall(r'^\| `(\w+)` \| `?([^|`]*?)`? \| (.+) \|$', readme, flags=re.M)
    options = option_help()
    assert len(rows) >= 8
    for name, default, meaning in rows:
        assert name in options, name
        assert default == str(options[name][0]) and meaning == options[name][1], name


def test_amp_alone_turns_it_on():
    assert DefaultConfig().check_values({'amp': True}).amp == 'True'  # `--amp`, which fire reads as True
