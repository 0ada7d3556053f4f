from .dataset import DogCat, ImageFiles, collate_fn

__all__ = ["DogCat", "ImageFiles", "collate_fn"]
