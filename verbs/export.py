"""`python main.py export`: a run's model as ONNX, checked against PyTorch before it is kept.

The graph takes what eval_transform() gives, uint8 RGB images, and normalises them inside: a caller
cannot get the statistics or their scale wrong. What a caller needs to know is in the file's
metadata_props (metadata()), which tools/predict_onnx.py reads without torch; docs/shipping.md says why.
"""

import itertools
import json

import torch
from torch import nn

from config import UserError
from data.transforms import MEAN, STD, model_input
from training.engine import validation_data
from utils.files import atomic_open

CHECK_IMAGES = 48  # validation images the exported graph is compared on
TOLERANCE = 1e-4  # the largest difference of a probability from PyTorch's that passes


class Normalised(nn.Module):
    """The model with model_input()'s normalisation in front: uint8 images in, logits out."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.register_buffer('mean', torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer('std', torch.tensor(STD).view(1, 3, 1, 1) * 255)

    def forward(self, images):
        return self.model((images.float() - self.mean) / self.std)


def export_model(cfg, trained):
    """Write trained.model as model.onnx beside its checkpoint, once onnxruntime has been seen to
    give PyTorch's probabilities and classes on the run's validation images."""
    images = validation_images(cfg, trained.classes)  # before the slow export: missing data fails at once
    model_bytes = to_onnx(trained.model, cfg.image_size, metadata(cfg, trained))
    difference, same = compare(model_bytes, trained.model, images)
    print(
        f'checked on {len(images)} validation images against PyTorch (fp32): largest probability '
        f'difference {difference:.1e} (at most {TOLERANCE:g} passes), the same class for {same} of {len(images)}'
    )
    if not (difference <= TOLERANCE and same == len(images)):
        raise UserError(
            'onnxruntime does not give what PyTorch gives on the validation images (see above), '
            'so no model.onnx was written'
        )
    path = trained.path.parent / 'model.onnx'
    with atomic_open(path) as f:
        f.write(model_bytes)
    print(f'wrote {path} ({len(model_bytes) / 1e6:.1f} MB)')


def metadata(cfg, trained):
    """What a program with the file alone needs to know (docs/shipping.md)."""
    size = cfg.image_size
    return {
        'classes': json.dumps(trained.classes),  # column i of the output is classes[i]
        'image_size': str(size),
        'input': json.dumps(
            dict(name='images', layout='NCHW', dtype='uint8', channels='RGB', shape=['batch', 3, size, size])
        ),
        'preprocessing': (
            'the upright image (EXIF orientation applied) in RGB, its central square resized to '
            'image_size x image_size with antialiased bilinear filtering (tools/predict_onnx.py)'
        ),
        'mean': json.dumps([round(m * 255, 6) for m in MEAN]),
        'std': json.dumps([round(s * 255, 6) for s in STD]),
        'normalization': (
            'inside the graph: (images - mean) / std per channel, mean and std on the 0-255 scale; '
            'feed raw uint8 pixels'
        ),
        'output': 'logits (batch, classes): softmax gives the probabilities',
        'model': cfg.model,
    }


def to_onnx(model, size, props):
    """The serialised ONNX model of Normalised(model) with metadata `props`, its batch dimension free."""
    import onnx

    # two images: an example batch of one would be taken to mean that the batch is always one
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    # the exporter of torch.export (dynamo=True), not the TorchScript one: docs/shipping.md
    program = torch.onnx.export(
        Normalised(model).eval(),
        (example,),
        input_names=['images'],
        output_names=['logits'],
        dynamic_shapes=({0: torch.export.Dim('batch')},),
        dynamo=True,
        verbose=False,
    )
    proto = program.model_proto  # a new proto each time it is asked for
    onnx.helper.set_model_props(proto, props)
    return proto.SerializeToString()


def validation_images(cfg, classes):
    """Up to CHECK_IMAGES uint8 images, spread over the run's validation data as `val` reads it."""
    data = validation_data(cfg, classes)
    spread = (data[index][0] for index in range(0, len(data), max(1, len(data) // CHECK_IMAGES)))
    images = list(itertools.islice((image for image in spread if image is not None), CHECK_IMAGES))
    if not images:
        raise UserError(
            f'none of the validation images of {data.paths[0]} and others could be read, '
            f'so the export cannot be checked'
        )
    return images


def compare(model_bytes, model, images):
    """(largest difference of a probability, images of the same predicted class) of onnxruntime
    running `model_bytes` against PyTorch running `model`, in fp32 both, on `images`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model_bytes, providers=['CPUExecutionProvider'])
    batch = torch.stack(images)
    with torch.inference_mode():
        expected = model(model_input(batch, torch.device('cpu'))).float().softmax(dim=1)
    got = torch.from_numpy(session.run(None, {'images': batch.numpy()})[0]).softmax(dim=1)
    return (got - expected).abs().max().item(), int((got.argmax(dim=1) == expected.argmax(dim=1)).sum())
