"""Live training curves in a visdom server (start one with `python -m tools.visdom_server`)."""

import atexit
import contextlib
import logging
import queue
import sys
import threading
import time

import numpy as np

LINE_OPTS = {'markers': True, 'markersize': 6}  # a chart of a single point still shows it
RETRY_SECONDS = 30  # how long to stay quiet after the server failed to answer
TIMEOUT_SECONDS = 5  # a server that takes longer than this to answer counts as gone
CLOSE_SECONDS = 10  # at the end of a run, how long to wait for the last points to be sent
BACKLOG = 1000  # points waiting for a slow server; more are dropped
WARNED = set()  # (server, port) said to have no visdom server


class Visualizer:
    """One visdom window per name, points appended as they come.

    Training never waits for it: a background thread posts the points in order. With no server
    answering it warns once, drops what it is given and tries again every RETRY_SECONDS, so
    plotting resumes when the server is back. close(), also run at exit, sends what is queued.
    """

    def __init__(self, env='dogcat', server='http://127.0.0.1', port=8097, enabled=True):
        self.env, self.server, self.port, self.enabled = env, server, port, enabled
        self.vis = None
        self.next_try = 0.0  # time.monotonic() before which the server is not tried again
        self.steps = {}  # window name -> x of its next point
        self.pending = None  # the sender thread's queue of (method, args, kwargs)
        self.sender = None

    def plot(self, name, y, x=None, title=None, **opts):
        """Append (x, y) to the line chart `name`; x defaults to a per-window counter; opts: visdom's."""
        x = self.steps.get(name, 0) if x is None else x
        self.steps[name] = x + 1
        self._append(name, y, x, {'title': title or name, **LINE_OPTS, **opts})

    def plot_many(self, values, x=None):
        for name, y in values.items():
            self.plot(name, y, x)

    def lines(self, name, values, x, title=None):
        """Append one point to each named line of the shared chart `name` (e.g. train vs val loss)."""
        for line, y in values.items():
            self._append(name, y, x, {'title': title or name, 'showlegend': True, **LINE_OPTS}, name=line)

    def _append(self, win, y, x, opts, **kwargs):
        self._call('line', Y=np.array([y]), X=np.array([x]), win=win, opts=opts, update='append', **kwargs)

    def img(self, name, images, caption=None):
        """Show an image tensor (C, H, W) or a grid of a batch (N, C, H, W), values in [0, 1]."""
        images = images.detach().to('cpu', copy=True).numpy()  # sent later: a copy
        method = 'images' if images.ndim == 4 else 'image'
        self._call(method, images, win=name, opts={'title': name, 'caption': caption or name})

    def img_many(self, named_images):
        for name, images in named_images.items():
            self.img(name, images)

    def captioned_images(self, name, items, size=128, summary=None):
        """A grid of (PIL image, caption) pairs, each caption under its picture; summary: the window's."""
        if not self.enabled or not items:
            return
        from utils.pictures import captioned_tiles

        tiles, columns = captioned_tiles(items, size), 4
        rows = -(-len(items) // columns)
        # the window sized to the whole grid (visdom pads each tile by 2 on every side) and its
        # title and caption: at visdom's default size the last row of captions is cut off
        width, height = min(columns, len(items)) * (tiles.shape[3] + 4) + 20, rows * (tiles.shape[2] + 4) + 90
        opts = {'title': name, 'caption': summary or f'{len(items)} images', 'width': width, 'height': height}
        self._call('images', tiles, nrow=columns, win=name, opts=opts)

    def confusion(self, name, matrix, classes):
        """A heatmap with counts: a row per true class (the first on top), a column per predicted one."""
        n = len(classes)
        matrix = np.asarray(matrix)
        labels = [str(c) for c in classes]
        top = matrix.max() or 1
        cells = [
            {
                'x': labels[j],
                'y': labels[i],
                'text': str(int(matrix[i, j])),
                'showarrow': False,
                'font': {'color': 'white' if matrix[i, j] < top / 2 else 'black'},
            }
            for i in range(n)
            for j in range(n)
        ]
        margin = 30 + 7 * max(map(len, labels))  # room for the longest class name
        layout = {
            'annotations': cells,
            'xaxis': {'title': 'predicted', 'type': 'category', 'automargin': True, 'tickangle': -45 if n > 4 else 0},
            'yaxis': {'title': 'true', 'type': 'category', 'autorange': 'reversed', 'automargin': True},
            'margin': {'l': margin, 'b': margin, 't': 40, 'r': 20},
        }
        data = [{'type': 'heatmap', 'z': matrix.tolist(), 'x': labels, 'y': labels, 'colorscale': 'Viridis'}]
        self._call('plotly', data, layout, win=name)

    def log(self, text, win='log'):
        """Append a line (with the time) to a text window."""
        self._call('text', f'[{time.strftime("%H:%M:%S")}] {text}<br>', win=win, append=True, opts={'title': win})

    def close(self, timeout=CLOSE_SECONDS):
        if self.sender is None:
            return
        atexit.unregister(self.close)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Full):  # the server is too slow: what is left goes with the (daemon) thread
            self.pending.put(None, timeout=timeout)  # the sender stops when it gets here
            self.sender.join(max(0.0, deadline - time.monotonic()))
        self.sender = None

    def _call(self, method, *args, **kwargs):
        if not self.enabled:
            return
        if self.sender is None:
            # a queue of its own: a sender that close() gave up on never takes a later run's points
            self.pending = queue.Queue(BACKLOG)
            self.sender = threading.Thread(
                target=self._send_all, args=(self.pending,), name='visdom-sender', daemon=True
            )
            self.sender.start()
            atexit.register(self.close)
        with contextlib.suppress(queue.Full):  # the server is far behind: drop the point, as when it is gone
            self.pending.put_nowait((method, args, kwargs))

    def _send_all(self, pending):
        for method, args, kwargs in iter(pending.get, None):  # None: close() says stop
            if time.monotonic() < self.next_try:
                continue
            try:
                if self.vis is None:
                    self.vis = self._connect()
                if method == 'text' and kwargs.get('append') and not self.vis.win_exists(kwargs['win'], self.env):
                    kwargs['append'] = False  # visdom appends only to a window that exists
                getattr(self.vis, method)(*args, env=self.env, **kwargs)
            except (ConnectionError, OSError):
                self.vis = None
                self.next_try = time.monotonic() + RETRY_SECONDS
                if (self.server, self.port) not in WARNED:  # once a process: a kfold's or sweep's runs share one
                    WARNED.add((self.server, self.port))
                    print(
                        f'warning: no visdom server answers at {self.server}:{self.port}; training '
                        f'goes on without live curves (python -m tools.visdom_server starts one)',
                        file=sys.stderr,
                    )

    def _connect(self):
        import visdom  # here: runs with vis=False never pay for the import

        class Client(visdom.Visdom):
            def plotly(self, data, layout, win, env):
                """A Plotly figure of our own (visdom's heatmap has no cell labels)."""
                return self._send({'data': data, 'layout': layout, 'win': win, 'eid': env})

            def _handle_post(self, url, data=None):
                # visdom posts with no timeout: a server that accepts and never answers would
                # hold the sender (and every later point) forever; this makes it a
                # ConnectionError like a refused connection
                return self.session.post(url, data=data, timeout=TIMEOUT_SECONDS).text

        logging.getLogger('visdom').setLevel(logging.ERROR)  # it warns about options we chose
        return Client(
            server=self.server, port=self.port, env=self.env, raise_exceptions=True, use_incoming_socket=False
        )
