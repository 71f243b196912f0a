"""Faults: kill -9 and resume, a worker death under torchrun --max-restarts, damaged checkpoints, non-finite
losses and weights, and bad user input that must end in a one-paragraph error (exit 2, no traceback)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import demo
import train
from test_train import TINY, free_port

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo_faults"))
    demo.make_demo_dataset(root, num_train=12, num_val=2)
    return root


def train_cmd(root, out, *extra, torchrun=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", *torchrun] if torchrun else [sys.executable]
    return [*launcher, os.path.join(HERE, "train.py"), "--config", "demo", f"data_root={root}", f"output_dir={out}",
            *TINY, *extra]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def wait_for(path, proc, timeout=300, poll=0.2):
    start = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, f"training ended before {path} appeared"
        assert time.time() - start < timeout, f"{path} did not appear in {timeout} s"
        time.sleep(poll)


def test_kill_9_then_resume_matches_uninterrupted(demo_root, tmp_path):
    common = ["max_iter=12", "checkpoint_period=2", "keep_checkpoints=2"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    train.main(["--config", "demo", f"data_root={demo_root}", f"output_dir={ref}", *TINY, *common])
    proc = subprocess.Popen(train_cmd(demo_root, out, *common), cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(os.path.join(out, "model_0000002.pth"), proc, poll=0.02)
    proc.send_signal(signal.SIGKILL)  # somewhere after iteration 2, maybe mid-write of the next checkpoint
    proc.wait()
    assert not os.path.exists(os.path.join(out, "model_0000012.pth")), "the run finished before the kill"
    resumed = subprocess.run(train_cmd(demo_root, out, *common, "--resume"), cwd=HERE, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = weights(os.path.join(ref, "model_0000012.pth")), weights(os.path.join(out, "model_0000012.pth"))
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert len(checkpoint.training_checkpoints(out)) == 2  # keep_checkpoints


def test_damaged_newest_checkpoint_is_skipped(demo_root, tmp_path, capsys):
    out = str(tmp_path)
    train.main(["--config", "demo", f"data_root={demo_root}", f"output_dir={out}", *TINY, "max_iter=2",
                "checkpoint_period=1"])
    newest = os.path.join(out, "model_0000002.pth")
    with open(newest, "r+b") as f:  # truncated, as by a full disk
        f.truncate(os.path.getsize(newest) // 2)
    path, ckpt = checkpoint.latest_training(out)
    assert path.endswith("model_0000001.pth") and ckpt["iteration"] == 1
    assert "skipping" in capsys.readouterr().out and "model_0000002.pth" in capsys.readouterr().out + path + newest


def test_worker_death_under_max_restarts_resumes(demo_root, tmp_path):
    out = str(tmp_path)
    # restarts need the c10d rendezvous, and train.py's per-restart store prefix (see there)
    cmd = train_cmd(demo_root, out, "max_iter=6", "checkpoint_period=2", "--resume",
                    torchrun=["--nproc_per_node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
                              "--rdzv-endpoint", f"localhost:{free_port()}"])
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(os.path.join(out, "model_0000002.pth"), proc, timeout=400)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "train.py"], capture_output=True,
                                 text=True).stdout.split()  # not torchrun's other helper processes
        assert workers, "no worker processes found under torchrun"
        os.kill(int(workers[-1]), signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # never leave a hung group behind
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from" in output
    assert os.path.exists(os.path.join(out, "model_0000006.pth"))


def test_divergence_stops_with_every_loss_term(demo_root, tmp_path):
    out = str(tmp_path)
    with pytest.raises(FloatingPointError) as err:
        train.main(["--config", "demo", f"data_root={demo_root}", f"output_dir={out}", *TINY, "max_iter=30",
                    "checkpoint_period=1", "base_lr=1e6", "warmup_iters=0"])
    msg = str(err.value)
    assert "iteration" in msg and "last good state" in msg
    if msg.startswith("non-finite loss"):
        for term in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"):
            assert term in msg
    for path in checkpoint.training_checkpoints(out):  # whatever was saved is finite
        assert all(torch.isfinite(v).all() for v in weights(path).values() if v.is_floating_point())


def test_nonfinite_loss_names_iteration_and_terms(demo_root, tmp_path, monkeypatch):
    import model
    real = model.FasterRCNN.forward

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        if self.training:
            out["loss_box_reg"] = out["loss_box_reg"] * float("nan")
        return out
    monkeypatch.setattr(model.FasterRCNN, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"iteration 1: loss_objectness=.*loss_box_reg=nan"):
        train.main(["--config", "demo", f"data_root={demo_root}", f"output_dir={tmp_path}", *TINY, "max_iter=3"])
    assert checkpoint.training_checkpoints(str(tmp_path)) == []


@pytest.mark.parametrize("extra, expect", [
    (["max_iters=5"], "did you mean max_iter"),
    (["max_iter=five"], "expects int"),
    (["device=tpu"], "not one of cpu, cuda, mlu"),
    (["device=cuda"] if not torch.cuda.is_available() else ["device=mlu"], "not available"),
    (["data_root=/nonexistent/coco"], "no annotation file"),
    (["amp=fp8"], "amp="),
])
def test_bad_user_input_is_one_clear_error(demo_root, tmp_path, extra, expect):
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--config", "demo", f"data_root={demo_root}",
           f"output_dir={tmp_path}", *TINY, "max_iter=1", *extra]
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert expect in proc.stderr and "Traceback" not in proc.stderr


def test_batch_not_divisible_by_processes(demo_root, tmp_path):
    cmd = train_cmd(demo_root, str(tmp_path), "ims_per_batch=3", "max_iter=1",
                    torchrun=["--nproc_per_node", "2", "--master_port", str(free_port())])
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "ims_per_batch=3 is not divisible by 2 processes" in proc.stderr + proc.stdout


def test_evaluate_refuses_a_checkpoint_of_another_architecture(demo_root, tmp_path):
    import config
    import model
    cfg = config.get("demo", ["num_classes=7"], verbose=False)
    ckpt = str(tmp_path / "seven.pth")
    checkpoint.save(ckpt, model.build_model(cfg), cfg)
    sd = torch.load(ckpt, weights_only=True)
    torch.save({"model": sd["model"]}, ckpt)  # upstream-style: no config, so --config demo (4 classes) applies
    proc = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--ckpt", ckpt, "--config", "demo",
                           "--data-root", demo_root, "--device", "cpu"], cwd=HERE, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "shape mismatch" in proc.stderr and "cls_score" in proc.stderr
