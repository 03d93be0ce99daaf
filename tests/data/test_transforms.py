"""Tests of flashnet.data.transforms against torchvision's own transforms: crop boxes drawn and
kept as torchvision's RandomResizedCrop and Resize + CenterCrop do, decode-crop-resize close to
a full-size decode and antialiased resize at every DCT scale, and normalisation."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms as tv_transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from flashnet.data import sample, transforms

# torchvision 0.29 deprecates its image decoders (for TorchCodec); they are the reference here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


def drawn_jpeg(seed: int, min_side: int, max_side: int, mode: str = "jpeg") -> bytes:
    spec = sample.SampleSpec(min_side=min_side, max_side=max_side)
    cls = sample.sample_classes(spec)[seed % spec.classes]
    return sample.encode(sample.draw_image(cls, np.random.default_rng([seed, 99]), spec), mode, 90)


def torchvision_decode(jpeg: bytes, mode=ImageReadMode.RGB) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=mode)


def mean_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()



# --------------------------------------------------------------------------- crop boxes


def box_statistics(boxes: np.ndarray, width: int, height: int) -> dict[str, np.ndarray]:
    left, top, w, h = boxes.T.astype(float)
    return {"area": w * h / (width * height), "log_aspect": np.log(w / h),
            "centre_x": (left + w / 2) / width, "centre_y": (top + h / 2) / height}


def test_random_resized_crop_box_stays_within_scale_ratio_and_image():
    width, height, scale, ratio = 400, 300, (0.08, 1.0), (3 / 4, 4 / 3)
    rng = np.random.default_rng(0)
    boxes = np.array([transforms.random_resized_crop_box(width, height, scale, rng) for _ in range(4000)])
    left, top, w, h = boxes.T
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= width).all() and (top + h <= height).all()
    # w and h are rounded to whole pixels, so area and aspect may pass the bounds by that much.
    assert ((w + 0.5) * (h + 0.5) >= scale[0] * width * height).all()
    assert ((w - 0.5) * (h - 0.5) <= scale[1] * width * height).all()
    assert ((w + 0.5) / (h - 0.5) >= ratio[0]).all() and ((w - 0.5) / (h + 0.5) <= ratio[1]).all()


def test_random_resized_crop_box_falls_back_to_the_largest_centred_crop():
    rng = np.random.default_rng(0)
    # A full-area crop never fits a 10:1 image within 3/4..4/3: centred 4:3 of the full height.
    assert transforms.random_resized_crop_box(1000, 100, (1.0, 1.0), rng) == (433, 0, 133, 100)
    assert transforms.random_resized_crop_box(100, 1000, (1.0, 1.0), rng) == (0, 433, 100, 133)
    # An impossible area on an image whose own aspect is allowed: the whole image.
    assert transforms.random_resized_crop_box(400, 300, (2.0, 2.0), rng) == (0, 0, 400, 300)


def test_random_resized_crop_box_draws_like_torchvision():
    """Two-sample KS distance to torchvision's RandomResizedCrop.get_params, per statistic."""
    width, height, n = 400, 300, 4000
    rng = np.random.default_rng(1)
    ours = np.array([transforms.random_resized_crop_box(width, height, (0.08, 1.0), rng) for _ in range(n)])
    torch.manual_seed(1)
    image = torch.empty(3, height, width)
    theirs = []
    for _ in range(n):
        top, left, h, w = tv_transforms.RandomResizedCrop.get_params(image, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])
        theirs.append((left, top, w, h))
    ours_stats, theirs_stats = box_statistics(ours, width, height), box_statistics(np.array(theirs), width, height)
    for name in ours_stats:
        assert ks_2samp(ours_stats[name], theirs_stats[name]).statistic < 0.05, name


@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (300, 300), (67, 225), (662, 698), (1000, 90)])
@pytest.mark.parametrize("resize,size", [(256, 224), (73, 64), (36, 32)])
def test_center_crop_box_is_the_region_torchvision_keeps(width, height, resize, size):
    """Resize + CenterCrop applied to an image of pixel numbers: the kept corner says where the
    crop starts in the resized image; the resized size says how resized pixels map back."""
    resized = v2.Resize(resize, antialias=True)(torch.zeros(1, height, width))
    resized_h, resized_w = resized.shape[1:]
    numbers = torch.arange(resized_h * resized_w).reshape(1, resized_h, resized_w)
    corner = int(v2.CenterCrop(size)(numbers)[0, 0, 0])
    crop_top, crop_left = divmod(corner, resized_w)
    kept_w, kept_h = min(size, resized_w), min(size, resized_h)
    expected = (crop_left * width / resized_w, crop_top * height / resized_h,
                kept_w * width / resized_w, kept_h * height / resized_h)
    left, top, w, h = transforms.center_crop_box(width, height, resize, size)
    edges = (left, top, left + w, top + h)
    expected_edges = (expected[0], expected[1], expected[0] + expected[2], expected[1] + expected[3])
    assert max(abs(a - b) for a, b in zip(edges, expected_edges)) <= 0.5 + 1e-9, (edges, expected_edges)


# --------------------------------------------------------------------------- decoding


def test_dct_scale_leaves_the_last_factor_of_two_to_the_resize():
    assert transforms.dct_scale(100, 100, 224) == 8  # must be enlarged: full size
    assert transforms.dct_scale(895, 2000, 224) == 8
    assert transforms.dct_scale(896, 896, 224) == 4  # 1/2 leaves 448 = 2 x 224
    assert transforms.dct_scale(1792, 1800, 224) == 2
    assert transforms.dct_scale(3584, 4000, 224) == 1
    assert transforms.dct_scale(20000, 20000, 224) == 1  # 1/8 is the smallest there is


def reference_crop(jpeg: bytes, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """torchvision: full-size decode, then resized_crop with antialias; HWC."""
    left, top, w, h = box
    return TF.resized_crop(torchvision_decode(jpeg), top, left, h, w, [size, size], antialias=True).permute(1, 2, 0)


def test_decode_crop_is_close_to_torchvision_at_every_dct_scale():
    """Mean absolute difference, in grey levels, to a full decode + antialiased resize. Boxes on the
    DCT block grid isolate the decoder and the filters (< 2 levels at every scale). Random boxes add
    the snap of a reduced decode's box to its coarser pixel grid: at most 1/4 of an output pixel
    (the reducing gap is 2), which this texture (a random colour field every 32 px, near the
    Nyquist frequency of the smallest outputs) turns into 3-4 levels at 1/8 scale."""
    jpeg = drawn_jpeg(3, 600, 640)
    height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    rng = np.random.default_rng(0)
    for size, eighths, bound in ((128, 8, 2), (100, 4, 3), (56, 2, 3), (32, 1, 4)):
        side = 8 * 2 * size // eighths if eighths < 8 else 320  # the smallest crop at that scale
        aligned = (8, 16, side + 16, side + 8)
        assert aligned[0] + aligned[2] <= width and aligned[1] + aligned[3] <= height
        assert transforms.dct_scale(aligned[2], aligned[3], size) == eighths
        assert mean_abs_difference(transforms.decode_crop(jpeg, aligned, size), reference_crop(jpeg, aligned, size)) < 2
        differences = []
        while len(differences) < 10:
            box = transforms.random_resized_crop_box(width, height, (0.08, 1.0), rng)
            if transforms.dct_scale(box[2], box[3], size) == eighths:
                differences.append(mean_abs_difference(transforms.decode_crop(jpeg, box, size),
                                                       reference_crop(jpeg, box, size)))
        assert np.mean(differences) < bound, (eighths, differences)


def test_decode_crop_never_enlarges_a_reduced_decode(monkeypatch):
    """Spy on the resize: whenever the crop reaching it is smaller than the box (a DCT-scaled
    decode), it still has at least twice the output size each way."""
    jpeg = drawn_jpeg(4, 600, 640)
    height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    crops = []
    interpolate = torch.nn.functional.interpolate

    def spy(input, *args, **kwargs):
        crops.append(tuple(input.shape[-2:]))
        return interpolate(input, *args, **kwargs)

    monkeypatch.setattr(transforms.F, "interpolate", spy)
    rng = np.random.default_rng(0)
    reduced = 0
    for size in (16, 32, 64, 112):
        for _ in range(30):
            left, top, w, h = transforms.random_resized_crop_box(width, height, (0.08, 1.0), rng)
            transforms.decode_crop(jpeg, (left, top, w, h), size)
            crop_h, crop_w = crops[-1]
            eighths = transforms.dct_scale(w, h, size)
            assert abs(crop_w - w * eighths / 8) <= 1 and abs(crop_h - h * eighths / 8) <= 1
            if eighths < 8:
                reduced += 1
                assert min(crop_w, crop_h) >= 2 * size
    assert reduced > 30  # the scaled path was exercised


def test_decode_crop_flip_mirrors_the_crop():
    jpeg = drawn_jpeg(1, 120, 160)
    box = (10, 7, 90, 80)
    assert torch.equal(transforms.decode_crop(jpeg, box, 48, flip=True), transforms.decode_crop(jpeg, box, 48).flip(1))


def test_decode_crop_handles_greyscale_jpegs():
    jpeg = drawn_jpeg(2, 200, 240, mode="grey")
    assert Image.open(io.BytesIO(jpeg)).mode == "L"
    box = (20, 30, 150, 120)
    out = transforms.decode_crop(jpeg, box, 64)
    assert out.shape == (64, 64, 3) and out.dtype == torch.uint8
    assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 0], out[..., 2])
    grey = torchvision_decode(jpeg, ImageReadMode.GRAY)
    reference = TF.resized_crop(grey, box[1], box[0], box[3], box[2], [64, 64], antialias=True)[0]
    assert mean_abs_difference(out[..., 0], reference) < 2


def test_normalize_values_and_layout():
    images = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8).expand(2, 3, 5, 3).contiguous()  # NHWC
    mean, std = np.array(transforms.IMAGENET_MEAN), np.array(transforms.IMAGENET_STD)
    expected = (np.array([0, 128, 255]) / 255 - mean) / std  # per channel
    for memory_format in (torch.channels_last, torch.contiguous_format):
        x = transforms.normalize(images, memory_format)
        assert x.shape == (2, 3, 3, 5) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=memory_format)
        for channel in range(3):
            assert torch.allclose(x[:, channel], torch.tensor(expected[channel], dtype=torch.float32), atol=1e-5)


def test_device_decode_cuts_resizes_and_flips_each_box_like_the_cpu_decode():
    """decode_jpegs_on_device, run here on the CPU (nvJPEG on a GPU): each JPEG's box, resized and
    flipped where asked, close to decode_crop's; a greyscale JPEG comes out as three equal channels."""
    jpegs = [drawn_jpeg(1, 120, 160), drawn_jpeg(2, 200, 240, mode="grey"), drawn_jpeg(1, 120, 160)]
    boxes = [(10, 7, 90, 80), (20, 30, 150, 120), (10, 7, 90, 80)]
    flips = [False, False, True]
    out = transforms.decode_jpegs_on_device(
        tuple(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs),
        torch.tensor(boxes), torch.tensor(flips), 48, torch.device("cpu"))
    assert out.shape == (3, 48, 48, 3) and out.dtype == torch.uint8
    for image, jpeg, box, flip in zip(out, jpegs, boxes, flips):
        assert mean_abs_difference(image, transforms.decode_crop(jpeg, box, 48, flip)) < 3
    assert torch.equal(out[2], out[0].flip(1))
    assert torch.equal(out[1, ..., 0], out[1, ..., 1]) and torch.equal(out[1, ..., 0], out[1, ..., 2])


def test_augmentation_fields_are_run_keys_copied_from_the_run():
    """Each Augmentation field is declared once, as a run key of the schema (type and default there)."""
    from flashnet.config import RUN, RunConfig, schema_fields

    run_keys = {name for name, *_ in schema_fields(RUN)}
    fields = {field.name for field in dataclasses.fields(transforms.Augmentation)}
    assert fields and fields <= run_keys
    run = RunConfig.from_dict({"crop_scale": [0.3, 0.9], "crop_ratio": [0.5, 2.0]}, "x")
    assert transforms.Augmentation.from_run(run) == transforms.Augmentation((0.3, 0.9), (0.5, 2.0))


def test_augmentation_draws_the_box_then_the_flip():
    augmentation = transforms.Augmentation((0.2, 0.9), (0.75, 1.333))
    drawn = [augmentation.draw(500, 375, np.random.default_rng(seed)) for seed in range(200)]
    for seed, (box, flip) in enumerate(drawn):
        rng = np.random.default_rng(seed)
        assert box == transforms.random_resized_crop_box(500, 375, (0.2, 0.9), rng, (0.75, 1.333))
        assert flip == bool(rng.random() < 0.5)
    assert 60 < sum(flip for _, flip in drawn) < 140


def test_batched_crop_resize_flip_matches_the_image_by_image_path():
    """crop_resize_flip (the batched nvJPEG path's crops, here on the CPU) against crop_resize_flip_each:
    images of different sizes, enlarged and reduced crops, crops at the far edges; same shape and
    dtype, values within a grey level on average (area average against antialiased bilinear), flips
    exact. At 224 px, the training size; the two filters part more on strong reductions of fine
    detail (a 500-px crop of 8-px blobs to 48 px: 7 grey levels on average, measured 2026-12-05)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(120, 160), (375, 500), (200, 90), (375, 500), (64, 64)]
    # smooth images (a blurred random field): like photographs, unlike per-pixel noise
    images = [F.interpolate(torch.rand(1, 3, h // 8 + 2, w // 8 + 2, generator=generator) * 255, size=(h, w),
                            mode="bilinear", align_corners=False)[0].round().to(torch.uint8) for h, w in shapes]
    images[3] = images[1].clone()  # the same image twice, flipped the second time
    boxes = torch.tensor([(10, 7, 90, 80), (0, 0, 500, 375), (60, 150, 30, 50), (0, 0, 500, 375), (40, 40, 24, 24)])
    flips = torch.tensor([False, False, True, True, False])
    batched = transforms.crop_resize_flip(images, boxes, flips, 224)
    each = transforms.crop_resize_flip_each(images, boxes, flips, 224)
    assert batched.shape == each.shape == (5, 224, 224, 3) and batched.dtype == torch.uint8
    assert batched.is_contiguous()
    for i in range(5):
        assert mean_abs_difference(batched[i], each[i]) < 1, i
    assert (batched.int() - each.int()).abs().max() <= 8
    assert torch.equal(batched[3], batched[1].flip(1))  # same image and box, flipped


def test_size_groups_bound_the_padding_and_place_every_crop_once():
    sizes = [(375, 500), (30, 40), (370, 480), (32, 40), (200, 200), (28, 44), (2000, 2000)]
    groups = transforms.size_groups(sizes, padding=1.5, max_pixels=2_000_000)
    assert sorted(i for group in groups for i in group) == list(range(len(sizes)))
    for group in groups:
        tallest, widest = max(sizes[i][0] for i in group), max(sizes[i][1] for i in group)
        padded = len(group) * tallest * widest
        assert len(group) == 1 or (padded <= 1.5 * sum(sizes[i][0] * sizes[i][1] for i in group)
                                   and padded <= 2_000_000)
    assert [6] in groups  # larger than max_pixels: alone
    assert {0, 2} <= set(next(group for group in groups if 0 in group))  # similar sizes share a group
