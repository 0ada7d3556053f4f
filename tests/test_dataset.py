import numpy as np
import pytest
import torch
from PIL import Image

from config import UserError
from data import DogCat, Split, collate_fn, decode
from data.decode import load_pixels, load_rgb
from data.demo import make_demo_data


def write_images(folder, names, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new('RGB', size, (200, 100, 50)).save(
            folder / name, format='PNG' if name.lower().endswith('png') else 'JPEG'
        )
    return folder


def labelled_names(n_per_class):
    return [f'{kind}.{i}.jpg' for kind in ('cat', 'dog') for i in range(n_per_class)]


def test_labels_come_from_the_file_name_not_the_folder(tmp_path):
    # the original template read the label from the whole path: everything under .../dog/... was a dog
    root = write_images(tmp_path / 'dog' / 'dogs-and-cats', ['cat.1.jpg', 'cat.2.JPG', 'dog.3.jpeg', 'Dog.4.PNG'])
    data = DogCat(root, 'train', image_size=32, split=Split(0.5))
    val = DogCat(root, 'val', image_size=32, split=Split(0.5))
    labels = {p.rsplit('/', 1)[1]: t for p, t in zip(data.paths + val.paths, data.targets + val.targets)}
    assert labels == {'cat.1.jpg': 0, 'cat.2.JPG': 0, 'dog.3.jpeg': 1, 'Dog.4.PNG': 1}


def test_test_mode_targets_are_the_kaggle_ids(tmp_path):
    root = write_images(tmp_path / 'test1', ['10.jpg', '2.jpg', '1.png'])
    data = DogCat(root, 'test', image_size=32)
    assert sorted(data.targets) == [1, 2, 10]
    image, target, index = data[data.targets.index(10)]
    assert target == 10 and data.paths[index].endswith('10.jpg')
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8


def test_names_that_are_not_samples_are_ignored_and_counted(tmp_path):
    root = write_images(tmp_path, labelled_names(2) + ['notes.jpg', 'cat.jpg', '12.jpg'])
    (root / 'readme.txt').write_text('hello')
    (root / 'sub').mkdir()
    data = DogCat(root, 'train', image_size=32, split=Split(0.5))
    assert data.ignored == ['12.jpg', 'cat.jpg', 'notes.jpg', 'readme.txt', 'sub']


def test_a_folder_without_samples_is_a_clear_error(tmp_path):
    write_images(tmp_path, ['1.jpg', 'photo.jpg'])
    with pytest.raises(UserError, match=r'holds no cat.N.jpg / dog.N.jpg images \(only 2 other entries'):
        DogCat(tmp_path, 'train')
    for name in ('cat', 'dog'):  # a folder per class, in a format not read
        write_images(tmp_path / 'webp' / name, ['0.webp'])
    with pytest.raises(UserError, match=r'in a folder of its own \(images are \.jpg, \.jpeg, \.png files\)$'):
        DogCat(tmp_path / 'webp', 'train')


def test_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match='does not exist'):
        DogCat(tmp_path / 'nope', 'test')


def test_split_is_disjoint_complete_stratified_and_deterministic(tmp_path):
    root = write_images(tmp_path, labelled_names(10))
    train = DogCat(root, 'train', split=Split(0.3, 5))
    val = DogCat(root, 'val', split=Split(0.3, 5))
    assert not set(train.paths) & set(val.paths)
    assert len(set(train.paths) | set(val.paths)) == 20
    assert sorted(val.targets) == [0, 0, 0, 1, 1, 1]  # 30 % of each class
    assert DogCat(root, 'val', split=Split(0.3, 5)).paths == val.paths
    assert DogCat(root, 'val', split=Split(0.3, 6)).paths != val.paths


def test_transforms_give_the_configured_size(tmp_path):
    root = write_images(tmp_path, labelled_names(3), size=(90, 50))
    for mode in ('train', 'val'):
        image, label, _ = DogCat(root, mode, image_size=48, split=Split(0.4))[0]
        assert image.shape == (3, 48, 48)


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    Image.new('L', (40, 40), 128).save(tmp_path / '1.jpg')
    Image.new('RGBA', (40, 40), (1, 2, 3, 4)).save(tmp_path / '2.png')
    data = DogCat(tmp_path, 'test', image_size=32)
    assert all(data[i][0].shape == (3, 32, 32) for i in range(2))


def test_a_corrupt_image_comes_back_as_none_and_collate_drops_it(tmp_path):
    root = write_images(tmp_path, ['1.jpg', '3.jpg'])
    (root / '2.jpg').write_bytes(b'not an image at all')
    data = DogCat(root, 'test', image_size=32)
    samples = [data[i] for i in range(len(data))]
    bad = data.targets.index(2)
    assert samples[bad][0] is None
    batch = collate_fn(samples)
    assert batch.images.shape == (2, 3, 32, 32)
    assert sorted(batch.targets.tolist()) == [1, 3]
    assert batch.skipped == [bad]


def test_a_batch_of_only_bad_images_collates_to_none():
    batch = collate_fn([(None, 0, 4), (None, 1, 7)])
    assert batch.images is None and batch.skipped == [4, 7]


def test_dataset_keeps_paths_not_images(tmp_path):
    root = write_images(tmp_path, labelled_names(3))
    data = DogCat(root, 'train', split=Split(0.4))
    assert all(isinstance(p, str) for p in data.paths)
    assert set(vars(data)) == {'mode', 'ignored', 'paths', 'targets', 'transform', 'draft', 'classes', 'layout', 'ids'}
    assert data.ids == data.paths  # no CSV: an image's id is its path
    assert data.classes == ['cat', 'dog'] and all(isinstance(n, str) for n in data.ignored)


def test_too_few_images_for_a_split_is_a_clear_error(tmp_path):
    root = write_images(tmp_path, labelled_names(1))
    with pytest.raises(
        UserError,
        match=r'too few images \(cat: 1, dog: 1\) for a val split at --val_ratio=0.3; give '
        r'more, a higher --val_ratio, or validation images of their own \(--val_data_root\)$',
    ):
        DogCat(root, 'val', split=Split(0.3))
    with pytest.raises(UserError, match=r'for a train split at --val_ratio=0.9; give more, a lower --val_ratio'):
        DogCat(root, 'train', split=Split(0.9))
    with pytest.raises(UserError, match=r'\(cat: 1, dog: 1\) for a val split at --folds=3; give more, fewer --folds$'):
        DogCat(root, 'val', split=Split(0, folds=3, fold=2))


def pillow_pixels(path, draft=None):
    """load_rgb's image as the (3, H, W) uint8 tensor load_pixels gives."""
    return torch.from_numpy(np.array(load_rgb(path, draft))).permute(2, 0, 1)


def photo_like(size, seed=0):
    """Smooth colour gradients with a little noise: what JPEG is made for."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], axis=-1)
    return Image.fromarray((pixels + rng.integers(0, 20, pixels.shape)).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    'kind, options',
    [
        ('4:2:0', dict(quality=75)),
        ('4:4:4', dict(quality=95, subsampling=0)),
        ('4:2:2', dict(quality=85, subsampling=1)),
        ('progressive', dict(quality=80, progressive=True)),
        ('odd size', dict(quality=90)),
        ('grey', dict(quality=90)),
    ],
)
def test_jpegs_decode_to_exactly_pillows_pixels_through_the_fast_decoder(tmp_path, monkeypatch, kind, options):
    image = photo_like((333, 251) if kind == 'odd size' else (320, 240))
    (image.convert('L') if kind == 'grey' else image).save(tmp_path / 'a.jpg', **options)
    calls = []
    real_decode = decode.simplejpeg.decode_jpeg
    monkeypatch.setattr(decode.simplejpeg, 'decode_jpeg', lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    pixels = load_pixels(tmp_path / 'a.jpg')
    assert calls, 'a plain JPEG should not need Pillow'
    assert torch.equal(pixels, pillow_pixels(tmp_path / 'a.jpg'))


def test_a_jpeg_libjpeg_only_warns_about_still_loads_as_pillow_reads_it(tmp_path):
    photo_like((64, 48)).save(tmp_path / 'a.jpg', quality=90)
    data = (tmp_path / 'a.jpg').read_bytes()
    # stray bytes before the end marker: libjpeg warns "extraneous bytes before marker"
    (tmp_path / 'b.jpg').write_bytes(data[:-2] + b'\x00\x00\x00' + data[-2:])
    with pytest.raises(ValueError):
        decode.simplejpeg.decode_jpeg((tmp_path / 'b.jpg').read_bytes())  # strict: refused
    assert torch.equal(load_pixels(tmp_path / 'b.jpg'), pillow_pixels(tmp_path / 'b.jpg'))


def test_rotated_cmyk_png_and_large_eval_jpegs_load_as_pillow_gives_them(tmp_path):
    image = photo_like((120, 80))
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways
    image.save(tmp_path / 'rotated.jpg', exif=exif)
    image.convert('CMYK').save(tmp_path / 'cmyk.jpg')
    image.save(tmp_path / 'plain.png')
    photo_like((1000, 700)).save(tmp_path / 'large.jpg')
    for name, draft in [('rotated.jpg', None), ('cmyk.jpg', None), ('plain.png', None), ('large.jpg', 224)]:
        assert torch.equal(load_pixels(tmp_path / name, draft), pillow_pixels(tmp_path / name, draft))
    assert load_pixels(tmp_path / 'rotated.jpg').shape == (3, 120, 80)
    assert load_pixels(tmp_path / 'large.jpg', draft=224).shape == (3, 350, 500)  # decoded at 1/2


def test_blurred_demo_images_are_the_same_pictures_in_fewer_bytes(tmp_path):
    # the benchmark's stand-in for Kaggle's photos: the same sizes and labels, files about as
    # small as Kaggle's (the JPEG decoding time, a loader's largest cost, follows the bytes)
    sharp, soft = (
        make_demo_data(tmp_path / name, n_train=4, n_test=2, sizes=(300, 500), blur=blur)
        for name, blur in (('sharp', 0), ('soft', 1.5))
    )
    assert sharp == soft
    for name in ('train/cat.0.jpg', 'train/dog.1.jpg', 'test1/2.jpg'):
        a, b = tmp_path / 'sharp' / name, tmp_path / 'soft' / name
        assert load_rgb(a).size == load_rgb(b).size
        assert b.stat().st_size < 0.7 * a.stat().st_size  # libjpeg's exact sizes vary by version


@pytest.mark.parametrize('crop_scale, hflip', [(0.08, True), (0.5, False)])
def test_train_transform_gives_the_crops_and_flips_of_torchvisions_v2(crop_scale, hflip):
    from torchvision.transforms import v2

    from data.transforms import train_transform

    generator = torch.Generator().manual_seed(0)
    for seed in range(20):
        h, w = torch.randint(60, 300, (2,), generator=generator).tolist()
        pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator).permute(2, 0, 1)
        reference = v2.Compose(
            [
                v2.RandomResizedCrop(48, scale=(crop_scale, 1.0), antialias=True),
                *([v2.RandomHorizontalFlip()] if hflip else []),
            ]
        )
        torch.manual_seed(seed)
        ours = train_transform(48, crop_scale, hflip)(pixels)
        torch.manual_seed(seed)
        assert torch.equal(ours, reference(pixels)), seed


def test_demo_data_never_writes_over_a_set_or_other_data(tmp_path, capsys):
    import main

    root = tmp_path / 'demo'
    main.demo_data(root=str(root), n_train=6, n_test=3)
    made = {p: p.stat().st_mtime_ns for p in root.rglob('*')}
    main.demo_data(root=str(root), n_train=6, n_test=3, flip_labels=0)  # `make demo` again: the same set
    assert {p: p.stat().st_mtime_ns for p in root.rglob('*')} == made
    assert 'already there: 6 training images' in capsys.readouterr().out.splitlines()[-1]
    # the README's 3-class set, into the same root: it would mix with the first set's images
    with pytest.raises(UserError, match=r'holds train, test1 already \(another demo set\); remove them, or give'):
        main.demo_data(root=str(root), n_train=6, n_test=2, classes=3, layout='folders')
    assert {p: p.stat().st_mtime_ns for p in root.rglob('*')} == made

    own = tmp_path / 'kaggle'
    write_images(own / 'train', ['cat.0.jpg'])
    before = (own / 'train' / 'cat.0.jpg').read_bytes()
    with pytest.raises(UserError, match=r"holds train already \(not marked as demo_data's own"):
        main.demo_data(root=str(own))
    assert [p.name for p in own.rglob('*')] == ['train', 'cat.0.jpg']
    assert (own / 'train' / 'cat.0.jpg').read_bytes() == before

    (tmp_path / 'notes.txt').write_text('')
    with pytest.raises(UserError, match='--root: cannot write in'):
        main.demo_data(root=str(tmp_path / 'notes.txt'))
