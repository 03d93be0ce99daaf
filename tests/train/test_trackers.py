"""The trackers, for real: a tiny run logs to TensorBoard, MLflow (file store) and W&B (offline), and
each is read back with its own reader, against the run's metrics.csv and steps.csv."""

from __future__ import annotations

import csv
import dataclasses
import json
import struct
import sys
from pathlib import Path

import pytest

from flashnet.config import ConfigError, RunConfig
from flashnet.train import trackers
from flashnet.train.callbacks import StopRequest
from flashnet.train.recipe import TrainSpec, train


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tracked_run(tiny_dataset, tmp_path_factory):
    """Two epochs with all four loggers; W&B kept offline and inside the test's folder."""
    root = tmp_path_factory.mktemp("tracked")
    out = root / "runs" / "tiny"
    out.mkdir(parents=True)
    mlruns = (root / "mlruns").as_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_DIR", str(root / "wandb-home"))
        patch.setenv("WANDB_CONFIG_DIR", str(root / "wandb-config"))
        patch.setenv("WANDB_CACHE_DIR", str(root / "wandb-cache"))
        patch.setenv("WANDB_SILENT", "true")
        run = tiny_dataset.run(loggers=["csv", "tensorboard", "mlflow", "wandb"], mlflow_tracking_uri=mlruns)
        spec = TrainSpec("tiny", run, str(tiny_dataset.train_manifest), str(tiny_dataset.val_manifest), str(out),
                         tiny_dataset.launcher())
        summary = train(spec, None, StopRequest())
    return out, mlruns, summary


def test_tensorboard_events_hold_the_csv_rows(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = tracked_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    epochs, steps = read_csv(out / "metrics.csv"), read_csv(out / "steps.csv")
    top1 = events.Scalars("epochs/val_top1")
    assert [e.step for e in top1] == [int(r["step"]) for r in epochs] == [10, 20]
    assert [e.value for e in top1] == pytest.approx([float(r["val_top1"]) for r in epochs])
    loss = events.Scalars("steps/train_loss")
    assert [e.step for e in loss] == [int(r["step"]) for r in steps]
    assert [e.value for e in loss] == pytest.approx([float(r["train_loss"]) for r in steps], rel=1e-5)
    tags = set(events.Tags()["scalars"])
    assert {"steps/lr", "steps/images_per_s", "epochs/val_top5", "epochs/images_per_s", "epochs/lr",
            "epochs/train_loss"} <= tags
    assert not any(tag in tags for tag in ("val_top1", "val_top5"))  # only the forwarded rows, once


def test_mlflow_run_in_the_file_store(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    out, mlruns, _ = tracked_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as `mlflow ui` needs it for a file store
    client = MlflowClient(tracking_uri=mlruns)
    experiment = client.get_experiment_by_name(trackers.PROJECT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny"
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "1.0" and run.data.params["model"] == "resnet18"
    assert run.data.params["run_name"] == "tiny"
    epochs = read_csv(out / "metrics.csv")
    history = client.get_metric_history(run.info.run_id, "epochs/val_top1")
    assert [(m.step, m.value) for m in history] == [(int(r["step"]), pytest.approx(float(r["val_top1"])))
                                                    for r in epochs]
    assert len(client.get_metric_history(run.info.run_id, "steps/images_per_s")) == len(read_csv(out / "steps.csv"))
    assert json.loads((out / trackers.STATE_FILE).read_text())["mlflow_run_id"] == run.info.run_id


def wandb_records(run_file: Path) -> list[bytes]:
    """The records of an offline W&B run file. W&B's Python side has no reader of its own any more
    (wandb-core writes it), so this reads its documented layout: a 7-byte header (":W&B", magic,
    version), then LevelDB log blocks of 32 KiB, each record a (crc32, length, type) header and its
    bytes, split over blocks as FIRST/MIDDLE/LAST pieces."""
    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, position, records, pending = 32768, 7, [], b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # too short for a header: the block is padded
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:  # zero padding up to the block's end
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST
            records.append(pending)
            pending = b""
    return records


def wandb_history(run_file: Path) -> list[dict[str, float]]:
    """The history rows of an offline W&B run, decoded with W&B's own protobuf messages."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for data in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_metrics(tracked_run):
    out, _, _ = tracked_run
    state = json.loads((out / trackers.STATE_FILE).read_text())
    (folder,) = (out / "wandb").glob(f"offline-run-*-{state['wandb_id']}")
    rows = wandb_history(folder / f"run-{state['wandb_id']}.wandb")
    top1 = [row["epochs/val_top1"] for row in rows if "epochs/val_top1" in row]
    assert top1 == pytest.approx([float(r["val_top1"]) for r in read_csv(out / "metrics.csv")])
    assert sum("steps/train_loss" in row for row in rows) == len(read_csv(out / "steps.csv"))


def test_csv_alone_builds_no_logger(tmp_path, tiny_run):
    run = RunConfig.from_dict(tiny_run())
    assert trackers.build_loggers(run, "tiny", tmp_path) == []


@pytest.mark.parametrize("logger, module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_missing_tracker_package_names_the_extra(monkeypatch, tmp_path, tiny_run, logger, module):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when the package is absent
    run = RunConfig.from_dict(tiny_run(loggers=["csv", logger]))
    with pytest.raises(ConfigError, match=rf"runs.tiny.loggers: {logger} needs the {module} package.*"
                                          r"pip install 'flashnet\[trackers\]'"):
        trackers.build_loggers(run, "tiny", tmp_path)


def test_unknown_logger_is_refused(tiny_run):
    run = {**tiny_run(), "loggers": ["csv", "neptune"]}
    with pytest.raises(ConfigError, match=r"runs\.tiny\.loggers\.1: 'neptune' is not one of \['csv', 'tensorboard', 'mlflow', 'wandb'\]"):
        RunConfig.from_dict(run, "tiny")


# --------------------------------------------------------------------------- checked before submission


@pytest.fixture
def silent_port():
    """A loopback port that takes connections and never answers (listening, never accepting): what
    an MLflow server behind a dead proxy or a firewall that drops packets looks like."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


@pytest.fixture
def closed_port():
    """A loopback port nothing listens on (connections refused)."""
    import socket

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


@pytest.fixture
def answering_url():
    """A real HTTP server on loopback answering 404 to everything: a server that is there."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_mlflow_server_that_does_not_answer_fails_in_seconds_naming_the_uri(tiny_run, silent_port):
    """Issue 22, case 6: the job itself waited ~4.5 min of the allocation on such a URI."""
    import time

    uri = f"http://127.0.0.1:{silent_port}"
    run = RunConfig.from_dict(tiny_run(loggers=["csv", "mlflow"], mlflow_tracking_uri=uri), "tiny")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"runs\.tiny\.mlflow_tracking_uri {uri} does not answer .*timed out"):
        trackers.check_trackers(run, "tiny", timeout_s=1.0)
    assert time.monotonic() - started < 3


def test_an_mlflow_uri_on_a_closed_port_fails_naming_the_uri(tiny_run, closed_port):
    uri = f"http://127.0.0.1:{closed_port}/"
    run = RunConfig.from_dict(tiny_run(loggers=["csv", "mlflow"], mlflow_tracking_uri=uri), "tiny")
    with pytest.raises(ConfigError, match=rf"runs\.tiny\.mlflow_tracking_uri {uri} does not answer .*refused"):
        trackers.check_trackers(run, "tiny")


def test_a_server_that_answers_passes_even_with_an_error_status(tiny_run, answering_url, tmp_path):
    run = RunConfig.from_dict(tiny_run(loggers=["csv", "mlflow"], mlflow_tracking_uri=answering_url), "tiny")
    trackers.check_trackers(run, "tiny", timeout_s=1.0)
    # A file store (the default) and trackers that are not configured are not contacted.
    trackers.check_trackers(RunConfig.from_dict(tiny_run(loggers=["csv", "mlflow"]), "tiny"), "tiny")
    trackers.check_trackers(RunConfig.from_dict(tiny_run(mlflow_tracking_uri="http://127.0.0.1:1"), "tiny"), "tiny")


def test_wandb_online_needs_credentials_before_submission(tiny_run, monkeypatch, tmp_path, answering_url):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", answering_url)
    run = RunConfig.from_dict(tiny_run(loggers=["csv", "wandb"], wandb_mode="online"), "tiny")
    with pytest.raises(ConfigError, match=r"runs\.tiny\.wandb_mode: online, but no W&B credentials for 127\.0\.0\.1"):
        trackers.check_trackers(run, "tiny")
    (tmp_path / "netrc").write_text("machine 127.0.0.1\n  login user\n  password not-a-real-key\n")
    trackers.check_trackers(run, "tiny", timeout_s=1.0)
    # Offline needs neither credentials nor network.
    trackers.check_trackers(RunConfig.from_dict(tiny_run(loggers=["csv", "wandb"]), "tiny"), "tiny")


def test_wandb_online_without_its_server_fails_in_seconds_naming_the_url(tiny_run, monkeypatch, silent_port):
    """Issue 22, case 6: W&B online without network failed ~2 min into the job."""
    url = f"http://127.0.0.1:{silent_port}"
    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    monkeypatch.setenv("WANDB_BASE_URL", url)
    run = RunConfig.from_dict(tiny_run(loggers=["csv", "wandb"], wandb_mode="online"), "tiny")
    with pytest.raises(ConfigError, match=rf"runs\.tiny\.wandb_mode: online, but the W&B server {url} does not answer"):
        trackers.check_trackers(run, "tiny", timeout_s=1.0)


def test_flashnet_train_stops_before_submitting_when_mlflow_does_not_answer(tiny_dataset, tmp_path, silent_port,
                                                                          capsys, monkeypatch):
    """The submitting side: `flashnet train` (the train rule's command) fails before any job exists."""
    import time

    from flashnet import cli

    monkeypatch.setattr(trackers, "ANSWER_TIMEOUT_S", 1.0)
    uri = f"http://127.0.0.1:{silent_port}"
    run = tiny_dataset.run(loggers=["csv", "mlflow"], mlflow_tracking_uri=uri)
    out = tmp_path / "runs" / "tiny"
    started = time.monotonic()
    code = cli.main(["train", "--name", "tiny", "--run", json.dumps(run),
                     "--launcher", json.dumps(dataclasses.asdict(tiny_dataset.launcher())),
                     "--train-manifest", str(tiny_dataset.train_manifest),
                     "--val-manifest", str(tiny_dataset.val_manifest), "--out-dir", str(out),
                     "--mlperf", "{}"])
    assert code == 2
    assert f"runs.tiny.mlflow_tracking_uri {uri} does not answer" in capsys.readouterr().err
    assert time.monotonic() - started < 10
    assert not (out / "jobs").exists()  # nothing was submitted
