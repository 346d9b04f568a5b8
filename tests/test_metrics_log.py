"""The metrics log: jsonl + long CSV round trip, resume truncation, killed writers, NaN."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from molden.errors import MoldenInputError
from molden.train.metrics_log import CSV_COLUMNS, MetricsLog, read_metrics


def _log_steps(run_dir, steps, *, resume_step=None):
    with MetricsLog(run_dir, resume_step=resume_step) as log:
        for step in steps:
            log.write(step, step / 10, "train", {"loss": 1.0 / step, "lr": 1e-3}, wall_s=0.5 * step)
            if step % 5 == 0:
                log.write(step, step / 10, "val", {"energy_mae_mev": torch.tensor(40.0 - step)}, wall_s=0.5 * step + 0.1)


def _csv_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.reader(handle))


def test_records_round_trip_through_jsonl(tmp_path):
    _log_steps(tmp_path, range(1, 11))
    records = read_metrics(tmp_path)
    assert len(records) == 12
    assert records[0] == {"step": 1, "epoch": 0.1, "split": "train", "wall_s": 0.5, "loss": 1.0, "lr": 1e-3}
    val = [r for r in records if r["split"] == "val"]
    assert [(r["step"], r["energy_mae_mev"]) for r in val] == [(5, 35.0), (10, 30.0)]
    assert val[1]["wall_s"] == pytest.approx(5.1)
    # one JSON object per line, nothing else
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [r["step"] for r in records]


def test_csv_is_long_format_one_row_per_metric(tmp_path):
    _log_steps(tmp_path, range(1, 6))
    rows = _csv_rows(tmp_path)
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 1 + 5 * 2 + 1  # header, loss + lr per train record, one val metric
    assert rows[1] == ["1", "0.1", "train", "0.5", "loss", "1.0"]
    assert rows[2] == ["1", "0.1", "train", "0.5", "lr", "0.001"]
    assert rows[-1] == ["5", "0.5", "val", "2.6", "energy_mae_mev", "35.0"]
    # every value reads back exactly as the jsonl holds it
    by_key = {(int(r[0]), r[2], r[4]): float(r[5]) for r in rows[1:]}
    for record in read_metrics(tmp_path):
        for name in ("loss", "lr", "energy_mae_mev"):
            if name in record:
                assert by_key[record["step"], record["split"], name] == record[name]


def test_resume_drops_records_after_the_resume_step_from_both_files(tmp_path):
    _log_steps(tmp_path, range(1, 11))
    jsonl_before = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    csv_before = (tmp_path / "metrics.csv").read_text().splitlines(keepends=True)
    with MetricsLog(tmp_path, resume_step=6) as log:
        assert log.last_wall_s == 3.0  # train record of step 6
        # the files already hold exactly the earlier lines, byte for byte
        assert (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True) == jsonl_before[:7]
        assert (tmp_path / "metrics.csv").read_text().splitlines(keepends=True) == csv_before[:1 + 6 * 2 + 1]
        log.write(7, 0.7, "train", {"loss": 9.0, "lr": 1e-3}, wall_s=3.5)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5, 6, 7]
    assert records[-1]["loss"] == 9.0
    steps_in_csv = [int(r[0]) for r in _csv_rows(tmp_path)[1:]]
    assert max(steps_in_csv) == 7 and steps_in_csv.count(7) == 2
    assert not list(tmp_path.glob("*.partial"))


def test_resume_discards_a_line_cut_short_by_a_kill(tmp_path):
    _log_steps(tmp_path, range(1, 4))
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "epoch": 0.4, "spl')
    with open(tmp_path / "metrics.csv", "a") as handle:
        handle.write("4,0.4,tra")
    MetricsLog(tmp_path, resume_step=3).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")
    assert [int(r[0]) for r in _csv_rows(tmp_path)[1:]] == [1, 1, 2, 2, 3, 3]


def test_a_fresh_log_starts_empty_files(tmp_path):
    _log_steps(tmp_path, range(1, 4))
    MetricsLog(tmp_path).close()
    assert read_metrics(tmp_path) == []
    assert len(_csv_rows(tmp_path)) == 1


def test_read_skips_a_truncated_last_line(tmp_path):
    _log_steps(tmp_path, range(1, 4))
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "epoch": 0.4, "split": "tr')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_read_refuses_a_garbage_file_naming_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "epoch": 0.1, "split": "train", "wall_s": 1.0}\nnot json\n{}\n')
    with pytest.raises(MoldenInputError, match=r"metrics\.jsonl: line 2 is not JSON"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": "one", "epoch": 0.1, "split": "train", "wall_s": 1.0}\n')
    with pytest.raises(MoldenInputError, match="line 1 is not a metrics record"):
        read_metrics(tmp_path)


def test_read_names_a_missing_metrics_file(tmp_path):
    with pytest.raises(MoldenInputError, match="metrics.jsonl: not found"):
        read_metrics(tmp_path)
    with pytest.raises(MoldenInputError, match="no such run directory"):
        read_metrics(tmp_path / "nowhere")


def test_non_finite_values_are_null_and_empty_never_a_crash(tmp_path):
    with MetricsLog(tmp_path) as log:
        log.write(1, 0.0, "train", {"loss": math.nan, "grad_norm": torch.tensor(math.inf), "lr": -math.inf}, wall_s=1.0)
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == {"step": 1, "epoch": 0.0, "split": "train", "wall_s": 1.0,
                                "loss": None, "grad_norm": None, "lr": None}
    assert [row[5] for row in _csv_rows(tmp_path)[1:]] == ["", "", ""]
    (record,) = read_metrics(tmp_path)
    assert all(math.isnan(record[name]) for name in ("loss", "grad_norm", "lr"))


def test_disabled_log_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLog(run_dir, resume_step=3, enabled=False) as log:
        log.write(1, 0.1, "train", {"loss": 1.0}, wall_s=1.0)
    assert not run_dir.exists()


def test_bad_split_or_reserved_metric_name_is_refused(tmp_path):
    with MetricsLog(tmp_path) as log:
        with pytest.raises(ValueError, match="split"):
            log.write(1, 0.1, "validation", {"loss": 1.0}, wall_s=1.0)
        with pytest.raises(ValueError, match="metric name"):
            log.write(1, 0.1, "train", {"step": 1.0}, wall_s=1.0)
    assert read_metrics(tmp_path) == []
