"""Tests of logger.py's curves: the per-iteration series read back from log.jsonl (resumed and restarted runs, a
line cut short by a killed run) and the rolling median against torch.median. A run's log and figures as train.py
writes them are tested in test_train.py."""
import json
import os

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


def per_iter_line(it, *values):
    return json.dumps({"iter": it, "loss_a": values[-1], "loss": values[-1],
                       "per_iter": {"loss_a": list(values), "lr": [0.1] * len(values)}}) + "\n"


def test_garbage_and_binary_lines_are_skipped_and_the_figure_drawn(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes((json.dumps({"config": {}, "resumed_from": None}) + "\n" + per_iter_line(2, 0.9, 0.8)).encode()
                     + b"not json at all\n\xff\xfe\x00\x81binary\x00\n[1, 2]\n\"text\"\n{\"iter\": 3, \"per_iter\": 7}\n"
                     + per_iter_line(3, 0.7).encode())
    log = logger.TrainLog(config.get("demo", [f"output_dir={tmp_path}"], verbose=False), 0, 1, 3)  # a resume
    log.close()
    assert logger.loss_series(str(path))["raw"]["loss_a"].tolist() == [0.9, 0.8, 0.7]
    assert b"\xff\xfe\x00\x81binary" in path.read_bytes()  # what it cannot read, it leaves alone
    assert (tmp_path / "loss_curves.png").exists()


def test_one_iteration_is_drawn_and_none_is_not(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps({"config": {}, "resumed_from": None}) + "\n")
    assert logger.plot_losses(str(path), str(tmp_path / "none.png")) is False and not (tmp_path / "none.png").exists()
    path.write_text(json.dumps({"config": {}, "resumed_from": None}) + "\n" + per_iter_line(1, 0.9))
    assert logger.plot_losses(str(path), str(tmp_path / "one.png")) is True  # max_iter=1
    assert (tmp_path / "one.png").stat().st_size > 0


def test_a_resume_keeps_one_record_per_iteration(tmp_path):
    """A run killed after logging iterations 5..6 past its checkpoint at 4: the resumed run's log holds each iteration
    once (the killed run's records after 4 go, with its evaluation at 6 and the start of a run resumed from 6)."""
    path = tmp_path / "log.jsonl"
    lines = [json.dumps({"config": {}, "resumed_from": None}) + "\n", per_iter_line(2, 0.9, 0.8),
             per_iter_line(4, 0.7, 0.6), per_iter_line(6, 0.5, 0.4), json.dumps({"iter": 6, "eval": {"AP": 0.1}}) + "\n",
             json.dumps({"config": {}, "resumed_from": 6}) + "\n", per_iter_line(7, 0.3)]
    path.write_text("".join(lines) + "cut sh")
    log = logger.TrainLog(config.get("demo", [f"output_dir={tmp_path}"], verbose=False), 0, 1, 4)
    log.record({"config": {}, "resumed_from": 4})
    log.record(json.loads(per_iter_line(6, 0.55, 0.45)))
    log.close()
    kept = path.read_text().splitlines()
    assert kept == [ln.rstrip("\n") for ln in lines[:3]] + ["cut sh", json.dumps({"config": {}, "resumed_from": 4}),
                                                             per_iter_line(6, 0.55, 0.45).rstrip("\n")]
    assert logger.loss_series(str(path))["raw"]["loss_a"].tolist() == [0.9, 0.8, 0.7, 0.6, 0.55, 0.45]


def test_a_full_disk_is_one_paragraph_naming_the_folder_and_the_console_goes_on(tmp_path, capsys, monkeypatch):
    import errno
    import sys
    log = logger.TrainLog(config.get("demo", [f"output_dir={tmp_path}"], verbose=False), 0, 1, 0)
    try:
        (tmp_path / "log.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
        with pytest.raises(config.UserError, match=rf"cannot write log.jsonl in output_dir {tmp_path}: No space left"):
            log.record({"iter": 1})
        sys.stdout.f = open("/dev/full", "a")  # log.txt's copy of the console
        print("a line of the console", flush=True)
        print("and the next")
        (tmp_path / "log.jsonl").unlink()
        (tmp_path / "log.jsonl").write_text(per_iter_line(2, 0.9, 0.8))

        def full(path, write, mode="wb"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(logger.launch, "atomic_write", full)
        with pytest.raises(config.UserError, match=rf"cannot write loss_curves.png in output_dir {tmp_path}: No space"):
            log.plot()
    finally:
        log.close()
    out = capsys.readouterr().out
    assert "a line of the console" in out and "and the next" in out
    assert "logger: /dev/full stops here: cannot write in /dev (No space left on device); the console goes on" in out
    assert not (tmp_path / "loss_curves.png").exists()
