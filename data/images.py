"""Images read from their files when a DataLoader worker asks, and batched: what every dataset
of the project builds on."""

from collections import namedtuple

from torch.utils.data import Dataset, default_collate

from .decode import UNREADABLE, load_pixels


class ImageFiles(Dataset):
    """Samples (image, target, index into `paths`), read when asked for. An image that cannot be
    decoded comes back as None, so that collate_fn drops it instead of one bad file ending the run."""

    def __init__(self, paths, targets, transform, draft=None):
        self.paths, self.targets, self.transform, self.draft = paths, targets, transform, draft

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            img = load_pixels(self.paths[index], self.draft)
        except UNREADABLE:
            return None, self.targets[index], index
        return self.transform(img), self.targets[index], index


Batch = namedtuple('Batch', 'images targets indices skipped')


def collate_fn(samples):
    """Stack the samples that loaded; `skipped` lists the indices of those that did not (when all
    failed, the rest is None and the training loop skips the batch)."""
    good = [s for s in samples if s[0] is not None]
    skipped = [index for image, _, index in samples if image is None]
    if not good:
        return Batch(None, None, None, skipped)
    return Batch(*default_collate(good), skipped)
