"""The one batch type every loader path hands to training, evaluation and the benchmarks.

A batch carries its labels, a validity mask (False only for the val loader's padding samples,
which exist so every rank runs the same number of batches) and its images in one of two forms:
decoded on the CPU workers (uint8 NHWC), or still JPEG bytes with the crop box and flip the
workers drew, for nvJPEG to decode on the device (``decode_device: cuda``).

Lightning moves a batch with :meth:`Batch.to` (any object with a ``to`` method is moved that way,
``lightning_fabric``'s ``move_data_to_device``) and the DataLoader pins it with
:meth:`Batch.pin_memory`; both leave the JPEG bytes in host memory, where nvJPEG reads them.
"""

from __future__ import annotations

import dataclasses

import torch

from .transforms import decode_jpegs_on_device


@dataclasses.dataclass(frozen=True)
class JpegCrops:
    """Undecoded images: each JPEG's bytes (1-D uint8), its crop box (left, top, width, height,
    in original pixels) and whether to flip it."""

    jpegs: tuple[torch.Tensor, ...]
    boxes: torch.Tensor  # (N, 4) int64
    flips: torch.Tensor  # (N,) bool

    def __len__(self) -> int:
        return len(self.jpegs)

    def pin_memory(self) -> JpegCrops:
        return JpegCrops(tuple(jpeg.pin_memory() for jpeg in self.jpegs), self.boxes.pin_memory(),
                         self.flips.pin_memory())


@dataclasses.dataclass(frozen=True)
class Batch:
    """Labels, validity mask, and either ``images`` (decoded) or ``jpegs`` (to decode on the device)."""

    labels: torch.Tensor  # (N,) int64
    valid: torch.Tensor  # (N,) bool: False marks val padding, which no metric counts
    images: torch.Tensor | None = None  # (N, H, W, 3) uint8, decoded by the loader workers
    jpegs: JpegCrops | None = None

    def __post_init__(self):
        if (self.images is None) == (self.jpegs is None):
            raise ValueError("a batch carries either decoded images or JPEGs, not both or neither")
        sizes = {len(self.labels), len(self.valid), len(self.images if self.images is not None else self.jpegs)}
        if len(sizes) != 1:
            raise ValueError(f"a batch's labels, mask and images differ in length: {sorted(sizes)}")

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Batch:
        """The tensors the step reads on ``device``; JPEGs stay on the host for nvJPEG."""
        device = torch.device(device)
        # Asynchronous from pinned memory, as Lightning copies plain tensors; never to the CPU.
        non_blocking = device.type == "cuda"
        return dataclasses.replace(
            self,
            labels=self.labels.to(device, non_blocking=non_blocking),
            valid=self.valid.to(device, non_blocking=non_blocking),
            images=None if self.images is None else self.images.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        return Batch(self.labels.pin_memory(), self.valid.pin_memory(),
                     None if self.images is None else self.images.pin_memory(),
                     None if self.jpegs is None else self.jpegs.pin_memory())

    def device_images(self, size: int, device: torch.device) -> torch.Tensor:
        """uint8 NHWC ``size``-pixel images on ``device``: the decoded ones, or the JPEGs decoded there."""
        if self.jpegs is None:
            return self.images.to(device)
        return decode_jpegs_on_device(self.jpegs.jpegs, self.jpegs.boxes, self.jpegs.flips, size, device)
