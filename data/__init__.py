from .dataset import DogCat, Labels, Split
from .images import ImageFiles, collate_fn

__all__ = ['DogCat', 'ImageFiles', 'Labels', 'Split', 'collate_fn']
