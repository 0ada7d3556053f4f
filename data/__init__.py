from .dataset import DogCat, collate_fn

__all__ = ['DogCat', 'collate_fn']
