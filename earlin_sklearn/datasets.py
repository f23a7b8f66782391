"""Offline image sets: ID digits and OOD sets built from what the dependencies ship.

Nothing here downloads anything: scikit-learn bundles the digits and two
sample photographs, Pillow bundles a font.
"""

import numpy as np


def load_digits_images():
    """Digits as float32 (N, 1, 8, 8) in [0, 1], and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


def natural_patches(n, rng):
    """Grayscale 8x8 patches of scikit-learn's sample photographs, in [0, 1]."""
    from sklearn.datasets import load_sample_images

    photos = [img.mean(axis=2) / 255.0 for img in load_sample_images().images]
    out = np.empty((n, 1, 8, 8), dtype=np.float32)
    for i in range(n):
        img = photos[i % len(photos)]
        # a 32x32 crop box-averaged to 8x8: the scale of a digit
        r, c = rng.integers(0, img.shape[0] - 32), rng.integers(0, img.shape[1] - 32)
        out[i, 0] = img[r : r + 32, c : c + 32].reshape(8, 4, 8, 4).mean(axis=(1, 3))
    return out


def printed_letters(n, rng):
    """Capital letters drawn with Pillow's built-in font, 8x8 in [0, 1], randomly shifted."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    glyphs = []
    for ch in "ABCDEFGHJKLMNPQRTUVWXYZ":
        canvas = Image.new("L", (16, 16), 0)
        ImageDraw.Draw(canvas).text((4, 2), ch, fill=255, font=font)
        glyphs.append(np.asarray(canvas, dtype=np.float32) / 255.0)
    out = np.empty((n, 1, 8, 8), dtype=np.float32)
    for i in range(n):
        g = np.roll(glyphs[i % len(glyphs)], rng.integers(-2, 3, size=2), axis=(0, 1))
        small = g.reshape(8, 2, 8, 2).mean(axis=(1, 3))
        out[i, 0] = small / max(small.max(), 1e-6)
    return out




def noise_images(n, kind, rng, shape=(1, 8, 8), mean=0.5, std=0.25):
    """ODIN-style noise images in [0, 1]: ``"gaussian"`` (clipped) or ``"uniform"``."""
    if kind == "gaussian":
        return np.clip(rng.normal(mean, std, size=(n, *shape)), 0, 1).astype(np.float32)
    if kind == "uniform":
        return rng.uniform(0, 1, size=(n, *shape)).astype(np.float32)
    raise ValueError(f"kind must be 'gaussian' or 'uniform'; got {kind!r}.")
