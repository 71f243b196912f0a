"""Tests of evaluate.py: detections go through predict's rescaling and coco_records' +1 to the json's boxes
(perfect detections score AP 1.0), the fast evaluators give pycocotools' twelve numbers, folder inference runs
as a user would, and checkpoints that do not fit are refused in one paragraph."""
import contextlib
import io
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

import checkpoint
import config
import data
import evaluate
import model
from conftest import COCO_TINY, needs_shared, run, script
from evaluate import detection_agreement
from test_model import tiny_cfg


class ReplayNet(torch.nn.Module):
    """Stands in for the model: returns the next of a list of detections per image, in the loader's order."""

    def __init__(self, dets):
        super().__init__()
        self.dets = iter(dets)

    def forward(self, images, sizes):
        return [next(self.dets) for _ in sizes]


def pycocotools():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    return "pycocotools", COCO, COCOeval


def stats(ann_file, results, evaluator):
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluate.coco_stats(ann_file, results, evaluator)


def perfect_records(ds, cfg):
    """The dataset's own GT as the model would return it on the resized image, through predict and coco_records."""
    loader = data.make_test_loader(config.get(cfg, ["test_ims_per_batch=1"], verbose=False), dataset=ds)
    dets = []
    for i in range(len(ds)):  # batch 1: the loader's order is the index order
        w, h = ds.sizes[i]
        nw, nh = data.resize_size(w, h, cfg.min_size_test, cfg.max_size_test)
        boxes = torch.from_numpy(ds.boxes[i]) * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        dets.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": torch.from_numpy(ds.labels[i])})
    out = evaluate.predict(ReplayNet(dets), loader, torch.device("cpu"))
    return [{"image_id": ds.ids[i], **r} for i in sorted(out)
            for r in evaluate.coco_records(out[i], ds.label_to_cat_id)]


def test_perfect_detections_score_ap_one(demo_root):
    cfg = config.get("demo", [f"data_root={demo_root}", "num_workers=0"], verbose=False)
    ds = data.make_test_loader(cfg).dataset
    results = perfect_records(ds, cfg)
    ann = os.path.join(demo_root, "annotations", "instances_val2017.json")
    s = stats(ann, results, pycocotools())
    assert s["AP"] == pytest.approx(1.0) and s["AP50"] == pytest.approx(1.0)
    # the +1 round trip gives back the json's boxes, to float32 rounding of the resize
    gt = sorted((a["image_id"], a["category_id"], *a["bbox"]) for a in json.load(open(ann))["annotations"])
    got = sorted((r["image_id"], r["category_id"], *r["bbox"]) for r in results)
    assert len(got) == len(gt) and np.allclose(np.array(got), np.array(gt), atol=1e-3)
    # and a shifted detection set scores lower: the metric is not trivially 1
    worse = [dict(r, bbox=[r["bbox"][0] + r["bbox"][2] * 0.6] + r["bbox"][1:]) for r in results]
    assert stats(ann, worse, pycocotools())["AP"] < 0.5


def synthetic_results(ann_file, seed=0):
    """Noisy copies of the GT plus wrong-class and random boxes, scores with ties."""
    gt = json.load(open(ann_file))
    rng = random.Random(seed)
    cats = [c["id"] for c in gt["categories"]]
    out = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        for k in range(4):
            out.append({"image_id": a["image_id"], "category_id": a["category_id"] if k < 2 else rng.choice(cats),
                        "bbox": [x + rng.gauss(0, 0.1 * w), y + rng.gauss(0, 0.1 * h),
                                 max(1.0, w * rng.uniform(0.7, 1.3)), max(1.0, h * rng.uniform(0.7, 1.3))],
                        "score": round(rng.random(), 2)})
    return out


def installed(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("which", ["hotcoco", "faster_coco_eval"])
@pytest.mark.parametrize("source", ["coco_tiny", "demo"])
def test_fast_evaluators_match_pycocotools(which, source, demo_root):
    if not installed(which):
        pytest.skip(f"{which} is not installed")
    if source == "coco_tiny" and not os.path.isdir(COCO_TINY):
        pytest.skip("../shared/datasets/coco_tiny is absent")
    root = COCO_TINY if source == "coco_tiny" else demo_root
    ann = os.path.join(root, "annotations", "instances_val2017.json")
    results = synthetic_results(ann)
    ref = stats(ann, results, pycocotools())
    if which == "hotcoco":
        import hotcoco
        got = stats(ann, results, ("hotcoco", hotcoco.COCO, hotcoco.COCOeval))
    else:
        from faster_coco_eval import COCO, COCOeval_faster
        got = stats(ann, results, ("faster-coco-eval", COCO, COCOeval_faster))
    # The same twelve numbers to 1e-12: the metric, not a library build's last bit (hotcoco's precision arrays equal
    # pycocotools', yet numpy before 2.3 and other builds average them to another last bit).
    assert list(got) == list(ref)
    assert np.allclose(list(got.values()), list(ref.values()), rtol=0, atol=1e-12), (got, ref)
    assert 0.05 < ref["AP"] < 0.95  # a set with real misses and false positives


def test_evaluator_choice_prefers_exact_fast_ones():
    name = evaluate.coco_evaluator()[0]
    expected = ("hotcoco" if installed("hotcoco") else
                "faster-coco-eval" if installed("faster_coco_eval") else "pycocotools")
    assert name == expected


def test_coco_records_rescale_per_axis_with_plus_one(tmp_path):
    from PIL import Image
    path = str(tmp_path / "wide.png")
    Image.new("RGB", (2000, 800)).save(path)
    cfg = config.get("demo", ["min_size_test=400", "max_size_test=500", "num_workers=0"], verbose=False)
    ds = data.ImageFiles([path], cfg)
    loader = data.make_test_loader(cfg, dataset=ds)
    assert next(iter(loader))[1] == [(200, 500)]
    ds.sizes[0] = (2000, 400)  # as a json whose size disagrees with the file: x ratio 4, y ratio 2
    det = {"boxes": torch.tensor([[10.0, 20.0, 109.0, 59.0]]), "scores": torch.tensor([0.5]),
           "labels": torch.tensor([2])}
    out = evaluate.predict(ReplayNet([det]), loader, torch.device("cpu"))
    assert out[0]["boxes"].tolist() == [[40.0, 40.0, 436.0, 118.0]]  # no +1 in the rescaling, as upstream
    rec = evaluate.coco_records(out[0], {2: 13})[0]
    assert rec["bbox"] == pytest.approx([40.0, 40.0, 436 - 40 + 1, 118 - 40 + 1]) and rec["category_id"] == 13


@pytest.mark.slow
@needs_shared
def test_folder_inference_command(tmp_path):
    src = os.path.join(COCO_TINY, "val2017")
    images = tmp_path / "images"
    images.mkdir()
    names = sorted(os.listdir(src))[:3]
    for n in names:
        os.symlink(os.path.join(src, n), images / n)
    torch.manual_seed(0)
    cfg = tiny_cfg(num_classes=81, min_size_test=160, max_size_test=256)
    ckpt = str(tmp_path / "random.pth")
    checkpoint.save(ckpt, model.build_model(cfg), cfg)
    out, vis = str(tmp_path / "dets.json"), str(tmp_path / "vis")
    # random weights score about 1/81 per class: lower the threshold so that records are written
    res = run(script("evaluate.py", "--ckpt", ckpt, "--images", images, "--output", out, "--device", "cpu",
                     "--vis", vis, "score_thresh=0.005", "vis_score=0.005"))
    assert res.returncode == 0, res.stderr
    dets = json.load(open(out))
    assert dets and {d["file_name"] for d in dets} <= set(names)
    from PIL import Image
    for d in dets:
        w, h = Image.open(images / d["file_name"]).size
        x, y, bw, bh = d["bbox"]
        assert d["category_id"] in evaluate.COCO_IDS and 0.005 < d["score"] <= 1
        assert x >= 0 and y >= 0 and bw >= 1 and bh >= 1
        assert x + bw - 1 <= w - 1 + 1e-3 and y + bh - 1 <= h - 1 + 1e-3  # clipped in resized pixels, rescaled
    assert sorted(os.listdir(vis)) == sorted(names)


@pytest.mark.slow
def test_evaluate_refuses_a_checkpoint_of_another_architecture(demo_root, tmp_path):
    cfg = config.get("demo", ["num_classes=7"], verbose=False)
    ckpt = str(tmp_path / "seven.pth")
    checkpoint.save(ckpt, model.build_model(cfg), cfg)
    sd = torch.load(ckpt, weights_only=True)
    torch.save({"model": sd["model"]}, ckpt)  # upstream-style: no config, so --config demo (4 classes) applies
    proc = run(script("evaluate.py", "--ckpt", ckpt, "--config", "demo", "--data-root", demo_root, "--device", "cpu"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "shape mismatch" in proc.stderr and "cls_score" in proc.stderr


# ---- the same weights on an accelerator


def test_detection_agreement_counts_by_hand():
    a = [{"file_name": "x.jpg", "category_id": 1, "bbox": [0, 0, 100, 100], "score": 0.9},
         {"file_name": "x.jpg", "category_id": 2, "bbox": [0, 0, 100, 100], "score": 0.8},
         {"file_name": "y.jpg", "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.7}]
    b = [dict(a[0], bbox=[0.01, 0, 100, 100], score=0.9005),  # IoU 0.9999, score within 1e-3: matched
         dict(a[1], score=0.802),  # score off by 2e-3
         dict(a[2], bbox=[10, 10, 50, 49]),  # IoU 0.98
         dict(a[0], file_name="y.jpg")]  # another image
    assert detection_agreement(a, b) == (1, 3, 4)
    assert detection_agreement(a, a) == (3, 3, 3)
    flat = [dict(a[0], bbox=[5, 5, -2.5, 1]), dict(a[0], bbox=[5, 5, 0, 0])]  # degenerate: the same numbers match
    assert detection_agreement(flat, flat) == (2, 2, 2)
    assert detection_agreement(flat, [dict(r, bbox=[5.1, 5, *r["bbox"][2:]]) for r in flat]) == (0, 2, 2)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_folder_inference_matches_cpu(demo_root, tmp_path):
    """evaluate.py --images with the same weights on CUDA (FP32, TF32 off: the config's default numeric policy) and
    on the CPU: at least 99% of the detections match (same label, IoU > 0.99, score within 1e-3). Random-init demo
    weights give 100 detections per image."""
    torch.manual_seed(0)
    cfg = config.get("demo", ["device=cpu"], verbose=False)
    ckpt = str(tmp_path / "demo_random.pth")
    checkpoint.save(ckpt, model.build_model(cfg), cfg)
    dets = {}
    for device in ("cpu", "cuda"):
        out = str(tmp_path / f"{device}.json")
        res = run(script("evaluate.py", "--ckpt", ckpt, "--images", os.path.join(demo_root, "val2017"), "--output",
                         out, f"device={device}"))
        assert res.returncode == 0, res.stderr[-3000:]
        dets[device] = json.load(open(out))
    matched, n_cpu, n_cuda = detection_agreement(dets["cpu"], dets["cuda"])
    assert n_cpu >= 8 * 50, n_cpu  # plentiful: the comparison means something
    assert matched >= 0.99 * max(n_cpu, n_cuda), (matched, n_cpu, n_cuda)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_image_in_the_split_stops_evaluation_naming_it(demo_root, tmp_path, workers):
    root = str(tmp_path / "data")
    shutil.copytree(demo_root, root)
    victim = os.path.join(root, "val2017", sorted(os.listdir(os.path.join(root, "val2017")))[3])
    raw = open(victim, "rb").read()
    open(victim, "wb").write(raw[: len(raw) * 55 // 100])  # a JPEG cut at 55%
    cfg = config.get("demo", verbose=False)
    ckpt = str(tmp_path / "demo.pth")
    checkpoint.save(ckpt, model.build_model(cfg), cfg)
    out = tmp_path / "out"
    proc = run(script("evaluate.py", "--ckpt", ckpt, f"data_root={root}", f"num_workers={workers}",
                      f"output_dir={out}", "min_size_test=96", "max_size_test=128"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"cannot read image {victim}" in proc.stderr and proc.stderr.count("error:") == 1
    assert not os.path.exists(out / "metrics_val2017.json")  # nothing reported as if it were the whole split


@pytest.mark.slow
def test_truncated_checkpoint_is_one_paragraph_naming_it(tmp_path):
    cfg = config.get("demo", verbose=False)
    ckpt = str(tmp_path / "cut.pth")
    checkpoint.save(ckpt, model.build_model(cfg), cfg)
    with open(ckpt, "r+b") as f:
        f.truncate(os.path.getsize(ckpt) // 2)
    proc = run(script("evaluate.py", "--ckpt", ckpt, "--images", tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"cannot read checkpoint {ckpt!r}" in proc.stderr
