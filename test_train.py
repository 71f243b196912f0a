"""Tests of train.py: the LR function, parameter groups, resume equals an uninterrupted run, torchrun with 2
processes, coco_tiny end to end, and faults: kill -9 and resume, a worker death under torchrun --max-restarts,
non-finite losses and weights, and bad user input that must end in a one-paragraph error (exit 2, no traceback).
Runs train.main in-process on the tiny generated data set, or train.py in a subprocess as a user would."""
import glob
import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch

import checkpoint
import config
import train
from conftest import COCO_TINY, TINY, free_port, needs_shared, run, train_cmd


def test_lr_function_warmup_steps_and_scaling():
    cfg = config.get("R-101-FPN", verbose=False)  # 16 images, 0.02, warmup 500 from 1/3, steps 60k/80k of 90k
    assert math.isclose(train.get_lr(0, cfg), 0.02 / 3)
    assert math.isclose(train.get_lr(250, cfg), 0.02 * (1 / 3 * 0.5 + 0.5))  # halfway: (1/3)(1-a) + a
    assert train.get_lr(500, cfg) == 0.02
    assert train.get_lr(59999, cfg) == 0.02 and math.isclose(train.get_lr(60000, cfg), 0.002)
    assert math.isclose(train.get_lr(80000, cfg), 0.0002)
    cfg8 = config.get(cfg, ["ims_per_batch=8"], verbose=False)  # linear scaling with the global batch
    assert train.get_lr(1000, cfg8) == 0.01
    short = config.get(cfg, ["max_iter=9000"], verbose=False)  # the whole schedule shrinks with max_iter
    assert math.isclose(train.get_lr(0, short), 0.02 / 3) and train.get_lr(50, short) == 0.02
    assert train.get_lr(5999, short) == 0.02 and math.isclose(train.get_lr(6000, short), 0.002)


def test_parameter_groups_as_upstream():
    import model
    cfg = config.get("demo", ["freeze_at=2", "norm=frozen_bn"], verbose=False)
    net = model.build_model(cfg)
    opt = train.make_optimizer(net, cfg)
    weights, biases = opt.param_groups
    assert weights["weight_decay"] == cfg.weight_decay and biases["weight_decay"] == 0
    assert biases["lr_factor"] == 2.0 and weights["lr_factor"] == 1.0
    names = {id(p): n for n, p in net.named_parameters()}
    assert all("bias" in names[id(p)] for p in biases["params"])
    trained = {names[id(p)] for g in opt.param_groups for p in g["params"]}
    assert not any(n.startswith(("backbone.body.stem", "backbone.body.layer1")) for n in trained)  # frozen
    assert len(trained) == sum(p.requires_grad for p in net.parameters())


def train_in_process(root, out, *extra):
    return train.main(["--config", "demo", f"data_root={root}", f"output_dir={out}", *TINY, *extra])


def test_resume_gives_the_same_weights(demo_root, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["max_iter=4", "checkpoint_period=2", "keep_checkpoints=5"]
    train_in_process(demo_root, a, *common)
    train_in_process(demo_root, b, *common)
    os.remove(os.path.join(b, "model_0000004.pth"))  # as if killed between iterations 2 and 4
    train_in_process(demo_root, b, *common, "--resume")
    wa = torch.load(os.path.join(a, "model_0000004.pth"), weights_only=True)
    wb = torch.load(os.path.join(b, "model_0000004.pth"), weights_only=True)
    assert wb["iteration"] == 4
    for k, v in wa["model"].items():
        assert torch.equal(v, wb["model"][k]), k
    # and the run actually trained: iteration-2 weights differ from the final ones
    w2 = torch.load(os.path.join(a, "model_0000002.pth"), weights_only=True)["model"]
    assert any(not torch.equal(v, w2[k]) for k, v in wa["model"].items() if v.is_floating_point())
    log = [json.loads(line) for line in open(os.path.join(a, "log.jsonl"))]
    assert "config" in log[0] and [r["iter"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert "AP50" in log[-1]["eval"]


@pytest.mark.slow
def test_torchrun_two_processes(demo_root, tmp_path):
    out = str(tmp_path / "ddp")
    proc = run(train_cmd(demo_root, out, "max_iter=2", "checkpoint_period=2",
                         torchrun=["--nproc_per_node", "2", "--master_port", free_port()]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert glob.glob(os.path.join(out, "model_0000002.pth"))


@needs_shared
def test_coco_tiny_two_iterations_and_evaluation(tmp_path):
    metrics = train.main(["--config", "demo", f"data_root={COCO_TINY}", f"output_dir={tmp_path}", "num_classes=81",
                          *TINY, "max_iter=2", "checkpoint_period=2"])
    assert metrics["images"] == 80 and 0.0 <= metrics["AP"] <= 1.0
    results = json.load(open(os.path.join(tmp_path, "coco_results_val2017.json")))
    ids = {i["id"] for i in json.load(open(os.path.join(COCO_TINY, "annotations", "instances_val2017.json")))["images"]}
    assert all(r["image_id"] in ids for r in results)


# ---- faults

def weights(path):
    return torch.load(path, weights_only=True)["model"]


def wait_for(path, proc, timeout=300, poll=0.2):
    start = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, f"training ended before {path} appeared"
        assert time.time() - start < timeout, f"{path} did not appear in {timeout} s"
        time.sleep(poll)


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted(demo_root, tmp_path):
    common = ["max_iter=12", "checkpoint_period=2", "keep_checkpoints=2"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    train_in_process(demo_root, ref, *common)
    proc = subprocess.Popen(train_cmd(demo_root, out, *common), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(os.path.join(out, "model_0000002.pth"), proc, poll=0.02)
    proc.send_signal(signal.SIGKILL)  # somewhere after iteration 2, maybe mid-write of the next checkpoint
    proc.wait()
    assert not os.path.exists(os.path.join(out, "model_0000012.pth")), "the run finished before the kill"
    resumed = run(train_cmd(demo_root, out, *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = weights(os.path.join(ref, "model_0000012.pth")), weights(os.path.join(out, "model_0000012.pth"))
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert len(checkpoint.training_checkpoints(out)) == 2  # keep_checkpoints


@pytest.mark.slow
def test_worker_death_under_max_restarts_resumes(demo_root, tmp_path):
    out = str(tmp_path)
    # restarts need the c10d rendezvous, and launch.py's per-restart store prefix (see there)
    cmd = train_cmd(demo_root, out, "max_iter=6", "checkpoint_period=2", "--resume",
                    torchrun=["--nproc_per_node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
                              "--rdzv-endpoint", f"localhost:{free_port()}"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
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
        train_in_process(demo_root, out, "max_iter=30", "checkpoint_period=1", "base_lr=1e6", "warmup_iters=0")
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
        train_in_process(demo_root, tmp_path, "max_iter=3")
    assert checkpoint.training_checkpoints(str(tmp_path)) == []


@pytest.mark.slow
@pytest.mark.parametrize("extra, expect", [
    (["max_iters=5"], "did you mean max_iter"),
    (["max_iter=five"], "expects int"),
    (["device=tpu"], "choose one of 'cpu', 'cuda', 'mlu'"),
    (["device=cuda"] if not torch.cuda.is_available() else ["device=mlu"], "not available"),
    (["data_root=/nonexistent/coco"], "no annotation file"),
    (["amp=fp8"], "'amp' is 'fp8'"),
])
def test_bad_user_input_is_one_clear_error(demo_root, tmp_path, extra, expect):
    proc = run(train_cmd(demo_root, tmp_path, "max_iter=1", *extra))
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert expect in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_batch_not_divisible_by_processes(demo_root, tmp_path):
    proc = run(train_cmd(demo_root, tmp_path, "ims_per_batch=3", "max_iter=1",
                         torchrun=["--nproc_per_node", "2", "--master_port", free_port()]))
    assert proc.returncode != 0
    assert "ims_per_batch=3 is not divisible by 2 processes" in proc.stderr + proc.stdout
