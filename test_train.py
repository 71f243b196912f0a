"""Training: the LR function, parameter groups, resume equals an uninterrupted run, torchrun with 2 processes,
and coco_tiny end to end. Runs train.main in-process on a tiny generated data set."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import config
import demo
import train

HERE = os.path.dirname(os.path.abspath(__file__))
COCO_TINY = os.path.join(HERE, "..", "shared", "datasets", "coco_tiny")
# The demo network on 96-128 px images: a training iteration takes well under a second on 2 cores.
TINY = ["min_size_train=(96,)", "max_size_train=128", "min_size_test=96", "max_size_test=128", "ims_per_batch=2",
        "test_ims_per_batch=2", "log_period=1", "num_workers=0", "rpn_pre_nms_top_n_train=200",
        "rpn_post_nms_top_n_train=100", "fpn_post_nms_top_n_train=100", "roi_batch_per_image=32"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    demo.make_demo_dataset(root, num_train=12, num_val=4)
    return root


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


def run(root, out, *extra):
    return train.main(["--config", "demo", f"data_root={root}", f"output_dir={out}", *TINY, *extra])


def test_resume_gives_the_same_weights(demo_root, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["max_iter=4", "checkpoint_period=2", "keep_checkpoints=5"]
    run(demo_root, a, *common)
    run(demo_root, b, *common)
    os.remove(os.path.join(b, "model_0000004.pth"))  # as if killed between iterations 2 and 4
    run(demo_root, b, *common, "--resume")
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


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes(demo_root, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(HERE, "train.py"), "--config", "demo", f"data_root={demo_root}", f"output_dir={out}",
           *TINY, "max_iter=2", "checkpoint_period=2"]
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert glob.glob(os.path.join(out, "model_0000002.pth"))


@pytest.mark.skipif(not os.path.isdir(COCO_TINY), reason="../shared/datasets/coco_tiny is absent")
def test_coco_tiny_two_iterations_and_evaluation(tmp_path):
    metrics = train.main(["--config", "demo", f"data_root={COCO_TINY}", f"output_dir={tmp_path}", "num_classes=81",
                          *TINY, "max_iter=2", "checkpoint_period=2"])
    assert metrics["images"] == 80 and 0.0 <= metrics["AP"] <= 1.0
    results = json.load(open(os.path.join(tmp_path, "coco_results_val2017.json")))
    ids = {i["id"] for i in json.load(open(os.path.join(COCO_TINY, "annotations", "instances_val2017.json")))["images"]}
    assert all(r["image_id"] in ids for r in results)
