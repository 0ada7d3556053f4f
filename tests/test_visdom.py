"""Live curves in a real visdom server (started offline by tools.visdom_server), seen through
visdom's own API and in a headless Chromium; and what training does when no server answers."""

import base64
import io
import json
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
import utils.visualize
from conftest import CHROMIUM, as_flags, fast_options, headless, newest_run, run_main
from tools.visdom_server import start
from training import report
from utils.visualize import Visualizer

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m 'not slow'` leaves them out


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    port = free_port()
    process = start(port, tmp_path_factory.mktemp('visdom-envs'))
    yield port
    process.terminate()
    process.wait(timeout=30)


def window(port, env, name):
    import visdom

    client = visdom.Visdom(port=port, use_incoming_socket=False, raise_exceptions=True)
    data = client.get_window_data(name, env=env)
    return json.loads(data) if data else None


def points(port, env, name):
    """{line name: number of points} of a line chart."""
    content = window(port, env, name)['content']
    return {trace.get('name'): len(trace['x']) for trace in content['data']}


def train_with_visdom(tmp_path, data, port, env, **more):
    # 28 training images, batch 4: 7 steps an epoch, a loss point every 2 steps = 3 an epoch
    main.train(
        **fast_options(
            tmp_path, data, vis=True, vis_port=port, env=env, model='ResNet34', batch_size=4, print_freq=2, **more
        )
    )


def test_a_training_run_shows_its_curves_matrix_log_and_worst_images(tmp_path, tiny_data, server):
    train_with_visdom(tmp_path, tiny_data, server, 'run', max_epoch=2)
    assert list(points(server, 'run', 'train_loss').values()) == [6]
    assert list(points(server, 'run', 'val_accuracy').values()) == [2]
    assert list(points(server, 'run', 'lr').values()) == [2]
    assert points(server, 'run', 'loss') == {'train': 2, 'val': 2}
    assert window(server, 'run', 'confusion')['type'] == 'plot'
    log = window(server, 'run', 'log')['content']
    assert log.count('epoch 1/2') == 1 and log.count('epoch 2/2') == 1

    last = json.loads((newest_run(tmp_path / 'checkpoints') / 'metrics.jsonl').read_text().splitlines()[-1])
    wrong = last['confusion'][0][1] + last['confusion'][1][0]
    grid = window(server, 'run', 'most wrong (validation)')
    if wrong == 0:
        assert grid is None
    else:
        assert grid['type'] == 'image' and grid['content']['src'].startswith('data:image/png;base64,')
        # the captions are written under the pictures; the window has one line about them
        assert grid['content']['caption'] == 'validation images wrong with the most confidence'
        png = base64.b64decode(grid['content']['src'].split(',', 1)[1])
        rows = (min(wrong, 16) + 3) // 4
        tile = 128 + 2 + 11  # a picture and a line of caption under it, visdom's padding around
        assert rows * tile < Image.open(io.BytesIO(png)).height < rows * (tile + 8)


def test_most_wrong_captions_name_the_file_and_the_probability_or_both_classes(tmp_path, tiny_data):
    from data import DogCat

    data = DogCat(tiny_data / 'train', 'val', 32)
    labels = torch.tensor(data.targets)
    p = torch.linspace(0.9, 0.6, len(labels))  # every image said to be what it is not, less and less sure
    probs = torch.stack([torch.where(labels == 0, 1 - p, p), torch.where(labels == 0, p, 1 - p)], dim=1)
    metrics = {'probs': probs, 'labels': labels, 'indices': torch.arange(len(labels))}
    two = report.most_wrong(data, metrics, ['cat', 'dog'], count=5)
    captions = [caption for _, caption in two]
    assert all(re.fullmatch(r'(cat|dog)\.\d+\.jpg P\(dog\)=\d\.\d\d', c) for c in captions), captions
    assert [float(c[-4:]) for c in captions] == [
        round(1 - float(q), 2) if t else round(float(q), 2) for q, t in zip(p[:5], labels[:5])
    ]
    three = report.most_wrong(
        data, {**metrics, 'probs': torch.cat([probs, torch.zeros(len(labels), 1)], 1)}, ['cat', 'dog', 'fox'], count=2
    )
    assert [c for _, c in three][
        0
    ] == f'{Path(data.paths[0]).name} {["cat", "dog"][labels[0]]}->{["cat", "dog"][1 - labels[0]]} 0.90'


def test_each_run_plots_into_its_own_environment_and_a_resumed_one_adds(tmp_path, tiny_data, server):
    train_with_visdom(tmp_path, tiny_data, server, '', max_epoch=2, name='first')
    train_with_visdom(tmp_path, tiny_data, server, '', max_epoch=1, name='second')
    assert list(points(server, 'second', 'train_loss').values()) == [3]
    train_with_visdom(tmp_path, tiny_data, server, '', max_epoch=2, resume='latest')
    assert list(points(server, 'second', 'train_loss').values()) == [6]
    assert list(points(server, 'second', 'val_accuracy').values()) == [2]
    assert 'epoch 2/2' in window(server, 'second', 'log')['content']
    # a new run never erased an older run's curves
    assert list(points(server, 'first', 'train_loss').values()) == [6]
    assert list(points(server, 'first', 'val_accuracy').values()) == [2]


@pytest.mark.skipif(CHROMIUM is None, reason='needs Chromium (.ci/run installs it with apt-get)')
def test_the_page_draws_the_plots_in_a_real_browser(tmp_path, one_picture, server):
    # one picture under every name: half the validation images are wrong, so the most-wrong
    # window must be on the page
    train_with_visdom(tmp_path, one_picture, server, 'browser', max_epoch=2)
    last = json.loads((newest_run(tmp_path / 'checkpoints') / 'metrics.jsonl').read_text().splitlines()[-1])
    assert last['confusion'][0][1] + last['confusion'][1][0] > 0
    flags = headless(tmp_path / 'chromium', '--window-size=1600,1300', '--virtual-time-budget=20000')
    url = f'http://127.0.0.1:{server}/env/browser'
    dom = subprocess.run([CHROMIUM, *flags, '--dump-dom', url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="main-svg"') >= 5  # Plotly drew the charts, not just the HTML
    lines = re.findall(r'class="js-line"[^>]*d="([^"]+)"', dom)
    vertices = sorted(path.count('L') + 1 for path in lines)
    assert 6 in vertices  # train_loss: its 6 points, drawn
    assert dom.count('class="point"') >= 6  # markers: a chart of one point shows it too
    assert 'most wrong (validation)' in dom and 'data:image/png;base64' in dom
    assert 'P(dog)=' not in dom  # the captions are in the picture, not listed twice around it
    # the confusion matrix: a count in every cell, the first class on top, whole labels
    counts = [int(n) for n in re.findall(r'class="annotation-text"[^>]*data-unformatted="(\d+)"', dom)]
    assert sorted(counts) == sorted(n for row in last['confusion'] for n in row)
    ticks = {}  # y tick label -> its height on the page
    for tag in re.findall(r'<g class="ytick"><text([^>]*)>', dom):
        label, place = re.search(r'data-unformatted="([^"]*)"', tag), re.search(r'translate\(0,([\d.]+)\)', tag)
        if label and place:
            ticks[label[1]] = float(place[1])
    assert ticks['cat'] < ticks['dog']  # rows as in the terminal's table: cat above dog
    assert 'data-unformatted="predicted"' in dom and 'data-unformatted="true"' in dom
    # the learning rate on a log axis, not a flat line at 0 on -1...1
    assert window(server, 'browser', 'lr')['content']['layout']['yaxis']['type'] == 'log'
    shot = tmp_path / 'page.png'
    subprocess.run([CHROMIUM, *flags, f'--screenshot={shot}', url], capture_output=True, timeout=120)
    from PIL import Image

    image = Image.open(shot).convert('RGB')
    colours = image.getcolors(maxcolors=image.width * image.height)  # never None: room for every pixel
    assert len(colours) > 200  # charts, text and pictures, not a blank page


@pytest.mark.skipif(CHROMIUM is None, reason='needs Chromium (.ci/run installs it with apt-get)')
def test_the_most_wrong_window_shows_all_four_rows_of_captions_in_a_browser(tmp_path, server):
    # 16 pictures in four rows: grey, then red in the last row, each captioned in black below it
    items = [(Image.new('RGB', (64, 64), 'red' if i >= 12 else 'grey'), f'dog.{i}.jpg P(dog)=0.01') for i in range(16)]
    vis = Visualizer('rows', 'http://127.0.0.1', server)
    vis.captioned_images('most wrong (validation)', items)
    vis.close()
    shot = tmp_path / 'page.png'
    flags = headless(tmp_path / 'chromium', '--window-size=1200,1000', '--virtual-time-budget=20000')
    subprocess.run([CHROMIUM, *flags, f'--screenshot={shot}', f'http://127.0.0.1:{server}/env/rows'], timeout=120)
    page = torch.from_numpy(np.array(Image.open(shot).convert('RGB'))).int()
    red = (page[..., 0] > 200) & (page[..., 1] < 60) & (page[..., 2] < 60)
    rows, columns = red.any(dim=1).nonzero()[:, 0], red.any(dim=0).nonzero()[:, 0]
    assert len(rows) > 20, 'the last row of pictures is not on the page'
    bottom, left, right = rows.max().item(), columns.min().item(), columns.max().item()
    # under the red pictures, their captions: dark text on white, within the window
    below = page[bottom + 1 : bottom + 1 + 3 * 11, left : right + 1]
    assert (below.amax(dim=-1) < 100).sum() > 50, 'the last row of captions is cut off'


def test_without_a_server_training_runs_with_one_warning(tmp_path, tiny_data):
    options = fast_options(tmp_path, tiny_data, vis=True, vis_port=free_port(), max_epoch=2)
    result = run_main('train', *as_flags(options))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count('warning: no visdom server answers') == 1
    assert 'Traceback' not in result.stderr and 'Exception' not in result.stderr
    assert 'epoch 2/2' in result.stdout


def test_a_server_that_never_answers_does_not_hang_training(tmp_path, tiny_data, monkeypatch, capsys):
    monkeypatch.setattr(utils.visualize, 'TIMEOUT_SECONDS', 0.5)
    with socket.socket() as silent:  # accepts connections, never replies
        silent.bind(('127.0.0.1', 0))
        silent.listen(100)
        main.train(**fast_options(tmp_path, tiny_data, vis=True, vis_port=silent.getsockname()[1]))
    assert capsys.readouterr().err.count('warning: no visdom server answers') == 1


def test_the_runs_of_one_process_warn_once_about_a_missing_server(capsys):
    port = free_port()
    for env in ('kfold-fold-1', 'kfold-fold-2', 'kfold'):  # a kfold's folds, then its suspect labels
        vis = Visualizer(env=env, port=port)
        vis.plot('curve', 1.0)
        vis.close()
    assert capsys.readouterr().err.count('no visdom server answers') == 1


def test_plotting_resumes_when_the_server_comes_back(tmp_path, monkeypatch, capsys):
    port = free_port()
    vis = Visualizer(env='back', port=port)
    vis.plot('curve', 1.0)
    vis.close()  # wait for the sender
    assert 'no visdom server answers' in capsys.readouterr().err
    process = start(port, tmp_path / 'envs')
    try:
        vis.plot('curve', 2.0)  # still inside the quiet period: dropped, no waiting
        vis.close()
        vis.next_try = 0  # the quiet period is over
        vis.plot('curve', 3.0)
        vis.plot('curve', 4.0)
        vis.close()
        assert list(points(port, 'back', 'curve').values()) == [2]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_stalled_server_holds_up_neither_plotting_nor_its_points(tmp_path, monkeypatch):
    monkeypatch.setattr(utils.visualize, 'TIMEOUT_SECONDS', 30)
    port = free_port()
    process = start(port, tmp_path / 'envs')
    vis = Visualizer(env='stall', port=port)
    try:
        vis.plot('curve', 0.0)
        vis.close()
        process.send_signal(signal.SIGSTOP)  # the server takes connections and answers none
        started = time.monotonic()
        for x in range(1, 6):
            vis.plot('curve', float(x))
        seconds = time.monotonic() - started  # posting from this thread took 60 s (TIMEOUT_SECONDS twice)
        process.send_signal(signal.SIGCONT)
        vis.close()
        assert seconds < utils.visualize.TIMEOUT_SECONDS / 2  # one post waiting on the server takes all of it
        assert list(points(port, 'stall', 'curve').values()) == [6]
        assert ('http://127.0.0.1', port) not in utils.visualize.WARNED
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(timeout=30)


def test_the_server_listens_on_loopback_only(server):
    listening = subprocess.run(['ss', '-ltn'], capture_output=True, text=True).stdout
    assert f'127.0.0.1:{server} ' in listening
    assert f'0.0.0.0:{server} ' not in listening and f'*:{server} ' not in listening


def test_plot_many_and_img_many_make_their_windows(server):
    import torch

    vis = Visualizer(env='api', port=server)
    vis.plot_many({'a': 1.0, 'b': 2.0})
    vis.plot_many({'a': 1.5, 'b': 2.5})
    vis.img_many({'one': torch.rand(3, 16, 16), 'grid': torch.rand(4, 3, 16, 16)})
    vis.close()
    assert list(points(server, 'api', 'a').values()) == [2] and list(points(server, 'api', 'b').values()) == [2]
    assert window(server, 'api', 'one')['type'] == 'image' and window(server, 'api', 'grid')['type'] == 'image'
    assert ('http://127.0.0.1', server) not in utils.visualize.WARNED
