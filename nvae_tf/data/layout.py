"""Where the train and test parts of a local dataset (image folder or TFRecord files) are on disk.

Either the directory has split sub-folders (``train/`` and ``test/`` or ``validation/``, the
GLOW TFRecord layout), or it is one flat collection and every ``1/test_fraction``-th item in
sorted order is held out for testing: exact counts (70,000 FFHQ images at 0.1 -> 63,000 / 7,000,
like the paper's split) with no stored permutation, and it works on streams of unknown length.
"""

import os

TRAIN_DIRS = ("train",)
TEST_DIRS = ("test", "validation", "valid", "val")


def split_dir(root, split):
    """The sub-folder holding ``split`` ("train"/"test"), or None for a flat layout."""
    names = TRAIN_DIRS if split == "train" else TEST_DIRS
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    return None


def missing_split_dir(root):
    """For a directory with only one of the split sub-folders: the split whose folder is missing."""
    present = {split: split_dir(root, split) is not None for split in ("train", "test")}
    if present["train"] != present["test"]:
        return "test" if present["train"] else "train"
    return None


def held_out(index, fraction):
    """True where item ``index`` of a flat collection belongs to the test split.

    ``floor((i+1) f) > floor(i f)`` marks exactly ``floor(n f)`` of the first n items, evenly
    spread. Works on Python numbers and on float64 tensors alike (same IEEE arithmetic).
    """
    return (index + 1) * fraction // 1 > index * fraction // 1


def select(items, split, fraction):
    """The items of a flat, sorted collection that belong to ``split``."""
    test = split != "train"
    return [x for i, x in enumerate(items) if held_out(i, fraction) == test]
