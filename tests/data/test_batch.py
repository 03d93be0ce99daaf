"""Tests of flashnet.data.batch: what a batch may carry, and that Lightning's transfer, the
DataLoader's pinning and pickling (to and from loader workers) keep JPEGs on the host and
everything else in place."""

from __future__ import annotations

import pickle

import pytest
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from torch.utils.data._utils.pin_memory import pin_memory

from flashnet.data.batch import Batch, JpegCrops

# "meta" stands in for a GPU on this CPU-only machine: tensors moved there leave the host.
DEVICE = torch.device("meta")


def decoded_batch(n: int = 3, valid: bool = True) -> Batch:
    images = torch.arange(n * 4 * 4 * 3, dtype=torch.uint8).reshape(n, 4, 4, 3)
    return Batch(torch.arange(n), torch.full((n,), valid), images=images)


def jpeg_batch(n: int = 3) -> Batch:
    crops = JpegCrops(tuple(torch.full((5 + i,), i, dtype=torch.uint8) for i in range(n)),
                      torch.tensor([[0, 0, 8, 8]] * n), torch.tensor([i % 2 == 1 for i in range(n)]))
    return Batch(torch.arange(n), torch.ones(n, dtype=torch.bool), jpegs=crops)


def test_a_batch_carries_images_or_jpegs_and_one_length():
    images = torch.zeros((2, 4, 4, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match="either decoded images or JPEGs, not both or neither"):
        Batch(torch.arange(2), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="either decoded images or JPEGs, not both or neither"):
        Batch(torch.arange(3), torch.ones(3, dtype=torch.bool), images=images, jpegs=jpeg_batch().jpegs)
    with pytest.raises(ValueError, match=r"labels, mask and images differ in length: \[2, 3\]"):
        Batch(torch.arange(3), torch.ones(3, dtype=torch.bool), images=images)
    assert len(decoded_batch(3)) == len(jpeg_batch(3)) == 3


def test_lightning_moves_labels_mask_and_images_but_leaves_jpegs_on_the_host():
    """Lightning's default transfer (move_data_to_device) calls the batch's own ``to``."""
    moved = move_data_to_device(decoded_batch(), DEVICE)
    assert isinstance(moved, Batch)
    assert {moved.labels.device, moved.valid.device, moved.images.device} == {DEVICE}

    original = jpeg_batch()
    moved = move_data_to_device(original, DEVICE)
    assert moved.labels.device == moved.valid.device == DEVICE
    assert moved.jpegs is original.jpegs  # nvJPEG reads the bytes from host memory
    assert original.labels.device.type == "cpu"  # the loader's batch itself is not changed


def test_pinning_keeps_the_batch_and_pins_every_tensor(monkeypatch):
    """The DataLoader's pin-memory step calls the batch's ``pin_memory``; every tensor, JPEG bytes
    included, comes back pinned (a CPU-only torch cannot pin, so pinning is recorded instead)."""
    pinned = []

    def record(tensor, *args):
        copy = tensor.clone()
        pinned.append(copy)
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", record)
    for batch in (decoded_batch(), jpeg_batch()):
        pinned.clear()
        out = pin_memory(batch)
        assert isinstance(out, Batch) and torch.equal(out.labels, batch.labels)
        tensors = [out.labels, out.valid] + ([out.images] if out.jpegs is None else
                                             [*out.jpegs.jpegs, out.jpegs.boxes, out.jpegs.flips])
        assert {id(t) for t in tensors} == {id(t) for t in pinned}


def test_a_batch_survives_pickling_as_loader_workers_send_it():
    for batch in (decoded_batch(valid=False), jpeg_batch()):
        copy = pickle.loads(pickle.dumps(batch))
        assert torch.equal(copy.labels, batch.labels) and torch.equal(copy.valid, batch.valid)
        if batch.jpegs is None:
            assert torch.equal(copy.images, batch.images)
        else:
            assert all(torch.equal(a, b) for a, b in zip(copy.jpegs.jpegs, batch.jpegs.jpegs))


def test_decoded_images_are_handed_over_as_they_are():
    batch = decoded_batch()
    assert batch.device_images(4, torch.device("cpu")) is batch.images
