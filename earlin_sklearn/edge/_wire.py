"""The wire format between the edge runner and the cloud server: batches of tensors as raw bytes.

NumPy only: the device encodes, the server decodes, with the same code. A
request body is the batch's tensors one after another, each C-contiguous and
little-endian, encoded as:

- ``float32`` or ``float16``: the values;
- ``int8``: per tensor, ``N`` float32 scales, ``N`` float32 offsets, then the
  ``uint8`` codes (per-input affine quantization, see :func:`quantize_uint8`).

Headers carry what the body cannot: ``X-Earlin-Batch`` (N),
``X-Earlin-Encoding``, ``X-Earlin-Compression`` (``none`` or ``zstd``: the
body above, entropy-coded with Zstandard) and ``X-Earlin-Version`` (the cloud
model the payload was cut for; activations of another model would be
silently wrong).
"""

import io
import math
import re

import numpy as np

from .._constants import COMPRESSIONS, ENCODINGS, IMAGE_FORMATS

HEADER_BATCH = "X-Earlin-Batch"
HEADER_ENCODING = "X-Earlin-Encoding"
HEADER_VERSION = "X-Earlin-Version"
HEADER_COMPRESSION = "X-Earlin-Compression"
# an edge report (POST /v1/report): the device id it carries, and the most inputs one report may count
DEVICE_ID = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
MAX_REPORT_INPUTS = 1_000_000


def as_float32(t):
    """A C-contiguous float32 ndarray of ``t`` (an ndarray, or a CPU tensor of any framework with ``numpy()``)."""
    if hasattr(t, "detach"):  # a torch tensor: detached and on the CPU, without importing torch here
        t = t.detach().cpu().numpy()
    return np.ascontiguousarray(t, dtype=np.float32)


def _zstd():
    from .._optional import require

    return require("zstd compression", "serve", "zstandard")[0]


def compress(body, compression, level=3):
    """``body`` entropy-coded (``"zstd"``: Zstandard at ``level``) or as it is (``"none"``)."""
    if compression == "none":
        return body
    if compression != "zstd":
        raise ValueError(f"compression must be one of {COMPRESSIONS}; got {compression!r}.")
    return _zstd().ZstdCompressor(level=level).compress(body)


def compressed_limit(expected):
    """Most bytes a compressed body of ``expected`` bytes may take (Zstandard's worst case, with margin)."""
    return expected + expected // 128 + 1024


def decompress(body, compression, expected):
    """The body of ``expected`` bytes; ValueError when it is damaged or decompresses to anything else.

    Decompression stops at ``expected`` bytes, so a small body that would
    inflate to gigabytes (a decompression bomb) costs nothing.
    """
    if compression == "none":
        return body
    zstd = _zstd()
    try:
        out = zstd.ZstdDecompressor().decompress(body, max_output_size=expected)
    except zstd.ZstdError as exc:
        raise ValueError(f"the zstd body is damaged or larger than the {expected} bytes expected: {exc}") from None
    if len(out) != expected:
        raise ValueError(f"the zstd body holds {len(out)} bytes; {expected} were expected.")
    return out


def quantize_uint8(t):
    """Per-input affine 8-bit quantization of ``t`` (N, ...): returns ``(codes, scale, low)`` as ndarrays."""
    t = as_float32(t)
    flat = t.reshape(t.shape[0], -1)
    low, high = flat.min(axis=1), flat.max(axis=1)
    scale = np.maximum((high - low) / np.float32(255.0), np.float32(1e-12))
    shape = (-1,) + (1,) * (t.ndim - 1)
    codes = np.clip(np.round((t - low.reshape(shape)) / scale.reshape(shape)), 0, 255).astype(np.uint8)
    return codes, scale, low


def dequantize_uint8(codes, scale, low):
    """The inverse of :func:`quantize_uint8` (up to its rounding), float32."""
    shape = (-1,) + (1,) * (codes.ndim - 1)
    return codes.astype(np.float32) * scale.reshape(shape) + low.reshape(shape)


def transfer_seconds(n_bytes, uplink_mbit_s):
    """Seconds to send ``n_bytes`` over an uplink of ``uplink_mbit_s`` megabits per second."""
    return n_bytes * 8 / (uplink_mbit_s * 1e6)


def encoded_size(shapes, batch, encoding):
    """Bytes of a body holding ``batch`` inputs of tensors with per-input ``shapes``."""
    per = [math.prod(s) for s in shapes]
    if encoding == "float32":
        return 4 * batch * sum(per)
    if encoding == "float16":
        return 2 * batch * sum(per)
    if encoding == "int8":
        return batch * sum(per) + 8 * batch * len(per)
    raise ValueError(f"encoding must be one of {ENCODINGS}; got {encoding!r}.")


def encode(tensors, encoding):
    """Bytes of the tensors (each of shape (N, ...), ndarrays or CPU tensors) in ``encoding``."""
    parts = []
    for t in tensors:
        t = as_float32(t)
        if encoding == "float32":
            parts.append(t.astype("<f4", copy=False).tobytes())
        elif encoding == "float16":
            parts.append(t.astype("<f2").tobytes())
        elif encoding == "int8":
            codes, scale, low = quantize_uint8(t)
            parts += [scale.astype("<f4").tobytes(), low.astype("<f4").tobytes(), codes.tobytes()]
        else:
            raise ValueError(f"encoding must be one of {ENCODINGS}; got {encoding!r}.")
    return b"".join(parts)


def decode(body, shapes, batch, encoding):
    """Float32 ndarrays ``(batch, *shape)`` from a body; ValueError if it does not fit exactly."""
    expected = encoded_size(shapes, batch, encoding)
    if len(body) != expected:
        raise ValueError(
            f"body has {len(body)} bytes; {batch} input(s) of shapes {[list(s) for s in shapes]} "
            f"in {encoding} take {expected} bytes (wrong shape, batch size, encoding or truncated body)."
        )
    out, pos = [], 0
    for shape in shapes:
        n = batch * math.prod(shape)
        if encoding == "int8":
            scale = np.frombuffer(body, "<f4", batch, pos).astype(np.float32)
            low = np.frombuffer(body, "<f4", batch, pos + 4 * batch).astype(np.float32)
            pos += 8 * batch
            codes = np.frombuffer(body, "u1", n, pos).reshape(batch, *shape)
            pos += n
            t = dequantize_uint8(codes, scale, low)
        else:
            dtype, size = ("<f4", 4) if encoding == "float32" else ("<f2", 2)
            t = np.frombuffer(body, dtype, n, pos).astype(np.float32).reshape(batch, *shape)
            pos += size * n
        if not np.isfinite(t).all():
            raise ValueError("the payload holds NaN or infinite values.")
        out.append(t)
    return out


def preprocess(image, input_shape, preprocessing):
    """A uint8 image ``(H, W, C)`` or ``(H, W)`` -> the model input ``(C, H, W)``: /255, then (x - mean) / std.

    The one place that turns camera pixels into model inputs, for the edge
    runner and the server alike; ``preprocessing`` is the split's (from
    ``save_split(..., preprocessing={"mean": [...], "std": [...]})``).
    """
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"images for upload are uint8 pixels; got {a.dtype}.")
    if a.ndim == 2:
        a = a[:, :, None]
    x = a.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    if tuple(x.shape) != tuple(input_shape):
        raise ValueError(f"the image is {a.shape[1]}x{a.shape[0]} with {a.shape[2]} channel(s); the model takes "
                         f"{input_shape[2]}x{input_shape[1]} with {input_shape[0]}.")
    mean = np.asarray(preprocessing.get("mean", [0.0] * x.shape[0]), dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(preprocessing.get("std", [1.0] * x.shape[0]), dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def encode_image(image, fmt, quality=90):
    """A uint8 image ``(H, W, C)`` as PNG (lossless) or JPEG (``quality``) bytes, with Pillow."""
    from PIL import Image

    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}; got {fmt!r}.")
    a = np.asarray(image)
    img = Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG" if fmt == "png" else "JPEG", **({"quality": int(quality)} if fmt == "jpeg" else {}))
    return buffer.getvalue()


def decode_image(body, fmt, input_shape, preprocessing):
    """The model input ``(1, C, H, W)`` from an uploaded image file; ValueError for anything else.

    The header is read first: a file of another format, or larger than 16x
    the model's input (a decompression bomb), is refused before its pixels
    are decoded.
    """
    from PIL import Image

    # Pillow's decoders raise many types for hostile files (OSError, SyntaxError, EOFError, struct.error,
    # zlib.error, DecompressionBombError, ...): every one is a malformed upload, answered with a 4xx
    try:
        img = Image.open(io.BytesIO(body))
    except Exception as exc:
        raise ValueError(f"the body is not a readable image file: {exc}") from None
    if img.format != ("PNG" if fmt == "png" else "JPEG"):
        raise ValueError(f"the body is a {img.format} file; the {HEADER_ENCODING} header says {fmt}.")
    c, h, w = input_shape
    if img.size[0] * img.size[1] > 16 * h * w:
        raise ValueError(f"the image is {img.size[0]}x{img.size[1]}; the model takes {w}x{h}.")
    try:
        pixels = np.asarray(img.convert("RGB" if c == 3 else "L"))
    except Exception as exc:  # truncated or corrupt pixel data
        raise ValueError(f"the image file is damaged: {exc}") from None
    return preprocess(pixels, input_shape, preprocessing)[None]
