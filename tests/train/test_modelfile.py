"""model.pt: one writer, one reader, and bad files named with what is wrong with them."""

from __future__ import annotations

import pytest
import torch
import torchvision

from flashnet.config import RunConfig
from flashnet.data.sources import DataError
from flashnet.train.modelfile import MODEL_FORMAT, load_model, save_model
from flashnet.train.module import build_model

WNIDS = ["n01", "n02", "n03", "n04"]


@pytest.fixture
def saved(tmp_path, tiny_run):
    run = RunConfig.from_dict(tiny_run())
    network = build_model(run, len(WNIDS))
    save_model(tmp_path / "model.pt", "tiny", run, WNIDS, network)
    return tmp_path / "model.pt", run, network


def test_what_is_written_is_read_back(saved):
    path, run, network = saved
    model_file = load_model(path)
    assert (model_file.name, model_file.run, model_file.wnids, model_file.num_classes) == ("tiny", run, WNIDS, 4)
    read = model_file.network.state_dict()
    assert all(torch.equal(value, read[key]) for key, value in network.state_dict().items())
    model_file.network.eval()
    assert model_file.network(torch.zeros(1, 3, 32, 32)).shape == (1, 4)  # usable, on the CPU
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left beside it


def test_the_file_keeps_only_what_a_reader_reads(saved):
    """The architecture, image size and evaluation resize are the run's; stored beside it as well,
    they were read by nothing and could disagree with it."""
    record = torch.load(saved[0], weights_only=True)
    assert set(record) == {"format", "name", "num_classes", "wnids", "run", "state_dict"}
    assert record["format"] == MODEL_FORMAT


def test_a_missing_model_says_training_did_not_finish(tmp_path):
    with pytest.raises(DataError, match=r"model\.pt: missing: training did not finish"):
        load_model(tmp_path / "model.pt")


def test_a_checkpoint_that_does_not_load_is_named(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"model\.pt: not a loadable checkpoint"):
        load_model(tmp_path / "model.pt")


def test_a_file_of_another_format_is_named(saved):
    record = torch.load(saved[0], weights_only=True)
    torch.save({**record, "format": "flashnet-model/0"}, saved[0])
    with pytest.raises(DataError, match=r"model\.pt: not a flashnet model file"):
        load_model(saved[0])


def test_weights_of_another_architecture_are_named(saved, tmp_path):
    record = torch.load(saved[0], weights_only=True)
    record["state_dict"] = torchvision.models.resnet34(num_classes=4).state_dict()
    torch.save(record, tmp_path / "model.pt")
    with pytest.raises(DataError, match="weights do not fit a resnet18 with 4 classes"):
        load_model(tmp_path / "model.pt")
