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
    uint8 NHWC, like :func:`decode_crop` on the CPU.

    One decode call for the batch, then :func:`crop_resize_flip` in a few batched operations. On a
    GPU both run on a side stream that the current (compute) stream then waits for on the device,
    not on the host: the decode of this batch overlaps the compute still queued from the previous
    step, as far as the host runs ahead of the GPU (a step with no host sync: most of a step)."""
    from torchvision.io import ImageReadMode, decode_jpeg  # torchvision's image I/O only on this path

    device = torch.device(device)
    if device.type != "cuda":
        images = decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device)
        return crop_resize_flip(images, boxes, flips, size)
    # No wait for the compute stream before decoding: the inputs are host memory, and the caching
    # allocator hands a stream only blocks allocated on that stream, so nothing here can overwrite
    # what the queued compute still reads.
    compute = torch.cuda.current_stream(device)
    side = _decode_stream(device)
    with torch.cuda.stream(side):
        # RGB mode: a greyscale JPEG would otherwise come back with one channel.
        images = decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device)
        out = crop_resize_flip(images, boxes, flips, size)
    compute.wait_stream(side)
    out.record_stream(compute)  # the allocator must not hand its memory to the side stream while compute reads it
    return out


@functools.cache
def _decode_stream(device: torch.device) -> "torch.cuda.Stream":
    return torch.cuda.Stream(device)


# How much padding a group of crops may carry: its padded pixels at most this many times the crops'
# own. Random-resized crops of one batch differ a lot in size (8-100% of an image's area); one padded
# tensor for all of them would mostly hold padding, one per crop would bring back the per-image loop.
GROUP_PADDING = 1.5
# And at most this many padded pixels: the gather's int64 index costs 24 bytes a pixel (3 channels),
# so 2^24 pixels (a few full-size ImageNet crops... 256 small ones) hold it to 400 MB.
GROUP_MAX_PIXELS = 2 ** 24


def size_groups(sizes: list[tuple[int, int]], padding: float = GROUP_PADDING,
                max_pixels: int = GROUP_MAX_PIXELS) -> list[list[int]]:
    """Indices of ``sizes`` ((height, width) each) in groups whose padded area — count × tallest ×
    widest — is at most ``padding`` × their summed area and at most ``max_pixels``: the crops sorted
    by area, a group closed when the next one would break a bound. Every index is in exactly one
    group (a crop larger than ``max_pixels`` alone in its own)."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i][0] * sizes[i][1], reverse=True)
    groups: list[list[int]] = []
    group: list[int] = []
    tallest = widest = area = 0
    for i in order:
        h, w = sizes[i]
        t, wd, a = max(tallest, h), max(widest, w), area + h * w
        if group and ((len(group) + 1) * t * wd > padding * a or (len(group) + 1) * t * wd > max_pixels):
            groups.append(group)
            group, t, wd, a = [], h, w, h * w
        group.append(i)
        tallest, widest, area = t, wd, a
    if group:
        groups.append(group)
    return groups


def crop_resize_flip(images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Each CHW uint8 image's box (left, top, width, height) resized to ``size``×``size`` and
    flipped where asked, as uint8 NHWC: a few operations per group of similar-sized crops
    (:func:`size_groups`), not per image.

    The crops differ in size, so each group is gathered into one tensor padded to its tallest and
    widest crop, with every crop's last row and column repeated into the padding (one ``take``
    from the batch's images laid end to end): sampling near a crop's far edge then reads its own
    edge, as :func:`torch.nn.functional.interpolate` clamps, never the padding. ``roi_align``
    (aligned, each output pixel the mean of ⌈crop/size⌉² bilinear samples over its area) resizes the
    whole group: bilinear where the crop is enlarged, an area average where it is reduced — close
    to, not equal to, the antialiased bilinear of :func:`decode_crop` (tests/data/test_transforms.py)."""
    from torchvision.ops import roi_align

    device = images[0].device
    count = len(images)
    boxes = boxes.to(torch.int64).cpu()
    # Host-side geometry only: sizes are known without reading the device.
    shapes = [tuple(image.shape[1:]) for image in images]  # (H, W)
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + 3 * h * w)
    flat = torch.cat([image.reshape(-1) for image in images])  # one copy for the batch
    table = torch.tensor([[starts[i], shapes[i][0], shapes[i][1], *boxes[i].tolist()] for i in range(count)],
                         dtype=torch.int64)
    sizes = [(int(b[3]), int(b[2])) for b in boxes]
    groups = size_groups(sizes)
    order = torch.tensor([i for group in groups for i in group], dtype=torch.int64)
    table = table[order].to(device, non_blocking=True)  # rows in group order: each group a contiguous slice
    destination = order.to(device, non_blocking=True)
    resized = torch.empty((count, 3, size, size), dtype=torch.float32, device=device)
    first = 0
    for group in groups:
        rows = table[first:first + len(group)]
        tallest, widest = max(sizes[i][0] for i in group), max(sizes[i][1] for i in group)
        start, _, width, left, top, w, h = (rows[:, k] for k in range(7))
        y = torch.minimum(torch.arange(tallest, device=device)[None], (h - 1)[:, None]) + top[:, None]  # (G, T)
        x = torch.minimum(torch.arange(widest, device=device)[None], (w - 1)[:, None]) + left[:, None]  # (G, W)
        plane = (rows[:, 1] * width)[:, None, None, None]
        index = (start[:, None, None, None] + torch.arange(3, device=device)[None, :, None, None] * plane
                 + (y * width[:, None])[:, None, :, None] + x[:, None, None, :])
        padded = flat.take(index).float()  # (G, 3, tallest, widest)
        rois = torch.stack([torch.arange(len(group), device=device, dtype=torch.float32),
                            torch.zeros(len(group), device=device), torch.zeros(len(group), device=device),
                            w.float(), h.float()], dim=1)
        resized[destination[first:first + len(group)]] = roi_align(
            padded, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        first += len(group)
    flip = flips.to(device, non_blocking=True).view(-1, 1, 1, 1)
    resized = torch.where(flip, resized.flip(-1), resized)
    return resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def crop_resize_flip_each(images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor,
                          size: int) -> torch.Tensor:
    """The image-by-image form of :func:`crop_resize_flip` (antialiased bilinear, ~6 kernels an
    image): the reference its batched form is tested against."""
    out = torch.empty((len(images), size, size, 3), dtype=torch.uint8, device=images[0].device)
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
