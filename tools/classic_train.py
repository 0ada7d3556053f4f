"""The 2017 recipe this project grew from, kept as the yardstick for `python main.py train`.

    python -m tools.classic_train --train_data_root=data/train [--epochs=1]

It trains the same model on the same split of the same images as `main.py train` with its
defaults, the way the original did: Pillow decodes, Resize(256) then RandomResizedCrop(224),
ToTensor and Normalize run in the DataLoader workers, the model computes in fp32 in the
contiguous layout, evaluation runs under no_grad, and the weights are saved once an epoch.
tools/benchmark.py times both as whole processes.
"""

import argparse
import time

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from config import DefaultConfig
from data import DogCat, Split
from data.transforms import MEAN, STD
from models import build_model


class PillowImages(Dataset):
    def __init__(self, paths, targets, transform):
        self.paths, self.targets, self.transform = paths, targets, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(Image.open(self.paths[i]).convert('RGB')), self.targets[i]


def main():
    d = DefaultConfig
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--train_data_root', required=True)
    parser.add_argument('--out', default='classic.pth', help='where the weights are saved each epoch')
    parser.add_argument('--epochs', type=int, default=1)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    for name in ('model', 'image_size', 'batch_size', 'num_workers', 'lr', 'weight_decay', 'val_ratio', 'seed'):
        parser.add_argument(f'--{name}', type=type(getattr(d, name)), default=getattr(d, name))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device, size = torch.device(args.device), args.image_size

    # the same files as main.py's split; only the way they are read and transformed differs
    split = Split(args.val_ratio, args.seed)
    listing = {mode: DogCat(args.train_data_root, mode, size, split=split) for mode in ('train', 'val')}
    normalize = T.Normalize(MEAN, STD)
    transforms = {
        'train': T.Compose(
            [T.Resize(256 * size // 224), T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
        ),
        'val': T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), normalize]),
    }
    loaders = {
        mode: DataLoader(
            PillowImages(data.paths, data.targets, transforms[mode]),
            args.batch_size,
            shuffle=mode == 'train',
            num_workers=args.num_workers,
            pin_memory=device.type == 'cuda',
        )
        for mode, data in listing.items()
    }

    model = build_model(args.model, len(listing['train'].classes)).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    for epoch in range(args.epochs):
        started = time.perf_counter()
        model.train()
        for images, targets in loaders['train']:
            images, targets = images.to(device), targets.to(device)
            loss = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_value = loss.item()  # the original read the loss back every step
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, targets in loaders['val']:
                correct += (model(images.to(device)).argmax(1).cpu() == targets).sum().item()
        torch.save(model.state_dict(), args.out)
        print(
            f'epoch {epoch + 1}: train loss {loss_value:.4f}  val acc {correct / len(listing["val"]):.2%}  '
            f'{time.perf_counter() - started:.1f}s'
        )


if __name__ == '__main__':
    main()
