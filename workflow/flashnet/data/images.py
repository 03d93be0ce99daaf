"""One input file → the JPEG bytes a shard holds: checked the way the loader decodes, converted
to 8-bit RGB where it is not an RGB JPEG already (scaling wide modes, not clipping them), shrunk to
``max_side``, or rejected with the reason."""

from __future__ import annotations

import io
import warnings

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError


class Rejected(Exception):
    """An input file that cannot be used as an image; the message is the reason."""


_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
# Some encoders pad after the end-of-image marker; it must lie within the file's last bytes.
_JPEG_END_WINDOW = 1024
# libjpeg-turbo's name for a JPEG's colour space → (what the check decodes it to, why it is converted).
_JPEG_COLOUR_SPACES = {
    "YCbCr": ("RGB", None),
    "RGB": ("RGB", None),
    "Gray": ("GRAY", "greyscale JPEG converted to RGB"),
    "CMYK": ("CMYK", "CMYK JPEG converted to RGB"),
    "YCCK": ("CMYK", "CMYK JPEG converted to RGB"),
}


CHECKS = ("decode", "header")


def prepare_image(data: bytes, max_side: int | None, quality: int, check: str = "decode",
                  ) -> tuple[bytes, str | None, bool]:
    """Check one input file and return (jpeg bytes, conversion reason or None, resized?).

    A JPEG is checked the way the loader decodes it: libjpeg-turbo through simplejpeg in strict
    mode, which also fails on the "corrupt JPEG data" warnings that PIL lets pass (the loader would
    crash on such a file mid-epoch). The check decodes every coefficient at 1/8 scale: libjpeg's DCT
    scaling skips most of the inverse DCT, and the entropy decoding that finds truncated and corrupt
    files is all done. RGB JPEGs within ``max_side`` keep their bytes; CMYK and greyscale JPEGs,
    larger ones, and other formats (a PNG named .JPEG) are decoded by PIL and re-encoded as RGB JPEG.
    Raises :class:`Rejected` for what cannot be decoded.

    ``check="header"`` reads only the JPEG header and looks for the end-of-image marker: it catches
    empty, truncated and non-JPEG files at a tenth of the cost, but not corrupt compressed data,
    which then fails the training job that reaches it.
    """
    if not data:
        raise Rejected("empty file (0 bytes)")
    if not data.startswith(_JPEG_MAGIC):
        return _reencode(data, max_side, quality, jpeg_conversion=None)
    try:
        height, width, colour_space, _ = simplejpeg.decode_jpeg_header(data)
        if colour_space not in _JPEG_COLOUR_SPACES:
            raise ValueError(f"JPEG in the {colour_space} colour space")
        decode_as, conversion = _JPEG_COLOUR_SPACES[colour_space]
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            # The limit PIL enforces on the files it converts, for JPEGs kept as they are too.
            return _shrink_large_jpeg(data, width, height, decode_as, max_side, quality)
        if check == "header":
            if data.rfind(_JPEG_END, max(0, len(data) - _JPEG_END_WINDOW)) < 0:
                raise ValueError("no end-of-image marker: truncated JPEG")
        else:
            # min_width/min_height ask for DCT scaling; min_factor picks 1/8 (simplejpeg scales only with both).
            simplejpeg.decode_jpeg(data, colorspace=decode_as, min_width=1, min_height=1, min_factor=8, strict=True)
    except ValueError as error:
        raise Rejected(f"unreadable image: {error}") from None
    too_big = max_side is not None and max(width, height) > max_side
    if conversion is None and not too_big:
        return data, None, False
    return _reencode(data, max_side, quality, conversion)


def _too_large(width: int, height: int, hint: str = "") -> Rejected:
    return Rejected(f"{width}×{height} image is larger than {Image.MAX_IMAGE_PIXELS} pixels (PIL's "
                    f"decompression-bomb limit){hint}")


def _header_size(data: bytes) -> tuple[int, int]:
    """An image's size from its header, past PIL's bomb check (nothing is decoded; one thread)."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return Image.open(io.BytesIO(data)).size
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _shrink_large_jpeg(data: bytes, width: int, height: int, decode_as: str, max_side: int | None, quality: int):
    """A JPEG over PIL's pixel limit, decoded in bounded memory when ``max_side`` shrinks it anyway:
    libjpeg's DCT scaling decodes it at 1/2 to 1/8 of its size directly (which also checks every
    coefficient), then it is resized and re-encoded. Otherwise it is rejected, saying why."""
    if max_side is None or max(width, height) <= max_side:
        raise _too_large(width, height, "; set shards.max_side to shrink such images instead")
    if decode_as != "RGB":
        raise _too_large(width, height, " and not a YCbCr/RGB JPEG, which alone are decoded scaled down")
    scale = max_side / max(width, height)
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=max(1, int(width * scale)),
                                        min_height=max(1, int(height * scale)), strict=True)
    except ValueError as error:
        raise Rejected(f"unreadable image: {error}") from None
    if pixels.shape[0] * pixels.shape[1] > Image.MAX_IMAGE_PIXELS:
        raise _too_large(width, height, ", and more than that even at 1/8 scale")
    image = Image.fromarray(pixels, "RGB")
    image.thumbnail((max_side, max_side), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue(), None, True


def _reencode(data: bytes, max_side: int | None, quality: int, jpeg_conversion: str | None):
    """Decode with PIL (any format it reads), convert to RGB, shrink to ``max_side``, encode as JPEG."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise _too_large(*_header_size(data)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise Rejected(f"unreadable image: {error}") from None
    rgb, scaled = to_rgb8(image)
    if image.format == "JPEG":
        conversion = jpeg_conversion
    else:
        conversion = f"{image.format or 'unknown'} file converted to an RGB JPEG"
    if scaled:
        conversion = f"{conversion or 'converted to an RGB JPEG'} ({scaled})"
    too_big = max_side is not None and max(image.size) > max_side
    if too_big:
        rgb.thumbnail((max_side, max_side), Image.LANCZOS)
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue(), conversion, too_big


# PIL's integer modes of more than 8 bits, and the full scale of their values.
_WIDE_INT_MODES = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16}


def to_rgb8(image: Image.Image) -> tuple[Image.Image, str | None]:
    """``image`` as 8-bit RGB, and a note if its values had to be scaled to 8 bits.

    PIL's ``convert("RGB")`` clips 16- and 32-bit values at 255 instead of scaling them, which
    turns a 16-bit greyscale PNG or TIFF nearly white. Those modes are scaled from their full range
    here: ``I;16*`` from 16 bits; ``I`` (32-bit integers) from the file's bits per sample where the
    TIFF says, else from 16 bits if every value fits (a 16-bit PNG as older PILs open it), else 32;
    ``F`` (floats) from [0, 1] if every value lies in it, else from 8 or 16 bits like ``I``. Every
    other mode (1, L, P, RGBA, LA, PA, CMYK, YCbCr, ...) converts as PIL does (alpha is dropped).
    """
    mode = image.mode
    if mode not in _WIDE_INT_MODES and mode not in ("I", "F"):
        return image.convert("RGB"), None
    values = np.asarray(image, dtype=np.float64)
    if mode in _WIDE_INT_MODES:
        bits = _WIDE_INT_MODES[mode]
    else:
        peak = float(values.max(initial=0.0))
        tiff_bits = getattr(image, "tag_v2", {}).get(258) if image.format == "TIFF" else None
        if isinstance(tiff_bits, tuple):
            tiff_bits = tiff_bits[0]
        if mode == "F" and peak <= 1.0:
            bits = 0
        elif tiff_bits and mode == "I":
            bits = int(tiff_bits)
        else:
            bits = 8 if peak <= 255 and mode == "F" else 16 if peak <= 65535 else 32
    full_scale = 1.0 if bits == 0 else float(2 ** min(bits, 31) - 1)  # mode I is signed 32-bit
    grey = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    what = "floating-point" if mode == "F" else f"{bits}-bit"
    return Image.fromarray(grey, "L").convert("RGB"), f"{what} greyscale scaled to 8 bits"
