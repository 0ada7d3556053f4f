"""`python main.py export`: ONNX that onnxruntime runs as PyTorch runs the model, or no file at
all; and tools/predict_onnx.py, which writes predict's CSV from it without torch."""

import csv
import json
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

import main
from config import DefaultConfig, UserError
from conftest import ROOT, as_flags, assert_one_line_error, fast_options, newest_run, run_main
from data import DogCat
from data.decode import UNREADABLE, load_pixels
from data.transforms import eval_transform, model_input
from tools.predict_onnx import find_images, prepared
from tools.predict_onnx import main as predict_onnx
from training.checkpoint import load_trained
from verbs import export

# runs a script with torch and torchvision impossible to import
WITHOUT_TORCH = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in ('torch', 'torchvision'):
            raise ImportError(f'{name} is blocked here')
sys.meta_path.insert(0, NoTorch())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.fixture(scope='module')
def run(tmp_path_factory, tiny_data):
    """(options, run folder) of a one-epoch SqueezeNet run on the tiny set."""
    tmp = tmp_path_factory.mktemp('export')
    options = fast_options(tmp, tiny_data)
    main.train(**options)
    return options, newest_run(tmp / 'checkpoints')


@pytest.fixture(scope='module')
def photos(tmp_path_factory, tiny_data):
    """A folder of what people have: the tiny set's test images, and in a subfolder a large JPEG
    (decoded at a reduced scale), a progressive, a grey, a CMYK and an EXIF-rotated one, a PNG with
    alpha, a 16-bit PNG, a broken file, a hidden file, a hidden folder and a text file."""
    folder = tmp_path_factory.mktemp('photos')
    (folder / 'more').mkdir()
    for file in sorted((tiny_data / 'test1').glob('*.jpg')):
        (folder / file.name).write_bytes(file.read_bytes())
    photo = Image.open(tiny_data / 'test1' / '1.jpg').convert('RGB')
    large = photo.resize((900, 640))
    large.save(folder / 'more' / 'large.jpg', quality=90)
    large.save(folder / 'more' / 'progressive.jpg', progressive=True)
    photo.convert('L').save(folder / 'more' / 'grey.jpg')
    photo.convert('CMYK').save(folder / 'more' / 'cmyk.jpg')
    sideways = Image.Exif()
    sideways[0x0112] = 6  # Orientation: rotate 90 degrees to show
    large.save(folder / 'more' / 'rotated.JPG', exif=sideways)
    translucent = photo.convert('RGBA')
    translucent.putalpha(128)
    translucent.save(folder / 'more' / 'alpha.png')
    Image.fromarray(np.asarray(photo.convert('L')).astype(np.uint16) * 257).save(folder / 'more' / 'deep.png')
    (folder / 'more' / 'broken.jpg').write_bytes((tiny_data / 'test1' / '2.jpg').read_bytes()[:300])
    (folder / 'more' / '.hidden.jpg').write_bytes((tiny_data / 'test1' / '2.jpg').read_bytes())
    (folder / '.thumbnails').mkdir()  # a hidden folder: its images are not the user's photos
    (folder / '.thumbnails' / '1.jpg').write_bytes((tiny_data / 'test1' / '1.jpg').read_bytes())
    (folder / 'notes.txt').write_text('not an image')
    return folder


def probabilities(session, images):
    logits = session.run(None, {'images': torch.stack(images).numpy()})[0]
    return torch.from_numpy(logits).softmax(dim=1)


@pytest.mark.parametrize('model', [pytest.param(m, marks=pytest.mark.slow) for m in ('ResNet34', 'mobilenet_v3_small')])
def test_the_onnx_model_gives_pytorchs_probabilities_for_any_batch(tmp_path, tiny_data, capsys, model):
    options = fast_options(tmp_path, tiny_data, model=model)
    main.train(**options)
    run = newest_run(tmp_path / 'checkpoints')
    capsys.readouterr()
    main.export(str(run), format='onnx', **options)
    out = capsys.readouterr().out
    assert 'largest probability difference' in out and 'the same class for 12 of 12' in out, out
    assert f'wrote {run / "model.onnx"}' in out
    assert sorted(p.name for p in run.iterdir() if p.name.endswith('.tmp')) == []

    session = onnxruntime.InferenceSession(run / 'model.onnx', providers=['CPUExecutionProvider'])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta['classes']) == ['cat', 'dog'] and meta['image_size'] == '32'
    assert json.loads(meta['input']) == {
        'name': 'images',
        'layout': 'NCHW',
        'dtype': 'uint8',
        'channels': 'RGB',
        'shape': ['batch', 3, 32, 32],
    }
    assert json.loads(meta['mean']) == pytest.approx([123.675, 116.28, 103.53])
    assert '0-255' in meta['normalization'] and meta['output'].startswith('logits')
    assert isinstance(session.get_inputs()[0].shape[0], str)  # the batch dimension is free
    assert session.get_inputs()[0].type == 'tensor(uint8)'

    cfg = DefaultConfig().parse({**options, 'load_model_path': str(run)})
    trained = load_trained(cfg)
    data = DogCat(tiny_data / 'train', 'val', 32, classes=trained.classes)
    images = [data[i][0] for i in range(len(data))]
    with torch.inference_mode():
        expected = trained.model(model_input(torch.stack(images), torch.device('cpu'))).softmax(dim=1)
    for batch in (slice(0, 1), slice(1, 6), slice(0, len(images))):
        got = probabilities(session, images[batch])
        assert (got - expected[batch]).abs().max() <= 1e-4
        assert torch.equal(got.argmax(dim=1), expected[batch].argmax(dim=1))


# each rule alone refuses: doubled logits keep every class and move the probabilities; negated
# logits flip every class (two classes), refused even where any difference would pass
@pytest.mark.parametrize('factor, tolerance', [(2.0, export.TOLERANCE), (-1.0, 1.0)])
def test_an_export_that_differs_from_pytorch_is_refused_and_leaves_no_file(run, monkeypatch, factor, tolerance):
    options, folder = run
    before = sorted(folder.iterdir())  # model.onnx of an earlier export, if any, stays as it was
    monkeypatch.setattr(export, 'TOLERANCE', tolerance)
    real = export.Normalised.forward
    monkeypatch.setattr(export.Normalised, 'forward', lambda self, images: real(self, images) * factor)
    with pytest.raises(UserError, match='no model.onnx was written'):
        main.export(str(folder), **options)
    assert sorted(folder.iterdir()) == before


@pytest.mark.slow
def test_an_unknown_format_is_one_line(run):
    options, folder = run
    result = run_main('export', str(folder), '--format=tflite', *as_flags(options))
    assert_one_line_error(result, '--format=', 'it takes onnx')
    assert result.stdout == ''  # said before the options are read and the model loads


@pytest.mark.parametrize('size', [32, 75, 224])
def test_the_torch_free_preprocessing_gives_predicts_very_pixels(photos, tiny_data, size):
    files = find_images([photos, tiny_data / 'train'])
    assert len(files) > 45
    for file in files:
        try:
            expected = eval_transform(size)(load_pixels(file, draft=size)).numpy()
        except UNREADABLE:
            continue
        assert np.array_equal(prepared(file, size), expected), file


@pytest.mark.slow
def test_predict_onnx_writes_predicts_csv_without_torch(run, photos, tmp_path):
    options, folder = run
    main.export(str(folder), **options)
    main.predict(str(photos), out=str(tmp_path / 'torch.csv'), **{**options, 'load_model_path': str(folder)})
    command = [
        sys.executable,
        '-c',
        WITHOUT_TORCH,
        str(ROOT / 'tools' / 'predict_onnx.py'),
        str(folder / 'model.onnx'),
        str(photos),
        '--out',
        str(tmp_path / 'new' / 'onnx.csv'),  # a folder that is not there yet: made, as predict makes it
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'could not read 1 files, left out:' in result.stderr and 'broken.jpg' in result.stderr
    with open(tmp_path / 'torch.csv', newline='') as f:
        expected = list(csv.reader(f))
    with open(tmp_path / 'new' / 'onnx.csv', newline='') as f:
        got = list(csv.reader(f))
    assert len(got) == len(expected) == 16 and got[0] == expected[0] == ['path', 'label', 'p_dog']
    for row, want in zip(got[1:], expected[1:]):
        assert row[:2] == want[:2]
        assert abs(float(row[2]) - float(want[2])) <= 1e-4 + 1e-9  # both rounded to 4 places
    ends = [(tmp_path / name).read_bytes().count(b'\n') for name in ('new/onnx.csv', 'torch.csv')]
    assert ends == [16, 16] and b'\r' not in (tmp_path / 'new' / 'onnx.csv').read_bytes()  # line ends as predict's

    (tmp_path / 'uses_torch.py').write_text('import torch\n')
    blocked = subprocess.run(
        [sys.executable, '-c', WITHOUT_TORCH, str(tmp_path / 'uses_torch.py')],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert blocked.returncode != 0 and 'torch is blocked here' in blocked.stderr


def test_predict_onnx_says_a_mistake_in_one_line_before_the_work(tmp_path, photos):
    (tmp_path / 'notes.onnx').write_text('not a model')
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'model.onnx').write_text('a run folder, exported')
    for argv, said in [
        ([str(tmp_path / 'notes.onnx'), str(photos), f'--out={tmp_path}/new/p.csv'], 'notes.onnx cannot be loaded as'),
        ([str(photos), str(tmp_path / 'notes.onnx')], 'is a folder; give the model.onnx first'),
        ([str(tmp_path / 'notes.onnx'), str(photos), f'--out={tmp_path}'], f'--out={tmp_path} is a folder'),
        ([str(tmp_path / 'run'), str(photos)], f'run is a folder; give {tmp_path / "run" / "model.onnx"}'),
    ]:
        with pytest.raises(SystemExit) as stopped:
            predict_onnx(argv)
        assert str(stopped.value.code).startswith('error: ') and said in str(stopped.value.code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['notes.onnx', 'run']  # nothing left behind


def test_predict_out_naming_a_folder_is_said_before_the_work(run, photos, tmp_path):
    options, folder = run
    with pytest.raises(UserError, match=f'--out={tmp_path} is a folder; give a file name'):
        main.predict(str(photos), out=str(tmp_path), **{**options, 'load_model_path': str(folder)})
