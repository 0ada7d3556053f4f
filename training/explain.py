"""Where a model looked: Grad-CAM heatmaps (Captum's LayerGradCam) of the class it predicted,
over the dashboards' most-wrong validation images and over the photos of `predict --explain`.
They are computed on the plain model (never the compiled or DDP-wrapped one) and leave the
weights, their gradients and the random numbers as they were."""

import difflib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from config import UserError
from data.decode import load_rgb
from data.transforms import model_input
from models import FoldEnsemble
from utils.files import atomic_open, unused
from utils.pictures import captioned_tiles

# cold to hot: dark blue, cyan, yellow, red; readable over any picture
HEAT = np.array([[0, 0, 96], [0, 160, 255], [255, 230, 0], [230, 0, 0]], dtype=np.float32)
BATCH = 16  # images per backward pass


def find_layer(model, size, name=''):
    """(name, module) of the layer to explain `model` at: `name` (--cam_layer), or the last module
    whose output is a 4-D map wider than 1x1 on a size x size input, pooling layers and modules
    that hand their input on unchanged (Identity, Dropout, in-place activations) left out."""
    names = dict(model.named_modules())
    if name:
        if name not in names:
            close = difflib.get_close_matches(name, [n for n in names if n], n=3)
            hint = f'; did you mean {" or ".join(close)}?' if close else ''
            raise UserError(f'--cam_layer={name!r}: {type(model).__name__} has no layer of that name{hint}')
        return name, names[name]
    name_of = {module: module_name for module_name, module in names.items() if module_name}
    maps = []

    def hook(module, inputs, output):
        passed_on = bool(inputs) and output is inputs[0]
        pooling = type(module).__module__ == 'torch.nn.modules.pooling'
        if torch.is_tensor(output) and output.dim() == 4 and output.shape[-2:].numel() > 1:
            if not passed_on and not pooling:
                maps.append(name_of[module])

    hooks = [module.register_forward_hook(hook) for module in name_of]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for handle in hooks:
            handle.remove()
    if not maps:
        raise UserError(f'{type(model).__name__} has no layer with a spatial map at {size} px to take Grad-CAM at')
    return maps[-1], names[maps[-1]]  # hooks fire as modules finish: a block's container after its last layer


def heatmaps(model, images, targets, layer=''):
    """(N, H, W) Grad-CAM maps in [0, 1] (each scaled to its own peak) of the classes `targets`
    over `images` (normalised, on the model's device), upsampled to the images' size. A fold
    ensemble's map is the mean of its members' maps."""
    from captum.attr import LayerAttribution, LayerGradCam

    members = members_of(model)
    total = torch.zeros(len(images), *images.shape[-2:])
    for member in members:
        was_training = member.training
        member.eval()
        try:
            _, module = find_layer(member, images.shape[-1], layer)
            with torch.enable_grad():  # fp32: no autocast here, whatever the run computes in
                cam = LayerGradCam(member, module).attribute(images, target=targets, relu_attributions=True)
        finally:
            member.train(was_training)
        cam = LayerAttribution.interpolate(cam.detach().float(), tuple(images.shape[-2:]), 'bilinear')[:, 0]
        peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
        total += (cam / peak).cpu()
    return total / len(members)


def overlay(picture, heat):
    """`picture` (PIL) in grey with `heat` (H, W in [0, 1]) blended over it in colour, at most half opaque
    where hottest, so the picture shows through everywhere (its own colours would read as heat)."""
    heat = Image.fromarray((heat.numpy() * 255).astype(np.uint8)).resize(picture.size, Image.BILINEAR)
    level = np.asarray(heat, dtype=np.float32) / 255 * (len(HEAT) - 1)
    low = np.minimum(level.astype(int), len(HEAT) - 2)
    share = (level - low)[..., None]
    colour = HEAT[low] * (1 - share) + HEAT[low + 1] * share
    opacity = 0.1 + 0.4 * level[..., None] / (len(HEAT) - 1)
    mixed = np.asarray(picture.convert('L').convert('RGB'), dtype=np.float32) * (1 - opacity) + colour * opacity
    return Image.fromarray(mixed.astype(np.uint8))


def explain_rows(model, dataset, metrics, rows, classes, rt, layer=''):
    """(picture, caption) of the validation images at `rows` of `metrics` (engine.score's) as the
    network saw them, overlaid with the map of the class predicted: 'name true->predicted P'."""
    probs, labels, indices = metrics['probs'], metrics['labels'], metrics['indices']
    picks = [(int(indices[row]), int(probs[row].argmax()), row) for row in rows]
    items = []
    for (index, guess, row), image, heat in maps_of(model, dataset, picks, rt, layer):
        caption = f'{Path(dataset.paths[index]).name} {classes[labels[row]]}->{classes[guess]} {probs[row, guess]:.2f}'
        items.append((overlay(Image.fromarray(image.permute(1, 2, 0).numpy()), heat), caption))
    return items


def write_overlays(model, data, picks, folder, rt, layer=''):
    """The files written into `folder`: per (index in `data`, class, caption) of `picks`, <image>-cam.png
    (or -cam-2.png... when taken), its central square at up to 512 px overlaid with the map of the class, captioned."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for (index, _, caption), _, heat in maps_of(model, data, picks, rt, layer):
        path = Path(data.paths[index])
        picture = load_rgb(str(path))
        side = min(min(picture.size), 512)
        square = ImageOps.fit(picture, (side, side))  # the central square, as the eval transform crops
        tile = captioned_tiles([(overlay(square, heat), caption)], size=side)[0]
        file = unused(folder, f'{path.stem}-cam', '.png')  # an earlier call's pictures are kept
        with atomic_open(file, 'wb') as f:
            Image.fromarray((tile.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(f, format='PNG')
        written.append(file)
    return written


def maps_of(model, data, picks, rt, layer=''):
    """(pick, image, map) of each pick (index in `data`, class, ...) whose image loads: the image as
    the network saw it and heatmaps() of the class over it, BATCH images a backward pass."""
    for start in range(0, len(picks), BATCH):
        loaded = [(pick, data[pick[0]][0]) for pick in picks[start : start + BATCH]]
        loaded = [(pick, image) for pick, image in loaded if image is not None]  # a file gone since
        if loaded:
            pixels = model_input(torch.stack([image for _, image in loaded]), rt.device, rt.layout)
            targets = torch.tensor([pick[1] for pick, _ in loaded], device=rt.device)
            for (pick, image), heat in zip(loaded, heatmaps(model, pixels, targets, layer)):
                yield pick, image, heat


def check_layer(model, size, name=''):
    """find_layer() of the model, or of each model of a fold ensemble: its UserError before any work."""
    for member in members_of(model):
        find_layer(member, size, name)


def members_of(model):
    return list(model.members) if isinstance(model, FoldEnsemble) else [model]
