from .dataset import DogCat
from .images import ImageFiles, collate_fn

__all__ = ['DogCat', 'ImageFiles', 'collate_fn']
