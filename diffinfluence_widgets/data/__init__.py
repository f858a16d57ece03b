"""Data: bundled digits, image folders, torch datasets, thumbnails."""
from .dataset import ImageDataset, as_id_tensor
from .digits import digits_split_ids, load_digits
from .images import from_arrays, from_image_folder, from_torch_dataset, resize, to_png, to_uint8

__all__ = ["ImageDataset", "as_id_tensor", "load_digits", "digits_split_ids", "from_image_folder",
           "from_torch_dataset", "from_arrays", "resize", "to_png", "to_uint8"]
