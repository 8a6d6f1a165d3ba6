"""metrics.jsonl and the TensorBoard events of a run, read back from real files."""
import json
import logging
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vsml_jax.training import metrics as M


def _events(workdir):
    """{tag: [(step, value)]} as TensorBoard's own loader reads the event files."""
    acc = EventAccumulator(os.path.join(str(workdir), M.TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def _write_run(workdir, steps, offset=0.0, eval_every=3):
    with M.MetricsWriter(str(workdir)) as writer:
        for step in steps:
            writer.write(step, "train", {"loss": offset + step, "lr": np.float32(1e-3)})
            if step % eval_every == 0:
                writer.write(step, "eval/mnist", {"acc@100": offset + step / 10})
            writer.flush()


def _lines(workdir):
    with open(os.path.join(str(workdir), M.METRICS_FILE)) as f:
        return f.read().split("\n")


def test_records_round_trip_in_order_with_sorted_keys(tmp_path):
    _write_run(tmp_path, range(1, 7))
    records = M.read_metrics(str(tmp_path))
    assert [(r["step"], r["split"]) for r in records] == [
        (1, "train"), (2, "train"), (3, "train"), (3, "eval/mnist"), (4, "train"),
        (5, "train"), (6, "train"), (6, "eval/mnist")]
    assert records[3] == {"step": 3, "split": "eval/mnist", "acc@100": 0.3}
    assert records[0] == {"step": 1, "split": "train", "loss": 1.0,
                          "lr": float(np.float32(1e-3))}
    first = _lines(tmp_path)[0]
    assert first == json.dumps(records[0], sort_keys=True)
    assert list(json.loads(first)) == sorted(records[0])
    assert M.read_metrics(str(tmp_path / "no_such_run")) == []


def test_events_read_back_with_tensorboard(tmp_path):
    _write_run(tmp_path, range(1, 7))
    events = _events(tmp_path)
    assert set(events) == {"train/loss", "train/lr", "eval/mnist/acc@100"}
    assert events["train/loss"] == [(s, float(s)) for s in range(1, 7)]
    assert [s for s, _ in events["train/lr"]] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in events["train/lr"]], 1e-3, rtol=1e-6)
    assert [s for s, _ in events["eval/mnist/acc@100"]] == [3, 6]
    np.testing.assert_allclose([v for _, v in events["eval/mnist/acc@100"]], [0.3, 0.6],
                               rtol=1e-6)


def test_resume_truncates_records_and_tensorboard_shows_the_resumed_values(tmp_path):
    _write_run(tmp_path, range(1, 8))  # crashed after step 7, last checkpoint at 4
    M.truncate_metrics(str(tmp_path), 4)
    assert not os.path.exists(os.path.join(tmp_path, M.METRICS_FILE + ".tmp"))
    assert [(r["step"], r["split"]) for r in M.read_metrics(str(tmp_path))] == [
        (1, "train"), (2, "train"), (3, "train"), (3, "eval/mnist"), (4, "train")]
    # The resumed run writes 5.. again (different values here, to tell them apart),
    # and evaluates every 4 steps now: the old eval at 6 must not show.
    _write_run(tmp_path, range(5, 9), offset=100.0, eval_every=4)
    records = M.read_metrics(str(tmp_path))
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in records if r["split"] == "eval/mnist"] == [3, 8]
    events = _events(tmp_path)
    assert events["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0),
                                    (6, 106.0), (7, 107.0), (8, 108.0)]
    assert [s for s, _ in events["eval/mnist/acc@100"]] == [3, 8]
    assert len(os.listdir(tmp_path / M.TENSORBOARD_DIR)) == 2  # one file per writer


def test_truncate_keeps_the_order_within_a_step(tmp_path):
    path = tmp_path / M.METRICS_FILE
    rows = [{"step": 1, "split": "train"}, {"step": 2, "split": "train"},
            {"step": 2, "split": "eval/b"}, {"step": 2, "split": "eval/a"},
            {"step": 3, "split": "train"}]
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    M.truncate_metrics(str(tmp_path), 2)
    assert M.read_metrics(str(tmp_path)) == rows[:4]
    M.truncate_metrics(str(tmp_path), 0)  # a fresh start drops everything
    assert M.read_metrics(str(tmp_path)) == [] and path.read_text() == ""


def test_torn_last_line_is_cut_with_a_warning(tmp_path, caplog):
    _write_run(tmp_path, range(1, 4), eval_every=10)
    path = os.path.join(tmp_path, M.METRICS_FILE)
    with open(path, "a") as f:
        f.write('{"step": 7, "spl')  # a crash in the middle of a write
    with caplog.at_level(logging.WARNING):
        records = M.read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert f"{path}: line 4 is torn" in caplog.text
    assert open(path).read().endswith('"step": 3}\n')  # cut off the file
    # Appends after the repair are valid JSONL.
    with M.MetricsWriter(str(tmp_path), tensorboard=False) as writer:
        writer.write(4, "train", {"loss": 4.0})
    assert [json.loads(line)["step"] for line in _lines(tmp_path) if line] == [1, 2, 3, 4]


def test_writer_repairs_a_torn_tail_itself(tmp_path, caplog):
    path = tmp_path / M.METRICS_FILE
    path.write_text('{"split": "train", "step": 1}\n{"split": "train", "step": 2}\n'
                    '{"step": 3, "split": "tr')
    with caplog.at_level(logging.WARNING):
        writer = M.MetricsWriter(str(tmp_path), tensorboard=False)
    assert "line 3 is torn" in caplog.text
    writer.write(3, "train", {"loss": 0.5})
    writer.close()
    assert [r["step"] for r in M.read_metrics(str(tmp_path))] == [1, 2, 3]
    # A complete last record that lost only its newline is kept, not joined.
    path.write_text('{"split": "train", "step": 1}')
    with M.MetricsWriter(str(tmp_path), tensorboard=False) as writer:
        writer.write(2, "train", {})
    assert path.read_text() == ('{"split": "train", "step": 1}\n'
                                '{"split": "train", "step": 2}\n')


def test_corrupt_line_in_the_middle_raises_naming_it(tmp_path):
    path = tmp_path / M.METRICS_FILE
    path.write_text('{"split": "train", "step": 1}\n{"step": 2, "spl\n'
                    '{"split": "train", "step": 3}\n')
    with pytest.raises(M.MetricsFileError) as err:
        M.read_metrics(str(tmp_path))
    assert f"{path}: line 2 is not a metrics record" in str(err.value)
    assert '{"step": 2, "spl' in str(err.value)
    assert path.read_text().count("\n") == 3  # nothing was cut


def test_disabled_writer_writes_nothing(tmp_path):
    writer = M.MetricsWriter(str(tmp_path), enabled=False)
    writer.write(1, "train", {"loss": 1.0})
    writer.flush()
    writer.close()
    assert os.listdir(tmp_path) == []
