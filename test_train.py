"""Tests of train.py: the LR function, parameter groups, resume equals an uninterrupted run, torchrun with 2
processes, coco_tiny end to end, and faults: kill -9 and resume, a worker death under torchrun --max-restarts,
non-finite losses and weights, and bad user input that must end in a one-paragraph error (exit 2, no traceback).
Runs train.main in-process on the tiny generated data set, or train.py in a subprocess as a user would."""
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch

import checkpoint
import config
import data
import logger
import train
from conftest import HERE, TINY, free_port, run, train_cmd, unwritable


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
    sa, sb = (logger.loss_series(os.path.join(out, "log.jsonl")) for out in (a, b))
    assert sb["iter"].tolist() == [1, 2, 3, 4] and sb["raw"]["loss"].tolist() == sa["raw"]["loss"].tolist()


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
    s = logger.loss_series(os.path.join(out, "log.jsonl"))  # log_period 1: each median is that iteration's mean
    assert s["raw"]["loss"] == pytest.approx(losses, rel=1e-5)
    assert glob.glob(os.path.join(out, "model_0000002.pth"))


def test_coco_two_iterations_and_evaluation(tmp_path, coco_set):
    metrics = train.main(["--config", "demo", f"data_root={coco_set}", f"output_dir={tmp_path}", "num_classes=81",
                          *TINY, "max_iter=2", "checkpoint_period=2"])
    ids = {i["id"] for i in json.load(open(os.path.join(coco_set, "annotations", "instances_val2017.json")))["images"]}
    assert metrics["images"] == len(ids) and 0.0 <= metrics["AP"] <= 1.0
    results = json.load(open(os.path.join(tmp_path, "coco_results_val2017.json")))
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


# ---- outputs, the log, weights, classes, the proposal cap

def test_outputs_and_the_smoothed_log(demo_root, tmp_path, monkeypatch):
    import evaluate
    seen, real_step, real_eval = [], train.train_step, evaluate.evaluate_coco

    def step(*a, **k):
        losses = real_step(*a, **k)
        seen.append({n: v.item() for n, v in losses.items()})
        return losses

    class Clock:  # train.py's clock: 1 ms per reading, and 100 s per evaluation
        now = 0.0

        @classmethod
        def time(cls):
            cls.now += 0.001
            return cls.now

    def slow_eval(*a, **k):  # an evaluation's time must not count as an iteration's
        Clock.now += 100
        return real_eval(*a, **k)
    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train, "time", Clock)
    monkeypatch.setattr(evaluate, "evaluate_coco", slow_eval)
    out = str(tmp_path)
    train_in_process(demo_root, out, "max_iter=24", "log_period=4", "eval_period=8", "checkpoint_period=8")
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    lines = [r for r in records if "loss" in r]
    assert [r["iter"] for r in lines] == list(range(4, 25, 4))
    for r in lines:  # the median of the last 20 iterations (torch's lower median) and the average since the start
        done = seen[:r["iter"]]
        for name in ("loss_objectness", "loss_classifier"):
            window = sorted(x[name] for x in done[-20:])
            assert r[name] == pytest.approx(window[(len(window) - 1) // 2], rel=1e-6)
            assert r[name + "_avg"] == pytest.approx(sum(x[name] for x in done) / len(done), rel=1e-5)
        assert r["time"] < 0.1  # the 100 s evaluations after iterations 8 and 16 are not in it
    assert [r["iter"] for r in records if "eval" in r] == [8, 16, 24]
    txt = open(os.path.join(out, "log.txt")).read()
    assert txt.count("iter ") >= 6 and "loss_objectness" in txt and "AP50" in txt
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_0000024.pth"
    final = checkpoint.load(os.path.join(out, "model_final.pth"))
    assert [c["name"] for c in final["categories"]] == ["rectangle", "ellipse", "triangle"]
    assert "optimizer" not in final and config.from_dict(final["config"]).max_iter == 24
    metrics = json.load(open(os.path.join(out, "metrics_val2017.json")))  # the per-class results, printed too
    assert [c["name"] for c in metrics["per_class"]] == ["rectangle", "ellipse", "triangle"]
    assert "per-class AP of val2017" in txt and re.search(r"\ntriangle +(\d\.\d{3}|-) ", txt)
    for name, size in (("loss_curves.png", (1500, 800)), ("pr_curves.png", (1500, 600))):
        assert png_size(os.path.join(out, name)) == size, name
    # what loss_curves.png draws: one point per iteration, each iteration's own losses and lr, and the log's medians
    s = logger.loss_series(os.path.join(out, "log.jsonl"))
    assert s["iter"].tolist() == list(range(1, 25)) and list(s["raw"]) == ["loss", *seen[0]]
    for name in seen[0]:
        assert s["raw"][name] == pytest.approx([x[name] for x in seen], rel=1e-5, abs=1e-9), name
    assert s["raw"]["loss"] == pytest.approx([sum(x.values()) for x in seen], rel=1e-5)
    cfg = config.from_dict(records[0]["config"])
    assert s["lr"] == pytest.approx([train.get_lr(it, cfg) for it in range(24)], rel=1e-5)
    assert s["window"] == logger.WINDOW
    for r in lines:  # the thick line passes through every logged median
        for name in ("loss", *seen[0]):
            assert s["smoothed"][name][r["iter"] - 1] == pytest.approx(r[name], rel=1e-5), (r["iter"], name)
    assert [i for i, _ in s["evals"]] == [8, 16, 24] and s["evals"][-1][1]["AP"] == metrics["AP"]


def png_size(path):
    """(width, height) of a PNG file, after PIL has checked it whole."""
    from PIL import Image
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
        return img.size


def test_proposal_cap_scales_with_images_per_device(capsys):
    cfg = config.get("R-101-FPN", verbose=False)  # 16 images, upstream's 2000 per device batch of 2
    assert train.proposal_cap(cfg, 8, verbose=True).fpn_post_nms_top_n_train == 2000  # 2 per device: as upstream
    assert capsys.readouterr().out == ""
    assert train.proposal_cap(cfg, 1, verbose=True).fpn_post_nms_top_n_train == 16000  # 1000 per image
    assert "2000 -> 16000 for 16 images per device" in capsys.readouterr().out
    assert train.proposal_cap(cfg, 16, verbose=False).fpn_post_nms_top_n_train == 1000
    for off in ("scale_fpn_post_nms_train=false", "fpn_post_nms_per_batch=false"):
        assert train.proposal_cap(config.get(cfg, [off], verbose=False), 1, False).fpn_post_nms_top_n_train == 2000


def test_random_frozen_layers_are_refused_and_missing_weights_named(demo_root, tmp_path):
    with pytest.raises(config.ConfigError, match="weights= is empty, but freeze_at=2 and norm=frozen_bn"):
        train_in_process(demo_root, tmp_path, "weights=", "norm=frozen_bn", "freeze_at=2")
    with pytest.raises(checkpoint.CheckpointError, match="not found.*dl.fbaipublicfiles.com.*R-101.pkl"):
        train_in_process(demo_root, tmp_path, f"weights={tmp_path}/R-101.pkl")


def test_num_classes_is_checked_against_the_json(demo_root, tmp_path):
    with pytest.raises(config.ConfigError, match=r"has 3 categories \(rectangle, ellipse, triangle\), so set "
                                                 r"num_classes=4 .*the config has num_classes=81"):
        train_in_process(demo_root, tmp_path, "num_classes=81")


def relabel(src, dst, ids, names, split_names=("shapes_train", "shapes_val")):
    """A copy of the demo data set under other split names, with category ids and names replaced (3 -> len(ids)
    classes: class k of the demo becomes ids[k % len(ids)])."""
    for old, new in zip(("train2017", "val2017"), split_names):
        os.makedirs(os.path.join(dst, "annotations"), exist_ok=True)
        os.symlink(os.path.join(src, old), os.path.join(dst, new))
        js = json.load(open(os.path.join(src, "annotations", f"instances_{old}.json")))
        js["categories"] = [{"id": i, "name": n} for i, n in zip(ids, names)]
        for a in js["annotations"]:
            a["category_id"] = ids[(a["category_id"] - 1) % len(ids)]
        json.dump(js, open(os.path.join(dst, "annotations", f"instances_{new}.json"), "w"))
    return dst


def test_fine_tune_own_data_with_other_ids_and_classes(demo_root, tmp_path, monkeypatch, capsys):
    import evaluate
    own = relabel(demo_root, str(tmp_path / "own"), [7, 42, 1000], ["cat", "dog", "bird"])
    split = ["train_split=shapes_train", "val_split=shapes_val"]
    first = str(tmp_path / "first")
    train_in_process(own, first, *split, "max_iter=2")
    results = json.load(open(os.path.join(first, "coco_results_shapes_val.json")))
    assert results and {r["category_id"] for r in results} <= {7, 42, 1000}
    # string category ids (the README's "any ids"): labels by position, written back as given, pycocotools' metric
    # (hotcoco reads integer ids only), equal to pycocotools' own run on the results written
    named = relabel(demo_root, str(tmp_path / "named"), ["cat-7", "dog", "b1rd"], ["cat", "dog", "bird"])
    metrics = train_in_process(named, str(tmp_path / "named_out"), *split, "max_iter=2", "score_thresh=0.0")
    results = json.load(open(os.path.join(tmp_path, "named_out", "coco_results_shapes_val.json")))
    assert results and {r["category_id"] for r in results} <= {"cat-7", "dog", "b1rd"}
    assert metrics["evaluator"] == "pycocotools" and [c["id"] for c in metrics["per_class"]] == ["b1rd", "cat-7", "dog"]
    ann = os.path.join(named, "annotations", "instances_shapes_val.json")
    assert evaluate.coco_stats(ann, results, evaluate.coco_evaluator(False))["AP"] == metrics["AP"]
    # fine-tune its model_final.pth on a 2-class set: the predictor is skipped, saying so
    two = relabel(demo_root, str(tmp_path / "two"), [5, 9], ["round", "sharp"])
    tuned = str(tmp_path / "tuned")
    capsys.readouterr()
    train_in_process(two, tuned, *split, "max_iter=2", "num_classes=3", f"weights={first}/model_final.pth")
    assert "has another class count: not loading its predictor" in capsys.readouterr().out
    drawn = []
    monkeypatch.setattr(evaluate, "draw", lambda path, det, names, out, score: drawn.append((names, det)))
    out = str(tmp_path / "dets.json")
    evaluate.main(["--ckpt", f"{tuned}/model_final.pth", "--images", os.path.join(demo_root, "val2017"),
                   "--output", out, "--vis", str(tmp_path / "vis"), "score_thresh=0.0", "num_workers=0",
                   "min_size_test=96", "max_size_test=128"])
    records = json.load(open(out))
    assert records and {r["category_id"] for r in records} == {5, 9}
    assert len(drawn) == 8 and all(names == ["__background__", "round", "sharp"] for names, _ in drawn)


# ---- a full disk and preemption

def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(v, wb[k]) for k, v in wa.items())


@pytest.mark.slow
def test_full_disk_while_checkpointing_is_one_paragraph_then_resume_is_exact(demo_root, tmp_path):
    import resource
    common = ["max_iter=6", "checkpoint_period=2", "keep_checkpoints=5"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "full")
    train_in_process(demo_root, ref, *common)
    shutil.copytree(ref, out)
    for name in ("model_0000004.pth", "model_0000006.pth"):  # as if stopped after iteration 2 ...
        os.remove(os.path.join(out, name))
    size = os.path.getsize(os.path.join(out, "model_0000002.pth"))  # ... and the disk is full at the next one
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))  # noqa: E731
    full = subprocess.run(train_cmd(demo_root, out, *common, "--resume"), capture_output=True, text=True,
                          timeout=600, preexec_fn=limit)  # python ignores SIGXFSZ: the write fails with EFBIG
    assert full.returncode == 2, full.stderr[-2000:]
    assert "Traceback" not in full.stderr and full.stderr.count("error:") == 1
    assert f"cannot write {out}/model_0000004.pth in output_dir {out}: File too large" in full.stderr
    assert sorted(os.listdir(out)) == sorted(set(os.listdir(out)) - {"model_0000004.pth.tmp"})  # no partial file
    assert same_weights(os.path.join(ref, "model_0000002.pth"), os.path.join(out, "model_0000002.pth"))
    resumed = run(train_cmd(demo_root, out, *common, "--resume"))  # space freed
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(os.path.join(ref, "model_0000006.pth"), os.path.join(out, "model_0000006.pth"))


def wait_for_iteration(out, it, proc, timeout=300):
    log = os.path.join(out, "log.jsonl")
    start = time.time()
    while not (os.path.exists(log) and any(json.loads(line).get("iter", 0) >= it and "loss" in line
                                           for line in open(log))):
        assert proc.poll() is None, f"training ended before iteration {it}: {proc.communicate()}"
        assert time.time() - start < timeout, f"iteration {it} not reached in {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("target, seed", [("process", 0), ("group", 1)])
def test_sigterm_checkpoints_the_current_iteration_then_resume_is_exact(demo_root, tmp_path, target, seed):
    import random
    rng = random.Random(seed)
    common = ["max_iter=12", "checkpoint_period=100", "num_workers=1"]  # a loader worker in the process group
    ref, out = str(tmp_path / "ref"), str(tmp_path / "stopped")
    train_in_process(demo_root, ref, *common)
    proc = subprocess.Popen(train_cmd(demo_root, out, *common), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_for_iteration(out, rng.randint(1, 6), proc)
        time.sleep(rng.uniform(0, 0.3))  # somewhere in an iteration
        if target == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    saved = checkpoint.training_checkpoints(out)
    assert len(saved) == 1 and not any(n.endswith(".tmp") for n in os.listdir(out))
    it = checkpoint.load(saved[0])["iteration"]
    assert f"SIGTERM at iteration {it}: checkpoint written" in stdout and it < 12
    resumed = run(train_cmd(demo_root, out, *common, "--resume"))
    assert resumed.returncode == 0 and f"resumed from iteration {it}" in resumed.stdout, resumed.stderr[-2000:]
    assert same_weights(os.path.join(ref, "model_0000012.pth"), os.path.join(out, "model_0000012.pth"))


@pytest.mark.slow
def test_sigterm_under_torchrun_every_rank_stops_at_one_iteration(demo_root, tmp_path):
    common = ["max_iter=8", "checkpoint_period=100"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "stopped")
    torchrun = ["--nproc_per_node", "2", "--master_port", free_port()]
    done = run(train_cmd(demo_root, ref, *common, torchrun=torchrun))
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(train_cmd(demo_root, out, *common, torchrun=["--nproc_per_node", "2", "--master_port",
                                                                         free_port()]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_iteration(out, 3, proc)
        proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both ranks, as a scheduler's would
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    saved = checkpoint.training_checkpoints(out)
    assert len(saved) == 1, stdout[-2000:] + stderr[-3000:]
    it = checkpoint.load(saved[0])["iteration"]
    assert 3 <= it < 8 and f"SIGTERM at iteration {it}" in stdout
    resumed = run(train_cmd(demo_root, out, *common, "--resume",
                            torchrun=["--nproc_per_node", "2", "--master_port", free_port()]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_weights(os.path.join(ref, "model_0000008.pth"), os.path.join(out, "model_0000008.pth"))


# ---- every user-facing failure is one paragraph, exit 2 (the fault-injection table of the reliability review)

def broken_copy(demo_root, dst, edit=None, images=True):
    """The demo data with its training json edited by edit(json), the image folders linked (or left out)."""
    for split in ("train2017", "val2017"):
        os.makedirs(os.path.join(dst, "annotations"), exist_ok=True)
        if images:
            os.symlink(os.path.join(demo_root, split), os.path.join(dst, split))
        js = json.load(open(os.path.join(demo_root, "annotations", f"instances_{split}.json")))
        encoding = edit(js) if edit and split == "train2017" else None  # an edit may name the file's encoding
        encoding = encoding if isinstance(encoding, str) else None
        with open(os.path.join(dst, "annotations", f"instances_{split}.json"), "w", encoding=encoding) as f:
            json.dump(js, f, ensure_ascii=encoding is None)
    return dst


def first_annotation(**change):
    return lambda js: js["annotations"][0].update(change)


def latin1(js):
    js["categories"][0]["name"] = "caf\u00e9"
    return "latin-1"  # the json is written in this encoding


def repeated_image_id(js):
    js["images"][1]["id"] = js["images"][0]["id"]


@pytest.mark.slow
@pytest.mark.parametrize("case, edit, extra, expect", [
    ("bbox a string", first_annotation(bbox="10,10,20,20"), [],
     r"annotation \d+ \(#0 of 'annotations', image \d+\): 'bbox' must be 4 numbers"),
    ("bbox of 3 numbers", first_annotation(bbox=[1, 2, 3]), [],
     r"'bbox' must be 4 numbers \[x, y, w, h\], got \[1, 2, 3\]"),
    ("unknown category", first_annotation(category_id=77), [], r"has category_id 77, which 'categories' does not "),
    ("image without height", lambda js: js["images"][0].pop("height"), [],
     r"image #0 of 'images' \(id \d+\) has no 'height'; a positive integer is needed"),
    ("no image folder", None, [], r"no image folder .*train2017 for .*instances_train2017.json"),
    ("negative lr", None, ["base_lr=-0.02"], r"'base_lr' is -0.02; it must be positive"),
    ("no images per batch", None, ["ims_per_batch=0"], r"'ims_per_batch' is 0; it must be a positive integer"),
    ("too few classes", None, ["num_classes=2"], r"has 3 categories .*so set num_classes=4"),
    ("json not UTF-8", latin1, [], r"instances_train2017.json is not UTF-8 text \(byte \d+: b'\\xe9"),
    ("repeated image id", repeated_image_id, [], r"image id \d+ is listed 2 times in 'images' \(\d+\.jpg, \d+\.jpg\)"),
    ("flip_prob nan", None, ["flip_prob=nan"], r"config field 'flip_prob' is nan; it must be a finite number"),
    ("output_dir a file", None, ["output_dir={file}"], r"output_dir=.*/a_file is a file, not a folder"),
    ("output_dir read-only", None, ["output_dir={read_only}/out"],
     r"output_dir=.*/read_only/out cannot be made or written \(.*\): choose another output_dir="),
])
def test_each_reviewed_fault_is_one_paragraph_exit_2(demo_root, tmp_path, case, edit, extra, expect):
    root = broken_copy(demo_root, str(tmp_path / "data"), edit, images=case != "no image folder")
    (tmp_path / "a_file").write_text("a file where output_dir points")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    extra = [e.format(file=tmp_path / "a_file", read_only=read_only) for e in extra]
    with unwritable(read_only):
        proc = run(train_cmd(root, tmp_path / "out", "max_iter=1", *extra), timeout=300)  # a hang fails here
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and re.search(expect, proc.stderr), proc.stderr[-2000:]
    assert proc.stderr.count("error:") == 1
    assert not (tmp_path / "out").exists()  # a failed run leaves no empty output_dir behind
    assert (tmp_path / "a_file").read_text() == "a file where output_dir points"




@pytest.mark.slow
def test_skipped_images_are_counted_in_the_log_summed_over_ranks(demo_root, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(demo_root, root)
    names = sorted(os.listdir(os.path.join(root, "train2017")))
    bad = names[::6]  # 4 of the 24 training images, unreadable
    for name in bad:
        open(os.path.join(root, "train2017", name), "wb").close()
    common = ["max_iter=8", "log_period=8", "checkpoint_period=100"]
    one = train_in_process(root, tmp_path / "one", *common)
    two = run(train_cmd(root, tmp_path / "two", *common,
                        torchrun=["--nproc_per_node", 2, "--master_port", free_port()]))
    assert one and two.returncode == 0, two.stderr[-3000:]
    # the expected count from the sampler itself: each drawn bad image, plus the bad ones right after it that the
    # replacement passes over (data.CocoDetection takes the next image that loads)
    cfg = config.get("demo", [f"data_root={root}", *TINY, *common], verbose=False)
    ds = data.CocoDetection(root, "train2017", cfg, True)
    broken = {i for i in range(len(ds)) if os.path.basename(ds.path(i)) in bad}
    sampler = data.TrainBatchSampler(ds.aspect_group, cfg.ims_per_batch, seed=cfg.seed)
    expected = 0
    for _, batch in zip(range(8), sampler):
        for i, _ in batch:
            while i in broken:
                expected, i = expected + 1, (i + 1) % len(ds)
    assert expected > 0
    for out in ("one", "two"):
        last = [json.loads(line) for line in open(tmp_path / out / "log.jsonl") if '"loss"' in line][-1]
        assert last["skipped_images"] == expected, out
    assert f"skipped {expected}" in open(tmp_path / "two" / "log.txt").read()


# ---- one run per output_dir; --resume of a finished run

@pytest.mark.slow
def test_second_run_into_one_output_dir_is_refused_and_a_killed_holder_blocks_nothing(demo_root, tmp_path):
    out = str(tmp_path / "out")
    first = subprocess.Popen(train_cmd(demo_root, out, "max_iter=500", "checkpoint_period=2"), cwd=HERE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_iteration(out, 2, first)
        second = run(train_cmd(demo_root, out, "max_iter=4"))
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert re.search(rf"output_dir={re.escape(out)} is in use by another run \(pid {first.pid} on .*\): two runs",
                         second.stderr), second.stderr
        records_before = open(os.path.join(out, "log.jsonl")).read()
        assert all(json.loads(line).get("iter", 0) < 500 for line in records_before.splitlines())
    finally:
        first.kill()  # SIGKILL: no handler runs, the kernel drops its lock
        first.communicate()
    assert first.returncode == -9 and checkpoint.training_checkpoints(out)
    last = checkpoint.load(checkpoint.training_checkpoints(out)[0])["iteration"]
    resumed = run(train_cmd(demo_root, out, f"max_iter={last + 2}", "checkpoint_period=2", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from iteration {last}" in resumed.stdout and os.path.exists(os.path.join(out, "model_final.pth"))


@pytest.mark.slow
def test_resume_past_max_iter_says_so_and_touches_nothing(demo_root, tmp_path):
    out = tmp_path / "out"
    assert run(train_cmd(demo_root, out, "max_iter=4", "checkpoint_period=2")).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}  # .lock: the holder
    proc = run(train_cmd(demo_root, out, "max_iter=2", "--resume"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"the newest checkpoint in .* is at iteration 4, past max_iter=2: nothing to do", proc.stdout)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before


def test_a_signal_twice_within_a_second_is_one_notice_a_later_one_acts_at_once():
    import signal
    seen = []
    old = {s: signal.signal(s, lambda signum, frame: seen.append(signum)) for s in train.Preemption.SIGNALS}
    try:
        stop = train.Preemption()
        stop.defer(True)  # as in the training loop
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the same notice through torchrun, milliseconds later
        assert stop.requested(torch.device("cpu"), 1) == signal.SIGTERM and seen == []
        stop.at -= train.Preemption.REPEAT + 0.1  # as if the first came more than REPEAT seconds ago
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: the previous handler (here: recorded) at once
        assert seen == [signal.SIGINT] and signal.getsignal(signal.SIGINT) is not stop.handle
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# ---- the log and signals at the edges of a run; the output folder

def log_iterations(out):
    """Each iteration's count among the per-iteration records of out/log.jsonl."""
    import collections
    seen = collections.Counter()
    for line in open(os.path.join(out, "log.jsonl")):
        r = json.loads(line)
        n = len(r.get("per_iter", {}).get("lr", []))
        seen.update(range(r.get("iter", 0) - n + 1, r.get("iter", 0) + 1) if n else [])
    return seen


def test_ctrl_c_then_resume_logs_every_iteration_once(demo_root, tmp_path, monkeypatch):
    out, real_step, calls = str(tmp_path), train.train_step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during iteration 6
        return real_step(*a, **k)
    monkeypatch.setattr(train, "train_step", step)
    common = ["max_iter=10", "log_period=20", "checkpoint_period=100"]
    with pytest.raises(SystemExit) as stopped:
        train_in_process(demo_root, out, *common)
    assert stopped.value.code == 128 + signal.SIGINT and log_iterations(out) == dict.fromkeys(range(1, 7), 1)
    monkeypatch.setattr(train, "train_step", real_step)
    train_in_process(demo_root, out, *common, "--resume")
    assert log_iterations(out) == dict.fromkeys(range(1, 11), 1)
    assert logger.loss_series(os.path.join(out, "log.jsonl"))["iter"].tolist() == list(range(1, 11))


def interrupt(module, name, after=False, when=lambda *a, **k: True):
    """module.name wrapped: SIGINT to this process before (or after) it runs, when when(*args)."""
    real = getattr(module, name)

    def wrapper(*a, **k):
        if not after and when(*a, **k):
            os.kill(os.getpid(), signal.SIGINT)
        result = real(*a, **k)
        if after and when(*a, **k):
            os.kill(os.getpid(), signal.SIGINT)
        return result
    return module, name, wrapper


@pytest.mark.parametrize("window, stage, advice, written", [
    ("startup", "startup", "nothing was trained; run the same command again", None),
    ("last checkpoint", "the writing of model_final.pth", "model_0000001.pth is written; the same command with "
     "--resume writes model_final.pth and evaluates", ["model_0000001.pth", "log.jsonl", "loss_curves.png"]),
    ("evaluation", "the final evaluation", "model_final.pth is written; evaluate it with python evaluate.py --ckpt ",
     ["model_0000001.pth", "model_final.pth", "log.jsonl", "loss_curves.png"]),
    ("drawing", "the drawing of loss_curves.png", "only the figure is missing",
     ["model_0000001.pth", "model_final.pth", "log.jsonl", "metrics_val2017.json"]),
])
def test_a_signal_outside_the_loop_stops_at_once_and_says_what_is_written(demo_root, tmp_path, monkeypatch, capsys,
                                                                        window, stage, advice, written):
    import evaluate
    out = str(tmp_path / "new" / "out")
    monkeypatch.setattr(*{"startup": interrupt(data, "make_train_loader"),
                          "last checkpoint": interrupt(train, "save_checkpoint", after=True),
                          "evaluation": interrupt(evaluate, "evaluate_coco"),
                          "drawing": interrupt(logger, "plot_losses")}[window])
    with pytest.raises(SystemExit) as stopped:
        train_in_process(demo_root, out, "max_iter=1")
    assert stopped.value.code == 128 + signal.SIGINT
    said = capsys.readouterr().out
    assert said.count(f"train: SIGINT during {stage}: stopped; ") == 1 and advice in said, said[-2000:]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    if written is None:  # nothing was written: no folder left, the parent made for it neither
        assert not os.path.exists(tmp_path / "new")
        return
    names = os.listdir(out)
    assert set(written) <= set(names) and not any(n.endswith(".tmp") for n in names) and ".lock" not in names
    assert f"SIGINT during {stage}" in open(os.path.join(out, "log.txt")).read()
    if "loss_curves.png" not in written:
        assert "loss_curves.png" not in names


def test_one_iteration_draws_the_curves_it_lists_and_a_full_disk_at_the_end_is_one_paragraph(demo_root, tmp_path,
                                                                                            monkeypatch, capsys):
    import errno
    import evaluate
    import launch
    out = str(tmp_path / "one")
    train_in_process(demo_root, out, "max_iter=1")
    said = capsys.readouterr().out
    listed = re.search(r"train: done; (.*) and the evaluation's results are in", said).group(1).split(", ")
    assert "loss_curves.png" in listed and all(os.path.exists(os.path.join(out, n)) for n in listed)
    assert not os.path.exists(os.path.join(out, ".lock"))  # a finished run leaves no lock
    # the disk fills during the final evaluation: its error is told (one paragraph, exit 2), the figure's is a note

    def full_eval(*a, **k):
        raise config.UserError(f"cannot write metrics_val2017.json in {out}: No space left on device")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(evaluate, "evaluate_coco", full_eval)
    monkeypatch.setattr(logger, "plot_losses", full)
    with pytest.raises(SystemExit) as failed:
        launch.run_cli(lambda: train_in_process(demo_root, out, "max_iter=2", "--resume"))
    err = capsys.readouterr().err
    assert failed.value.code == 2 and "Traceback" not in err
    assert err.count("error: ") == 1 and f"error: cannot write metrics_val2017.json in {out}" in err
    assert f"logger: cannot write loss_curves.png in output_dir {out}: No space left on device" in err
    assert os.path.exists(os.path.join(out, "model_final.pth")) and checkpoint.load(
        os.path.join(out, "model_final.pth"))["config"]["max_iter"] == 2


def test_output_dir_removes_every_folder_it_made_and_its_lock(tmp_path):
    import launch
    long = tmp_path / "new runs" / ("x" * 300) / "run"
    with pytest.raises(config.ConfigError, match=r"cannot be made or written \(File name too long\)"):
        with launch.output_dir(str(long)):
            pass
    with pytest.raises(RuntimeError):  # a run that fails before writing anything
        with launch.output_dir(str(tmp_path / "a" / "b" / "c")):
            raise RuntimeError("failed")
    assert os.listdir(tmp_path) == []
    out = tmp_path / "d"
    (out).mkdir()
    (out / ".lock").write_text("pid 1 on a host that died\n")  # a killed run's lock: the kernel freed it
    with launch.output_dir(str(out)):
        assert (out / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(config.ConfigError, match=rf"is in use by another run \(pid {os.getpid()} on "):
            with launch.output_dir(str(out)):
                pass
        (out / "log.txt").write_text("kept")
    assert os.listdir(out) == ["log.txt"]  # the lock went with the run
    with pytest.raises(RuntimeError):
        with launch.output_dir(str(out / "e" / "f")):
            (out / "e" / "f" / "model_0000001.pth").write_text("written: kept")
            raise RuntimeError("failed after writing")
    assert os.listdir(out / "e" / "f") == ["model_0000001.pth"]
