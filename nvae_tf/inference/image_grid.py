"""Image batches as one PNG grid (pillow), the way sample and reconstruction grids are shown."""

import math

import numpy as np
from PIL import Image

PADDING = 2
BACKGROUND = 255  # white lines between images


def grid(images, columns=None, padding=PADDING):
    """Tile (N, H, W, C) images in [0, 1] into one uint8 (rows*H', columns*W', C) array.

    ``columns`` defaults to ceil(sqrt(N)); a (rows, columns, H, W, C) array keeps its layout.
    Every image is surrounded by ``padding`` background pixels.
    """
    images = np.asarray(images, np.float32)
    if images.ndim == 5:
        columns = images.shape[1]
        images = images.reshape(-1, *images.shape[2:])
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise ValueError(
            f"expected a non-empty (N, H, W, 1 or 3) image batch, got shape {images.shape}"
        )
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    pixels = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    out = np.full(
        (rows * (h + padding) + padding, columns * (w + padding) + padding, c), BACKGROUND, np.uint8
    )
    for i in range(n):
        top = padding + (i // columns) * (h + padding)
        left = padding + (i % columns) * (w + padding)
        out[top : top + h, left : left + w] = pixels[i]
    return out


def save_grid(path, images, columns=None, padding=PADDING):
    """Write ``grid(images, columns)`` as a PNG (greyscale for one channel)."""
    pixels = grid(images, columns, padding)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path, format="PNG")
    return pixels.shape[:2]
