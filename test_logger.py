"""Tests of logger.py's curves: the per-iteration series read back from log.jsonl (resumed and restarted runs, a
line cut short by a killed run) and the rolling median against torch.median. A run's log and figures as train.py
writes them are tested in test_train.py."""
import json

import pytest
import torch

import config
import logger


def test_a_log_line_cut_short_by_a_killed_run_spoils_nothing(tmp_path):
    per = {"loss_a": [0.9, 0.8], "lr": [0.1, 0.1]}
    whole = json.dumps({"iter": 2, "loss_a": 0.8, "loss": 0.8, "per_iter": per})
    (tmp_path / "log.jsonl").write_text(json.dumps({"config": {}, "resumed_from": None}) + "\n" + whole + "\n"
                                        + whole[:30])  # the writer was killed mid-line
    log = logger.TrainLog(config.get("demo", [f"output_dir={tmp_path}"], verbose=False), 0, 1, 2)
    log.record({"config": {}, "resumed_from": 2})
    log.record({"iter": 3, "loss_a": 0.7, "loss": 0.7, "per_iter": {"loss_a": [0.7], "lr": [0.1]}})
    log.close()  # draws loss_curves.png from the log, cut line and all
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert lines[2] == whole[:30] and json.loads(lines[3]) == {"config": {}, "resumed_from": 2}  # kept apart
    assert logger.loss_series(str(tmp_path / "log.jsonl"))["raw"]["loss_a"].tolist() == [0.9, 0.8, 0.7]
    assert (tmp_path / "loss_curves.png").exists()


def test_loss_series_takes_each_run_of_a_folder_from_where_it_started(tmp_path):
    """A resumed run replaces what the earlier run logged after its checkpoint (losses and evaluations); a fresh run
    in the same folder replaces everything. Records written by hand, as TrainLog writes them."""
    def line(it, *values, lr=0.1):
        per = {"loss_a": list(values), "loss_b": [1.0] * len(values), "lr": [lr] * len(values)}
        return {"iter": it, "loss_a": values[-1], "loss": values[-1] + 1, "per_iter": per}
    first = [{"config": {}, "resumed_from": None}, line(2, 0.9, 0.8), line(4, 0.7, 0.6),
             {"iter": 4, "eval": {"AP": 0.1}}, line(6, 0.5, 0.4)]
    resumed = [{"config": {}, "resumed_from": 2}, line(4, 0.75, 0.65, lr=0.01), line(5, 0.55, lr=0.01)]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in first + resumed))
    s = logger.loss_series(str(path))
    assert s["iter"].tolist() == [1, 2, 3, 4, 5]  # iteration 6 of the first run is gone, and its evaluation at 4
    assert s["raw"]["loss_a"].tolist() == [0.9, 0.8, 0.75, 0.65, 0.55] and s["evals"] == []
    assert s["raw"]["loss"].tolist() == pytest.approx([1.9, 1.8, 1.75, 1.65, 1.55])
    assert s["lr"].tolist() == [0.1, 0.1, 0.01, 0.01, 0.01]
    assert s["smoothed"]["loss_a"].tolist() == [0.9, 0.8, 0.8, 0.75, 0.75]  # lower median of what came before
    with open(path, "a") as f:
        f.write(json.dumps({"config": {}, "resumed_from": None}) + "\n" + json.dumps(line(1, 0.3)) + "\n")
    assert logger.loss_series(str(path))["raw"]["loss_a"].tolist() == [0.3]


def test_rolling_median_is_torch_median_of_the_last_window():
    x = torch.rand(57, generator=torch.Generator().manual_seed(0)).tolist()
    got = logger.rolling_median(x, window=20, chunk=7)
    assert got.tolist() == [torch.tensor(x[max(0, i - 19):i + 1], dtype=torch.float64).median().item()
                            for i in range(57)]
