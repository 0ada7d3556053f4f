"""`python main.py serve` as a person and a program meet it: the page in a real browser, the JSON
endpoint under many requests at once, and every bad input a 4xx that stops nothing."""

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

import main
from config import UserError
from conftest import ROOT, fast_options, newest_run
from models import build_model

pytestmark = pytest.mark.slow  # a server in a process of its own

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_data):
    """(run folder, photos, predict(photos, **more) -> {photo name: (label, P(dog))} as `predict` writes
    them, the server's flags) of a one-epoch run."""
    tmp = tmp_path_factory.mktemp('serve')
    options = fast_options(tmp, tiny_data)
    main.train(**options)
    run = newest_run(tmp / 'checkpoints')
    photos = sorted((tiny_data / 'test1').glob('*.jpg')) + sorted((tiny_data / 'train').glob('*.jpg'))[:8]

    def predicted(photos, **more):
        main.predict(*map(str, photos), out=str(tmp / 'predict.csv'), **options, load_model_path=str(run), **more)
        with open(tmp / 'predict.csv', newline='') as f:
            return {Path(path).name: (label, float(p)) for path, label, p in list(csv.reader(f))[1:]}

    flags = ['--max_mb=1', f'--checkpoint_dir={tmp / "checkpoints"}', '--use_gpu=False', '--amp=False']
    return run, photos, predicted, flags


@pytest.fixture(scope='module')
def served(trained):
    """(address, photos, {photo name: (label, P(dog))} as `predict` wrote them) of a server of a
    one-epoch run, taking images of up to 1 MB; stopped, all its processes, at the end."""
    run, photos, predicted, flags = trained
    expected = predicted(photos)
    with serving(run, *flags) as (address, server):
        yield address, photos, expected, server


@contextlib.contextmanager
def serving(run, *flags):
    """(address, process) of `python main.py serve RUN FLAGS` on a free port, for the length of the
    block; stopped, all its processes, at the end."""
    port = free_port()
    command = [sys.executable, str(ROOT / 'main.py'), 'serve', str(run), f'--port={port}', *flags]
    server = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    address, line = f'http://127.0.0.1:{port}', ''
    watchdog = threading.Timer(180, os.killpg, (server.pid, signal.SIGKILL))  # a server that never starts
    watchdog.start()
    try:
        for line in server.stdout:  # it says where it listens once it does
            if line.startswith('serving '):
                break
        watchdog.cancel()
        assert f'on {address}/' in line, line
        threading.Thread(target=server.stdout.read, daemon=True).start()  # keep its pipe from filling
        yield address, server
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def post(address, *files):
    """POST /predict with `files`, each a path or (name, bytes)."""
    parts = [('files', (f.name, f.read_bytes()) if isinstance(f, Path) else f) for f in files]
    return requests.post(f'{address}/predict', files=parts, timeout=120)


def assert_as_predicted(answer, photos, expected):
    assert [a['name'] for a in answer] == [p.name for p in photos]
    for a in answer:
        label, p_dog = expected[a['name']]
        assert a['label'] == label and set(a['probabilities']) == {'cat', 'dog'}
        assert abs(a['probabilities']['dog'] - p_dog) <= 1e-4  # predict's CSV has 4 places
        assert abs(sum(a['probabilities'].values()) - 1) < 1e-5


def test_fifty_requests_at_once_each_get_predicts_answer(served):
    address, photos, expected, _ = served
    # most send one photo, some several: the batches mix requests of both kinds
    requests_ = [
        [photos[i % len(photos)]] if i % 5 else [photos[(i + k) % len(photos)] for k in range(3)] for i in range(50)
    ]
    start = threading.Barrier(50)

    def send(files):
        start.wait()
        response = post(address, *files)
        return files, response.status_code, response.json()

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(send, requests_))
    for files, status, answer in answers:
        assert status == 200, answer
        assert_as_predicted(answer, files, expected)


def test_with_tta_it_answers_as_predict_with_tta_does(trained):
    run, photos, predicted, flags = trained
    photos = photos[:4]
    expected = predicted(photos, tta=True)
    assert expected != predicted(photos)  # the mirror images count: a server that left them out would differ
    with serving(run, *flags, '--tta=True') as (address, _):
        assert_as_predicted(post(address, *photos).json(), photos, expected)


def bomb(width, height):
    """A PNG of a few bytes that says it holds width x height pixels."""
    png = io.BytesIO()
    from PIL import Image

    Image.new('L', (8, 8)).save(png, 'PNG')
    data = bytearray(png.getvalue())
    data[16:24] = struct.pack('>II', width, height)  # IHDR's width and height, then its checksum
    data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_every_bad_input_is_a_4xx_and_the_next_request_is_served(served):
    address, photos, expected, server = served
    jpeg = photos[0].read_bytes()
    bad = [
        ([('notes.jpg', b'just some text')], 415, 'notes.jpg is not an image'),
        ([('cut.jpg', jpeg[: len(jpeg) // 2])], 422, 'cut.jpg is a broken image'),
        ([('empty.jpg', b'')], 400, 'empty.jpg is empty'),
        ([('huge.jpg', os.urandom(1_500_000))], 413, 'huge.jpg is over the 1 MB'),
        ([photos[1], ('huge.jpg', jpeg * (1_100_000 // len(jpeg) + 1))], 413, 'huge.jpg is over the 1 MB'),
        ([('bomb.png', bomb(30_000, 30_000))], 413, 'bomb.png has more pixels than the 50,000,000'),
        ([('large.png', bomb(8_000, 8_000))], 413, 'large.png has more pixels than the 50,000,000'),
    ]
    for files, status, detail in bad:
        response = post(address, *files)
        assert (response.status_code, detail) == (status, response.json()['detail'][: len(detail)])
        assert_as_predicted(post(address, photos[2]).json(), [photos[2]], expected)
    for request in (dict(), dict(files={'note': (None, 'no file here')}), dict(data=b'{}')):
        response = requests.post(f'{address}/predict', timeout=60, **request)
        assert response.status_code == 400 and 'multipart/form-data' in response.json()['detail'], response.text
        assert_as_predicted(post(address, photos[3]).json(), [photos[3]], expected)
    assert server.poll() is None


def test_a_bad_image_beside_good_ones_gets_its_own_answer(served):
    address, photos, expected, _ = served
    response = post(address, photos[1], ('notes.jpg', b'text'), photos[2], ('cut.jpg', photos[0].read_bytes()[:300]))
    assert response.status_code == 200, response.text
    good, notes, good_too, cut = response.json()
    assert_as_predicted([good, good_too], [photos[1], photos[2]], expected)
    detail = 'notes.jpg is not an image (JPEG, PNG or another format Pillow reads)'
    assert notes == {'name': 'notes.jpg', 'error': detail, 'status': 415}
    assert cut['name'] == 'cut.jpg' and cut['status'] == 422 and cut['error'].startswith('cut.jpg is a broken image')
    response = post(address, ('notes.jpg', b'text'), ('empty.jpg', b''))  # no good image: the request fails
    assert response.status_code == 415 and response.json()['detail'].startswith('notes.jpg is not an image')


@pytest.mark.skipif(CHROMIUM is None, reason='needs Chromium (.ci/run installs it with apt-get)')
def test_a_person_picks_a_photo_and_sees_its_class(served, tmp_path):
    address, photos, expected, _ = served
    import websocket

    profile = tmp_path / 'chromium'
    browser = subprocess.Popen(
        [
            CHROMIUM,
            '--headless',
            '--no-sandbox',
            '--disable-gpu',
            '--no-first-run',
            '--disable-background-networking',
            '--disable-component-update',
            '--disable-sync',
            f'--user-data-dir={profile}',
            '--remote-debugging-port=0',
            f'{address}/',
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (profile / 'DevToolsActivePort').exists() or not (profile / 'DevToolsActivePort').read_text():
            assert time.monotonic() < deadline and browser.poll() is None, 'Chromium did not start'
            time.sleep(0.2)
        debugger = int((profile / 'DevToolsActivePort').read_text().split()[0])
        target = next(
            t for t in requests.get(f'http://127.0.0.1:{debugger}/json/list', timeout=30).json() if t['type'] == 'page'
        )
        page = websocket.create_connection(target['webSocketDebuggerUrl'], timeout=60, suppress_origin=True)
        calls = iter(range(1, 10**6))

        def call(method, **params):
            """Chrome DevTools Protocol: send a command, return its result (events are skipped)."""
            number = next(calls)
            page.send(json.dumps({'id': number, 'method': method, 'params': params}))
            while (message := json.loads(page.recv())).get('id') != number:
                pass
            assert 'error' not in message, message
            return message['result']

        def shown(script):
            return call('Runtime.evaluate', expression=script, returnByValue=True)['result'].get('value')

        while shown("document.readyState === 'complete' && !!document.getElementById('files')") is not True:
            assert time.monotonic() < deadline, 'the page did not load'
            time.sleep(0.2)
        photo = photos[0]
        document = call('DOM.getDocument')['root']['nodeId']
        picker = call('DOM.querySelector', nodeId=document, selector='input[type=file]')['nodeId']
        call('DOM.setFileInputFiles', nodeId=picker, files=[str(photo)])
        while not shown("document.querySelector('#results figure') !== null"):
            assert time.monotonic() < deadline, shown("document.getElementById('results').innerText")
            time.sleep(0.2)
        label, p_dog = expected[photo.name]
        assert shown("document.querySelector('#results .label').textContent") == label
        assert photo.name in shown("document.getElementById('results').innerText")
        rows = shown(
            "[...document.querySelectorAll('#results tr')].map(r => [r.cells[0].textContent, "
            'parseFloat(r.cells[1].textContent)])'
        )
        assert sorted(name for name, _ in rows) == ['cat', 'dog']
        for name, percent in rows:  # shown to one place, from probabilities predict rounds to four
            assert abs(percent - 100 * (p_dog if name == 'dog' else 1 - p_dog)) <= 0.06, rows
        picture = shown("document.querySelector('#results img').naturalWidth")
        assert picture > 0  # the photo itself is shown beside its classes
        page.close()
    finally:
        os.killpg(browser.pid, signal.SIGKILL)
        browser.wait(timeout=30)


def test_requests_that_wait_go_through_the_model_together_each_with_its_own_answer(tiny_data):
    import asyncio

    import torch

    from data.transforms import model_input
    from training.checkpoint import Trained
    from utils.runtime import Runtime
    from verbs.serve import Classifier

    torch.manual_seed(0)
    model, batches, release = build_model('ResNet34', 2).eval(), [], threading.Event()

    class Counting(torch.nn.Module):  # the model, holding its first batch until the others wait
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images):
            batches.append(len(images))
            if len(batches) == 1:
                release.wait(60)
            return self.model(images)

    cpu = torch.device('cpu')
    classifier = Classifier(Trained(Counting(), ['cat', 'dog'], Path('run'), False), 32, Runtime(cpu))
    photos = sorted((tiny_data / 'train').glob('*.jpg'))[:20]

    def ask(photo):
        return asyncio.create_task(classifier.probabilities([photo.name], [photo.read_bytes()]))

    async def requests_meanwhile():
        batcher = asyncio.create_task(classifier.run_batches())
        first = ask(photos[0])
        while not batches:  # the first request is in the model
            await asyncio.sleep(0.01)
        rest = [ask(photo) for photo in photos[1:]]
        while classifier.waiting.qsize() < len(rest):
            await asyncio.sleep(0.01)
        release.set()
        answers = [await request for request in (first, *rest)]
        batcher.cancel()
        return answers

    answers = asyncio.run(requests_meanwhile())
    assert batches == [1, 19]  # the nineteen requests that waited went through as one batch
    assert len({round(p[1], 4) for (p,) in answers}) > 10  # the images' answers differ: a mix-up would show
    with torch.no_grad():
        for photo, (p,) in zip(photos, answers):
            image = classifier.decode(photo.name, photo.read_bytes())[None]
            own = model(model_input(image, cpu)).softmax(dim=1)[0].tolist()
            assert p == pytest.approx(own, abs=1e-5)  # its own image's probabilities, not another's


def test_a_host_that_does_not_resolve_is_one_line_naming_it():
    from verbs.serve import listen

    with pytest.raises(UserError, match=r'^--host=nosuch\.invalid: no such address \('):  # not 'Unknown error -2'
        listen('nosuch.invalid', 0)
    for size in (float('nan'), float('inf')):  # --max_mb=nan, --max_mb=1e999: no size at all
        with pytest.raises(UserError, match=f'^--max_mb={size} is invalid; it takes a number of MB above 0'):
            listen('127.0.0.1', 0, size)


@pytest.mark.parametrize('option', ['port', 'max_mb'])
def test_a_bad_port_or_size_is_said_before_the_model_loads(tmp_path, option):
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen()
        given = {'port': busy.getsockname()[1]} if option == 'port' else {'max_mb': 0}
        # no run in checkpoint_dir: loading a model first would say that instead
        with pytest.raises(UserError, match='cannot listen on 127.0.0.1' if option == 'port' else '--max_mb=0'):
            main.serve(checkpoint_dir=str(tmp_path), **given)
