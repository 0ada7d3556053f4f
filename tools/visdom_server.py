"""A visdom server that works with no internet:  python -m tools.visdom_server [--port=8097]

visdom's own `python -m visdom.server` downloads its page's JavaScript, CSS and fonts from CDNs
at every start; with no internet (or behind a firewall) it crashes, or its page stays blank.
The pip package ships none of those files. This module fetches them once, with `npm pack`,
from the npm registry at the versions visdom 0.2.4 was built for, puts them in visdom's static
folder (`make install` does that), then starts the server without any download.

It listens on 127.0.0.1 only, unless --expose is given (then on every interface: anyone who
can reach the port sees and can change your plots; visdom has no password by default).
"""

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

MATHJAX = 'js/mathjax/2.7.5/'
# npm package@version -> {path inside its tarball (a folder ends with /): path under static/}
FILES = {
    'jquery@3.1.1': {'dist/jquery.min.js': 'js/jquery.min.js'},
    'bootstrap@3.3.7': {
        'dist/js/bootstrap.min.js': 'js/bootstrap.min.js',
        'dist/css/bootstrap.min.css': 'css/bootstrap.min.css',
        'dist/fonts/': 'fonts/',
    },
    'react@16.2.0': {'umd/react.production.min.js': 'js/react-react.min.js'},
    'react-dom@16.2.0': {'umd/react-dom.production.min.js': 'js/react-dom.min.js'},
    'react-modal@3.1.10': {'dist/react-modal.min.js': 'js/react-modal.min.js'},
    'plotly.js-dist-min@2.11.1': {'plotly.min.js': 'js/plotly-plotly.min.js'},
    'sjcl@1.0.7': {'sjcl.js': 'js/sjcl.js'},
    'layout-bin-packer@1.4.0': {
        'dist/layout-bin-packer.js': 'js/layout_bin_packer.js',
        'dist/layout-bin-packer.js.map': 'js/layout-bin-packer.js.map',
    },
    'd3@3.5.17': {'d3.min.js': 'js/d3.v3.min.js'},
    'd3-selection-multi@1.0.1': {'build/d3-selection-multi.js': 'js/d3-selection-multi.v1.js'},
    'save-svg-as-png@1.4.17': {'lib/saveSvgAsPng.js': 'js/saveSvgAsPng.js'},
    'react-resizable@1.4.6': {'css/styles.css': 'css/react-resizable-styles.css'},
    'react-grid-layout@0.16.3': {'css/styles.css': 'css/react-grid-layout-styles.css'},
    'classnames@2.2.5': {'index.js': 'fonts/classnames'},
    'mathjax@2.7.5': {
        'MathJax.js': MATHJAX + 'MathJax.js',
        'config/': MATHJAX + 'config/',
        'extensions/': MATHJAX + 'extensions/',
        'jax/': MATHJAX + 'jax/',
    },
}


def static_dir():
    import visdom

    return Path(visdom.__file__).parent / 'static'


def missing_files():
    """The files of FILES that visdom's static folder lacks (a folder counts when it exists)."""
    static = static_dir()
    return [dest for files in FILES.values() for dest in files.values() if not (static / dest).exists()]


def provision():
    """Fill visdom's static folder from the npm registry; nothing to do when it is complete."""
    if not missing_files():
        return
    npm = shutil.which('npm')
    if npm is None:
        sys.exit(
            'error: the visdom page needs JavaScript files that come from the npm registry, '
            'and npm is not installed; install Node.js (with npm) and run `make install` again'
        )
    static = static_dir()
    with tempfile.TemporaryDirectory() as tmp:
        packed = subprocess.run([npm, 'pack', '--silent', *FILES], cwd=tmp, capture_output=True, text=True)
        if packed.returncode != 0:
            sys.exit(f'error: npm pack failed: {packed.stderr.strip()[:500]}')
        for spec, files in FILES.items():
            name, version = spec.rsplit('@', 1)
            with tarfile.open(Path(tmp) / f'{name}-{version}.tgz') as tar:
                _extract(tar, files, static)
    print(f'visdom page files in {static}')


def _extract(tar, files, static):
    for member in tar.getmembers():
        if not member.isfile() or not member.name.startswith('package/'):
            continue
        inside = member.name[len('package/') :]
        for source, dest in files.items():
            if inside == source or (source.endswith('/') and inside.startswith(source)):
                target = static / (dest + inside[len(source) :] if source.endswith('/') else dest)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())


def start(port, env_path, timeout=60):
    """A server in a child process on 127.0.0.1:port (page files fetched first if missing),
    returned once it answers; the caller terminates it."""
    import time
    import urllib.request

    provision()
    process = subprocess.Popen(
        [sys.executable, '-m', 'tools.visdom_server', f'--port={port}', f'--env_path={env_path}'],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=1)
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f'the visdom server on port {port} did not start') from None
            time.sleep(0.2)


def serve(port, expose, env_path):
    """Run visdom's server in this process, without its start-up download."""
    from visdom.server import run_server  # its main() alone does not download; `-m visdom.server` does

    argv = ['visdom', '-port', str(port), '-env_path', str(env_path)]
    if not expose:
        argv += ['-bind_local', '--hostname', '127.0.0.1']
    sys.argv = argv
    run_server.main()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--port', type=int, default=8097, help='port to listen on (8097)')
    parser.add_argument(
        '--expose',
        action='store_true',
        help='listen on every interface, not only 127.0.0.1 (anyone who reaches it can see and change the plots)',
    )
    parser.add_argument(
        '--env_path', default=str(Path.home() / '.visdom'), help='where the server keeps saved environments (~/.visdom)'
    )
    parser.add_argument(
        '--provision-only', action='store_true', help='fetch the page files and exit (what make install does)'
    )
    args = parser.parse_args()
    provision()
    if not args.provision_only:
        serve(args.port, args.expose, args.env_path)


if __name__ == '__main__':
    main()
