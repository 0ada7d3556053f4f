"""`python main.py serve`: a page where a person drops photos and sees the classes with their
probabilities, and POST /predict for programs: multipart files in, JSON out,
[{"name": ..., "label": ..., "probabilities": {class: p}}], the numbers `predict` gives; an image it
cannot read gets {"name", "error", "status"} in its place, and a request with no good image a 4xx
and {"detail": "..."}. docs/shipping.md has the figures and the reasons for
FastAPI, uvicorn and PyTorch here, and for batching the requests that wait (Classifier).
"""

import asyncio
import contextlib
import html
import io
import math
import os
import socket
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from PIL import Image, UnidentifiedImageError
from starlette.formparsers import MultiPartException, MultiPartParser

from config import UserError, whole_number
from data.decode import UNREADABLE, load_pixels
from data.transforms import eval_transform, model_input
from training.engine import log_probabilities, on_device, predicted
from utils.runtime import runtime_of

MAX_FILES = 64  # images in one request
MAX_BATCH = 64  # images the model takes at once; more wait for the next batch
# Pillow refuses larger images (a decompression bomb: a small file of huge, empty pixels). A 48 MP
# phone photo fits; each decoding thread may hold one decoded, 4 bytes a pixel.
MAX_PIXELS = 50_000_000


def listen(host='127.0.0.1', port=8000, max_mb=10):
    """The socket to serve on, once --host, --port and --max_mb are seen to be good: before the model loads."""
    whole_number('port', port, 0, 65535)
    if isinstance(max_mb, bool) or not isinstance(max_mb, int | float) or not 0 < max_mb < math.inf:
        raise UserError(f'--max_mb={max_mb!r} is invalid; it takes a number of MB above 0')
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ':' in host else socket.AF_INET)
    except OSError as e:
        if e.errno < 0:  # getaddrinfo's: a name that does not resolve
            raise UserError(f'--host={host}: no such address ({e.strerror.split(" (")[0]})') from None
        raise UserError(f'cannot listen on {host}:{port} ({os.strerror(e.errno)}); pick another --port') from None


def serve_model(cfg, trained, listener, host, max_mb=10):
    """Serve `trained` on `listener`, listen()'s socket on `host`, until Ctrl-C."""
    import uvicorn

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    # for the whole process, not only inside load_pixels(): its catch_warnings() is not thread-safe,
    # and decoding threads entering and leaving it could otherwise restore a filter without it
    warnings.simplefilter('error', Image.DecompressionBombWarning)
    with runtime_of(cfg) as rt:
        classifier = Classifier(trained, cfg.image_size, rt)
        app = make_app(classifier, int(max_mb * 1e6), f'{trained.path.parent.name}: {", ".join(trained.classes)}')
        print(
            f'serving {trained.path} on http://{host}:{listener.getsockname()[1]}/ (POST /predict for programs), '
            f'computing on {rt.device} in {rt.precision}; Ctrl-C stops it',
            flush=True,
        )
        uvicorn.Server(uvicorn.Config(app, log_level='warning')).run(sockets=[listener])


class Classifier:
    """The model behind the server. Images decode in a pool of threads, one a core (more would not decode
    sooner, and each holds a decoded photo); the model runs one batch at a time, of all the images that
    came while the one before ran: on a CPU a batch of 16 takes far less than 16 single passes."""

    def __init__(self, trained, size, rt):
        self.model, self.classes = on_device(trained.model, rt), trained.classes
        self.size, self.rt, self.tta = size, rt, trained.tta
        self.decoders = ThreadPoolExecutor(os.cpu_count(), thread_name_prefix='decode')
        self.waiting = asyncio.Queue()  # (images, future of their probabilities)

    def decode(self, name, data):
        """The (3, size, size) uint8 image that `predict` makes of the file `name` holding `data`."""
        if not data:
            raise HTTPException(400, f'{name} is empty')
        try:
            return eval_transform(self.size)(load_pixels(io.BytesIO(data), draft=self.size))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise HTTPException(413, f'{name} has more pixels than the {MAX_PIXELS:,} this server decodes') from None
        except UnidentifiedImageError:
            raise HTTPException(415, f'{name} is not an image (JPEG, PNG or another format Pillow reads)') from None
        except UNREADABLE as e:
            raise HTTPException(422, f'{name} is a broken image ({e})') from None

    async def probabilities(self, names, blobs):
        """Each image's probabilities, or the HTTPException that says why it is no image we can read, in
        order; the first HTTPException when no image is good."""
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(self.decoders, self.decode, n, b) for n, b in zip(names, blobs)),
            return_exceptions=True,
        )
        images = [image for image in decoded if not isinstance(image, BaseException)]
        if not images:
            raise decoded[0]
        bug = next((e for e in decoded if isinstance(e, BaseException) and not isinstance(e, HTTPException)), None)
        if bug is not None:
            raise bug
        future = loop.create_future()
        await self.waiting.put((images, future))
        probs = iter(await future)
        return [image if isinstance(image, HTTPException) else next(probs) for image in decoded]

    async def run_batches(self):
        while True:
            jobs = [await self.waiting.get()]  # no timer: no request waits for a batch to fill
            while not self.waiting.empty() and sum(len(images) for images, _ in jobs) < MAX_BATCH:
                jobs.append(self.waiting.get_nowait())
            try:
                probs = await asyncio.to_thread(self.forward, torch.stack([i for images, _ in jobs for i in images]))
            except Exception as e:  # a bug: the requests of the batch fail with it, the server serves on
                probs = e
            start = 0
            for images, future in jobs:
                if not future.done():  # its client may have gone
                    if isinstance(probs, Exception):
                        future.set_exception(probs)
                    else:
                        future.set_result(probs[start : start + len(images)])
                start += len(images)

    @torch.inference_mode()
    def forward(self, images):
        """predict's probabilities: the same device, precision, layout and --tta."""
        images = model_input(images, self.rt.device, self.rt.layout)
        return log_probabilities(self.model, images, self.rt, self.tta).exp().tolist()


def answer(name, p, classes):
    """One image's JSON: its class and probabilities, or why it was refused."""
    if isinstance(p, HTTPException):  # this image alone: the others are answered
        return {'name': name, 'error': p.detail, 'status': p.status_code}
    return {'name': name, 'label': classes[predicted(classes, p)], 'probabilities': dict(zip(classes, p))}


class LimitedParser(MultiPartParser):
    """Starlette's multipart parser, stopping at the first file over max_bytes: the rest of the
    request is never kept (uvicorn drops it as it comes, so the client hears the 413)."""

    def __init__(self, headers, stream, max_bytes, **limits):
        super().__init__(headers, stream, **limits)
        self.max_bytes = max_bytes

    def on_part_begin(self):
        super().on_part_begin()
        self.part_bytes = 0

    def on_part_data(self, data, start, end):
        self.part_bytes += end - start
        if self.part_bytes > self.max_bytes:
            name = getattr(self._current_part.file, 'filename', None) or 'a part'
            raise HTTPException(413, f'{name} is over the {self.max_bytes / 1e6:g} MB this server takes (--max_mb)')
        super().on_part_data(data, start, end)


def make_app(classifier, max_bytes, title):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        batches = asyncio.create_task(classifier.run_batches())
        yield
        batches.cancel()

    app = FastAPI(title='dogcat', lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    page_html = Path(__file__).with_name('serve.html').read_text().replace('TITLE', html.escape(title))

    @app.get('/', response_class=HTMLResponse)
    async def page():
        return page_html

    @app.post('/predict')
    async def predict(request: Request):
        if not request.headers.get('content-type', '').startswith('multipart/form-data'):
            raise HTTPException(400, 'send the images as multipart/form-data files (curl -F files=@photo.jpg ...)')
        try:
            parser = LimitedParser(request.headers, request.stream(), max_bytes, max_files=MAX_FILES, max_fields=16)
            form = await parser.parse()
        except MultiPartException as e:
            raise HTTPException(413 if 'Too many files' in e.message else 400, e.message) from None
        files = [f for _, f in form.multi_items() if not isinstance(f, str)]
        try:
            blobs = [await f.read() for f in files]
        finally:
            await form.close()
        names = [f.filename or f'image {n + 1}' for n, f in enumerate(files)]
        if not files:
            raise HTTPException(400, 'the request holds no images: send one or more as multipart/form-data files')
        probabilities = await classifier.probabilities(names, blobs)
        return [answer(name, p, classifier.classes) for name, p in zip(names, probabilities)]

    return app
