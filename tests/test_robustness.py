"""Bad data, bad options and interruptions: the run goes on or stops cleanly, nothing is lost."""

import csv
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import main
from config import UserError
from conftest import ROOT, as_flags, assert_one_line_error, fast_options, newest_run, run_main
from data.decode import load_rgb
from models import ResNet34, SqueezeNet
from training.checkpoint import load_weights
from training.report import read_metrics
from utils.files import atomic_open, atomic_save, load_checkpoint


def jpeg_bytes(size=(60, 40), color=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new('RGB', size, color).save(buffer, format='JPEG')
    return buffer.getvalue()


def add_bad_files(folder, sample_name):
    """Fill `folder` with every kind of trouble a real download has.

    sample_name(i) gives a file name that counts as a sample. Returns (names that must be
    skipped as unreadable, names that must be ignored as not samples).
    """
    unreadable = {
        sample_name(900): b'',  # zero bytes
        sample_name(901): jpeg_bytes()[:200],  # truncated JPEG
        sample_name(902): b'this is not an image\n',  # text named .jpg
        sample_name(903): np.random.default_rng(0).bytes(5000),  # random bytes
    }
    for name, content in unreadable.items():
        (folder / name).write_bytes(content)
    # a decompression bomb (over the pixel limit the test sets below)
    Image.new('L', (1500, 1500)).save(folder / sample_name(904).replace('.jpg', '.png'))

    readable = [
        (sample_name(910), Image.new('RGB', (50, 50), 'blue'), 'PNG'),  # a PNG named .jpg
        (sample_name(911), Image.new('L', (50, 40), 90), 'JPEG'),  # grayscale
        (sample_name(912), Image.new('CMYK', (50, 40), (0, 50, 90, 0)), 'JPEG'),
        (sample_name(913).replace('.jpg', '.png'), Image.new('RGBA', (40, 50), (9, 9, 9, 0)), 'PNG'),
        (
            sample_name(914).replace('.jpg', '.png'),
            Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16)),
            'PNG',
        ),  # 16-bit
        (sample_name(915).replace('.jpg', '.png'), Image.new('P', (30, 30), 3), 'PNG'),  # palette
        (sample_name(916), Image.new('RGB', (1, 1), 'red'), 'JPEG'),  # 1x1
        (sample_name(917), Image.new('RGB', (600, 3), 'red'), 'JPEG'),  # extreme aspect ratio
        (sample_name(918).upper(), Image.new('RGB', (40, 40), 'red'), 'JPEG'),  # CAT.918.JPG
        (sample_name(919).replace('.jpg', '.jpeg'), Image.new('RGB', (40, 40)), 'JPEG'),
    ]
    for name, image, kind in readable:
        image.save(folder / name, format=kind)
    rotated = Image.new('RGB', (60, 30), 'green')
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90° to display"
    rotated.save(folder / sample_name(920), exif=exif)

    ignored = {'.DS_Store', 'Thumbs.db', 'sub', 'cat.jpg', 'photo.png', 'dog.x.jpg', 'notes.txt', sample_name(930)}
    (folder / '.DS_Store').write_bytes(b'\0\0\0\1Bud1')
    (folder / 'Thumbs.db').write_bytes(b'\xd0\xcf\x11\xe0')
    (folder / 'sub').mkdir()
    (folder / 'sub' / sample_name(931)).write_bytes(jpeg_bytes())
    for name in ('cat.jpg', 'photo.png', 'dog.x.jpg'):
        (folder / name).write_bytes(jpeg_bytes())
    (folder / 'notes.txt').write_text('downloaded from kaggle')
    os.symlink(folder / 'missing-target.jpg', folder / sample_name(930))  # a broken link
    return set(unreadable) | {sample_name(904).replace('.jpg', '.png')}, ignored


@pytest.fixture
def messy_data(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1_000_000)
    root = tmp_path / 'messy'
    shutil.copytree(tiny_data, root)
    train_bad, train_ignored = add_bad_files(root / 'train', lambda i: f'{"cat" if i % 2 else "dog"}.{i}.jpg')
    test_bad, test_ignored = add_bad_files(root / 'test1', lambda i: f'{i}.jpg')
    return root, train_bad, train_ignored, test_bad, test_ignored


def test_training_and_test_run_through_a_messy_folder(tmp_path, messy_data, capsys):
    root, train_bad, train_ignored, test_bad, test_ignored = messy_data
    main.train(**fast_options(tmp_path, root, max_epoch=1, val_ratio=0.5))
    out = capsys.readouterr().out
    record = json.loads((newest_run(tmp_path / 'checkpoints') / 'metrics.jsonl').read_text())
    assert record['skipped'] == len(train_bad)  # train and val halves together
    assert f'{len(train_ignored)} other entries ignored' in out
    assert f'skipped {len(train_bad)} unreadable' in out

    main.test(**fast_options(tmp_path, root, load_model_path=str(newest_run(tmp_path / 'checkpoints') / 'last.pth')))
    out = capsys.readouterr().out
    with open(tmp_path / 'result.csv', newline='') as f:
        ids = [int(row['id']) for row in csv.DictReader(f)]
    expected = set(range(1, 9)) | set(range(910, 921))
    assert sorted(ids) == sorted(expected)
    assert f'could not read {len(test_bad)} images' in out
    # photo.png beside the N.jpg, say: said, not dropped unseen
    assert f'left out {len(test_ignored)} other entries of {root / "test1"}: ' in out


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new('RGB', (60, 30))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / 'r.jpg', exif=exif)
    assert load_rgb(tmp_path / 'r.jpg').size == (30, 60)


def test_16_bit_images_keep_their_brightness(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / 'g.png')
    assert np.asarray(load_rgb(tmp_path / 'g.png')).mean() == pytest.approx(128, abs=1)


def test_a_batch_left_with_one_image_by_a_bad_file_trains_on(tmp_path, tiny_data):
    train = tmp_path / 'train'
    train.mkdir()
    for name in ('cat.0.jpg', 'dog.0.jpg'):
        shutil.copy(tiny_data / 'train' / name, train / name)
    (train / 'cat.1.jpg').write_bytes(b'')  # beside a good one in a batch of 2, it leaves that one alone
    # ResNet34 at 32 px: the last BatchNorm sees a 1x1 map, which one image cannot train it on
    main.train(**fast_options(tmp_path, tiny_data, train_data_root=str(train), val_data_root=str(tiny_data / 'train'),
                              model='ResNet34', batch_size=2, max_epoch=3))  # fmt: skip
    assert [r['skipped'] for r in read_metrics(newest_run(tmp_path / 'checkpoints'))] != [0, 0, 0]


def test_a_folder_whose_images_all_fail_names_it(tmp_path):
    folder = tmp_path / 'test1'
    folder.mkdir()
    for i in (1, 2):
        (folder / f'{i}.jpg').write_bytes(b'')
    model = SqueezeNet().save(tmp_path / 'w.pth')
    with pytest.raises(UserError, match=f'none of the 2 images in {folder} could be read'):
        main.test(**fast_options(tmp_path, tmp_path, test_data_root=str(folder), load_model_path=str(model)))


@pytest.mark.slow
def test_bad_checkpoints_through_the_command_line(tmp_path, tiny_data):
    (tmp_path / 'notes.pth').write_text('not a checkpoint')
    assert_one_line_error(
        run_main('test', f'--load_model_path={tmp_path}/notes.pth', '--use_gpu=False'),
        'notes.pth is not a PyTorch checkpoint',
    )

    torch.save(
        {'model': SqueezeNet().state_dict(), 'classes': ['cat', 'dog'], 'config': {'model': 'SqueezeNet'}},
        tmp_path / 'sq.pth',
    )
    assert_one_line_error(
        run_main('test', f'--load_model_path={tmp_path}/sq.pth', '--model=AlexNet'),
        "--model='AlexNet' conflicts with",
        "model='SqueezeNet'",
    )

    class RunsCode:
        def __reduce__(self):
            return os.system, (f'touch {tmp_path}/hacked',)

    torch.save({'model': RunsCode()}, tmp_path / 'evil.pth')
    assert_one_line_error(run_main('test', f'--load_model_path={tmp_path}/evil.pth'), 'evil.pth is refused')
    assert not (tmp_path / 'hacked').exists()


@pytest.mark.slow
def test_an_output_folder_that_cannot_be_written_stops_the_run_before_its_work(tmp_path, tiny_data):
    taken = tmp_path / 'taken'  # a file where a folder should be: mkdir fails even for root
    taken.write_text('not a folder')
    torch.save(
        {'model': SqueezeNet().state_dict(), 'classes': ['cat', 'dog'], 'config': {'model': 'SqueezeNet'}},
        tmp_path / 'sq.pth',
    )
    result = run_main(
        'test',
        f'--load_model_path={tmp_path}/sq.pth',
        f'--test_data_root={tiny_data}/test1',
        f'--result_file={taken}/result.csv',
        '--image_size=64',
        '--use_gpu=False',
    )
    assert_one_line_error(result, f'--result_file: cannot write in {taken} ({taken} is a file)')
    assert 'predictions' not in result.stdout

    result = run_main('train', *as_flags(fast_options(tmp_path, tiny_data, checkpoint_dir=str(taken / 'ckpt'))))
    assert_one_line_error(result, f'--checkpoint_dir: cannot write in {taken}/ckpt ({taken} is a file)')
    assert 'epoch 1/' not in result.stdout

    result = run_main(
        'predict',
        f'{tiny_data}/test1/1.jpg',
        f'--load_model_path={tmp_path}/sq.pth',
        f'--out={taken}/mine.csv',
        '--image_size=64',
        '--use_gpu=False',
    )
    assert_one_line_error(result, f'--out: cannot write in {taken} ({taken} is a file)')

    # the last line of defence, for a folder that goes away mid-run: the write itself
    with pytest.raises(UserError, match=rf'could not write {taken}/result.csv \({taken} is a file\); the previous'):
        with atomic_open(taken / 'result.csv', 'w') as f:
            f.write('id,label\n')


def test_resume_with_a_conflicting_option_says_which(tmp_path, tiny_data):
    main.train(**fast_options(tmp_path, tiny_data))
    options = fast_options(
        tmp_path, tiny_data, max_epoch=2, image_size=48, resume=str(newest_run(tmp_path / 'checkpoints') / 'last.pth')
    )
    assert_one_line_error(
        run_main('train', *as_flags(options)), '--image_size=48 conflicts with', 'image_size=32', 'drop --image_size'
    )


def test_a_non_finite_loss_stops_with_the_epoch_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data, monkeypatch):
    steps = 0

    class LossGoesNan(torch.nn.CrossEntropyLoss):
        def forward(self, logits, targets):
            nonlocal steps
            steps += 1
            loss = super().forward(logits, targets)
            return loss * float('nan') if steps > 4 else loss  # 4 steps = the first epoch

    monkeypatch.setattr(torch.nn, 'CrossEntropyLoss', LossGoesNan)
    with pytest.raises(UserError, match=r"epoch 2 \(steps 1-2\); try a lower --lr; the run's last.pth holds epoch 1,"):
        main.train(**fast_options(tmp_path, tiny_data, max_epoch=3))
    last = load_checkpoint(newest_run(tmp_path / 'checkpoints') / 'last.pth')
    assert last['epoch'] == 0
    assert all(torch.isfinite(t).all() for t in last['model'].values() if t.is_floating_point())


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'last.pth'
    atomic_save({'epoch': 1}, path)

    def full_disk(fd):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', full_disk)
    with pytest.raises(UserError, match=r'could not write .*last.pth \(No space left on device\); the previous'):
        atomic_save({'epoch': 2}, path)
    assert load_checkpoint(path) == {'epoch': 1}
    assert os.listdir(tmp_path) == ['last.pth']


@pytest.fixture
def small_disk(tmp_path, tiny_data):
    """A tmpfs that holds one last.pth of the fast options' model, measured here, but not two."""
    main.train(**fast_options(tmp_path / 'measure', tiny_data))
    size = (newest_run(tmp_path / 'measure' / 'checkpoints') / 'last.pth').stat().st_size
    mount = tmp_path / 'small-disk'
    mount.mkdir()
    made = subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', f'size={size * 3 // 2}', 'tmpfs', str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f'a full disk needs a small tmpfs, and mount refused: {made.stderr.decode().strip()}')
    yield mount
    subprocess.run(['umount', str(mount)])


@pytest.mark.slow
def test_a_really_full_disk_stops_training_with_a_clear_error(tmp_path, tiny_data, small_disk):
    options = fast_options(tmp_path, tiny_data, max_epoch=3, checkpoint_dir=str(small_disk))
    result = run_main('train', *as_flags(options))
    assert result.returncode == 2
    assert 'error: could not write' in result.stderr and 'is the disk full?' in result.stderr
    assert load_checkpoint(newest_run(small_disk) / 'last.pth')['epoch'] == 0
    assert not list(small_disk.glob('*/.*.tmp'))


def start_training(tmp_path, tiny_data, **more):
    """`main.py train` in a session of its own, as a terminal runs a command: a signal to its
    process group reaches the loader workers too."""
    options = fast_options(tmp_path, tiny_data, max_epoch=200, **more)
    return subprocess.Popen(
        [sys.executable, str(ROOT / 'main.py'), 'train', *as_flags(options)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(condition, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.001)


def identity(path):
    """What changes when a file is replaced, read without loading it: a reload of a 250 MB
    checkpoint every millisecond would slow the very run being watched."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns


@pytest.mark.slow
def test_sigkill_mid_save_or_mid_epoch_leaves_a_loadable_last_checkpoint(tmp_path, tiny_data):
    checkpoints = tmp_path / 'checkpoints' / 'killed'  # the run's folder
    last = checkpoints / 'last.pth'
    writing = lambda: list(checkpoints.glob('.last.pth.*.tmp'))  # noqa: E731
    kills = []
    while len(kills) < 3:
        where = ('mid-save', 'mid-epoch', 'mid-save')[len(kills)]
        resume = {'resume': str(last)} if last.exists() else {'name': 'killed'}
        process = start_training(tmp_path, tiny_data, model='ResNet34', **resume)  # big files: slow saves
        try:
            before = identity(last)
            stale = set(writing())
            assert not stale or resume, stale
            if where == 'mid-save':
                wait_for(lambda: last.exists() and set(writing()) - stale, process)  # noqa: B023 (called at once)
            else:
                wait_for(lambda: identity(last) not in (None, before) and not set(writing()) - stale, process)  # noqa: B023
                time.sleep(0.2)
        finally:
            process.kill()
            process.communicate()
        if where == 'mid-save' and not writing():
            continue  # the save finished between the look and the kill: try again
        kills.append(where)
        assert not stale & set(writing()), 'a new run removes what a killed save left'
        state = load_checkpoint(last)
        assert set(state) >= {'model', 'optimizer', 'config'}
        load_weights(ResNet34(), last)
    assert kills == ['mid-save', 'mid-epoch', 'mid-save']


def alive(marker):
    found = subprocess.run(['pgrep', '-f', marker], capture_output=True, text=True)
    return found.stdout.split()


@pytest.mark.slow
@pytest.mark.parametrize('signum, code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_keep_the_last_epoch_flag_the_run_and_stop_the_workers(tmp_path, tiny_data, signum, code):
    last = tmp_path / 'checkpoints' / 'stopped' / 'last.pth'
    process = start_training(tmp_path, tiny_data, num_workers=2, name='stopped')
    try:
        wait_for(lambda: last.exists(), process)
        time.sleep(0.3)  # into the next epoch
        if signum == signal.SIGINT:
            os.killpg(process.pid, signum)  # Ctrl-C: the terminal signals the whole process group
        else:
            process.send_signal(signum)  # `kill PID`, a scheduler: the main process alone
        out, err = process.communicate(timeout=60)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert process.returncode == code, err
    assert f'stopped by {signal.Signals(signum).name}' in err and 'Traceback' not in err
    state = load_checkpoint(last)  # the last finished epoch, untouched by the stop
    config = last.parent / 'config.json'
    assert json.loads(config.read_text())['interrupted'] == f'during epoch {state["epoch"] + 2}'
    assert f'holds epoch {state["epoch"] + 1}: --resume=' in out
    time.sleep(0.5)
    assert not alive(str(tmp_path / 'checkpoints')), 'DataLoader workers outlived the run'

    options = fast_options(tmp_path, tiny_data, max_epoch=state['epoch'] + 2, resume=str(last))
    resumed = run_main('train', *as_flags(options))
    assert resumed.returncode == 0, resumed.stderr
    assert f'resuming {last}: epoch {state["epoch"] + 2}' in resumed.stdout
    assert 'interrupted' not in json.loads(config.read_text())


def test_a_signal_during_a_save_waits_for_the_save_to_finish(tmp_path, monkeypatch):
    from utils import Interrupted, raise_interrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    real_save = torch.save

    def save_and_get_killed(obj, f):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the write
        real_save(obj, f)

    monkeypatch.setattr(torch, 'save', save_and_get_killed)
    try:
        with pytest.raises(Interrupted):
            atomic_save({'epoch': 3}, tmp_path / 'last.pth')
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert load_checkpoint(tmp_path / 'last.pth') == {'epoch': 3}  # written whole, then stopped


def test_a_signal_during_an_epochs_save_keeps_its_line_in_the_metrics(tmp_path, tiny_data, monkeypatch):
    from utils import Interrupted, raise_interrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    real_save = torch.save

    def save_and_get_killed(obj, f):
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler stops the run while epoch 1 is saved
        real_save(obj, f)

    monkeypatch.setattr(torch, 'save', save_and_get_killed)
    options = fast_options(tmp_path, tiny_data, max_epoch=2, name='stopped')
    try:
        with pytest.raises(Interrupted):
            main.train(**options)
    finally:
        signal.signal(signal.SIGTERM, previous)
    run = tmp_path / 'checkpoints' / 'stopped'
    assert load_checkpoint(run / 'last.pth')['epoch'] == 0
    monkeypatch.setattr(torch, 'save', real_save)
    main.train(**{**options, 'name': '', 'resume': 'stopped'})
    assert [json.loads(line)['epoch'] for line in (run / 'metrics.jsonl').read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize('umask', [0o022, 0o077], ids=['umask022', 'umask077'])
def test_checkpoints_and_the_submission_get_the_permissions_a_plain_write_gives(tmp_path, umask):
    # written through a temporary file and a rename, yet readable by whoever the umask allows,
    # as torch.save or open() would leave them
    old = os.umask(umask)
    try:
        atomic_save({'epoch': 1}, tmp_path / 'last.pth')
        with atomic_open(tmp_path / 'result.csv', 'w') as f:
            f.write('id,label\n')
    finally:
        os.umask(old)
    for name in ('last.pth', 'result.csv'):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
