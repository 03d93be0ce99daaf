"""Image operations of the loaders: crop boxes, decode-crop-resize on the CPU or the device, and
normalisation.

Crop boxes are drawn on the header's width and height before anything is decoded, so a decode can
skip what the crop does not need: large crops are decoded at 1/2, 1/4 or 1/8 scale by
libjpeg-turbo (through simplejpeg), then cropped and resized with antialiased bilinear
interpolation on uint8. With ``decode_device: cuda`` the same boxes are cut from JPEGs decoded by
nvJPEG on the device instead. Normalisation runs on the device, on whole batches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) as torchvision's RandomResizedCrop draws it: up to ten
    tries at a random area fraction in ``scale`` and log-uniform aspect ratio in ``ratio``, else the
    largest centred crop within ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Training's random per-sample transform. Each field is the run key of the same name (in the
    schema, which declares its type and default), copied by :meth:`from_run`: a new augmentation
    setting is declared in the schema and used here, and nowhere else."""

    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]

    @classmethod
    def from_run(cls, run: Any) -> Augmentation:
        return cls(**{field.name: getattr(run, field.name) for field in dataclasses.fields(cls)})

    def draw(self, width: int, height: int, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
        """One sample's crop box and horizontal flip, drawn as torchvision's RandomResizedCrop and
        RandomHorizontalFlip draw them (the box first, then the flip, from the sample's generator)."""
        box = random_resized_crop_box(width, height, self.crop_scale, rng, self.crop_ratio)
        return box, bool(rng.random() < 0.5)


def _kept_span(original: int, resized: int, size: int) -> tuple[int, int]:
    """(start, length) in original pixels of the ``size`` centre pixels of an axis resized from
    ``original`` to ``resized`` pixels, offset as CenterCrop does (``round((resized - size) / 2)``)."""
    if size >= resized:  # CenterCrop pads instead of cropping: the whole axis is kept
        return 0, original
    offset = round((resized - size) / 2)
    start = round(offset * original / resized)
    end = min(original, round((offset + size) * original / resized))
    return start, max(1, end - start)


def center_crop_box(width: int, height: int, resize: int, size: int) -> tuple[int, int, int, int]:
    """The region of the original that torchvision's ``Resize(resize)`` then ``CenterCrop(size)``
    keeps, to the nearest pixel. Resize truncates the longer side to ``int(resize · long / short)``,
    so the two axes' scales differ slightly; at eval sizes like 73 that moves an edge by >1 %."""
    short, long = min(width, height), max(width, height)
    resized_long = int(resize * long / short)
    resized_w, resized_h = (resize, resized_long) if width <= height else (resized_long, resize)
    left, w = _kept_span(width, resized_w, size)
    top, h = _kept_span(height, resized_h, size)
    return left, top, w, h


# libjpeg-turbo has SIMD inverse DCTs for full size and for 1/2, 1/4 and 1/8 scaling; its 5/8, 6/8
# and 7/8 scales run plain-C IDCTs and decode *slower* than full size (CPU time on 300–500 px JPEGs,
# docs/benchmarks/loader.md: 1.4x, 1.6x, 1.8x the full-size time; 1/2 and 3/8 0.93x, 1/4 0.76x,
# 1/8 0.64x). Picking the smallest n/8 that covers the crop, as this did before, made the train
# pipeline 1.19x slower at 224 px from 300–500 px images.
FAST_DCT_SCALES = (1, 2, 4)  # in eighths, smallest first
# A scaled decode averages over the JPEG's blocks, and its box snaps to the coarser pixel grid.
# Leaving the last factor of two or more to the antialiased resize (Pillow's ``reducing_gap`` makes
# the same trade) keeps both small: on random crops of the textured test drawings, the mean
# difference to a full-size decode + resize was 1.6 / 2.1 / 2.6 grey levels at 1/2 / 1/4 / 1/8
# scale, against 2.0 / 2.3 / 3.9 when decoding right down to the output size (full size: 1.0,
# from the fast IDCT).
DCT_REDUCING_GAP = 2


def dct_scale(crop_width: int, crop_height: int, size: int) -> int:
    """The decode scale in eighths: the smallest of :data:`FAST_DCT_SCALES` at which the crop still
    has ``DCT_REDUCING_GAP`` × ``size`` pixels each way, else 8 (full size, also for crops smaller
    than ``size``). So a decode is never smaller than the output needs."""
    least = 8 * DCT_REDUCING_GAP * size
    for eighths in FAST_DCT_SCALES:
        if crop_width * eighths >= least and crop_height * eighths >= least:
            return eighths
    return 8


def decode_crop(jpeg: bytes, box: tuple[int, int, int, int], size: int, flip: bool = False) -> torch.Tensor:
    """Decode ``jpeg``, cut ``box`` (in original pixels) and resize it to ``size``×``size``:
    uint8, HWC. Large crops are decoded at 1/2, 1/4 or 1/8 scale (:func:`dct_scale`), which skips
    most of the inverse DCT and colour conversion; the box's edges then snap to the scaled pixel
    grid (by at most 4/eighths original pixels)."""
    height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    left, top, w, h = box
    eighths = dct_scale(w, h, size)
    # simplejpeg picks the smallest scale whose output is at least min_width × min_height.
    image = simplejpeg.decode_jpeg(
        jpeg, colorspace="RGB", fastdct=True, fastupsample=True,
        min_width=-(-width * eighths // 8), min_height=-(-height * eighths // 8),
    )
    # Scaled pixel i covers original pixels [8i/eighths, 8(i+1)/eighths) (the last one may cover a
    # partial block): map the box with exactly that scale, not the ratio of the rounded-up sizes.
    scale = eighths / 8
    y0, x0 = round(top * scale), round(left * scale)
    y1 = min(image.shape[0], max(y0 + 1, round((top + h) * scale)))
    x1 = min(image.shape[1], max(x0 + 1, round((left + w) * scale)))
    # channels_last uint8 takes torch's vectorised antialiased-bilinear kernel. The batch dimension
    # goes in before the permute: added after it, its stride reads as NCHW to torch, which then
    # returns an NCHW result that every later copy has to transpose.
    crop = torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1])).unsqueeze(0).permute(0, 3, 1, 2)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out[0].permute(1, 2, 0)
    return out.flip(1) if flip else out


def decode_jpegs_on_device(jpegs: tuple[torch.Tensor, ...], boxes: torch.Tensor, flips: torch.Tensor, size: int,
                           device: torch.device) -> torch.Tensor:
    """Decode ``jpegs`` (1-D uint8 host tensors) on ``device`` (nvJPEG on a GPU, libjpeg on the
    CPU), cut each one's box, resize it to ``size``×``size`` and flip it where ``flips`` says:
    uint8 NHWC, like :func:`decode_crop` on the CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg  # torchvision's image I/O only on this path

    # RGB mode: a greyscale JPEG would otherwise come back with one channel.
    images = decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device)
    out = torch.empty((len(images), size, size, 3), dtype=torch.uint8, device=device)
    for i, (image, (left, top, w, h), flip) in enumerate(zip(images, boxes.tolist(), flips.tolist())):
        crop = image[:, top:top + h, left:left + w].unsqueeze(0).float()
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        resized = resized[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
        out[i] = resized.flip(1) if flip else resized
    return out


def normalize(images: torch.Tensor, memory_format=torch.channels_last) -> torch.Tensor:
    """uint8 NHWC → float NCHW normalised with ImageNet's mean and std. channels_last (the NHWC
    bytes as they come) suits GPU convolutions; CPU ones run faster on plain NCHW here."""
    x = images.permute(0, 3, 1, 2).float()
    mean, std = _normalisation_constants(x.device)
    return ((x - mean) / std).contiguous(memory_format=memory_format)


@functools.lru_cache(maxsize=None)
def _normalisation_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a fresh host-to-device copy every step would make the host wait.
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std
