"""Tests of evaluate.py: detections go through predict's rescaling and coco_records' +1 to the json's boxes
(perfect detections score AP 1.0), the fast evaluators give pycocotools' twelve numbers (also from coco_array's
array, which holds coco_records' numbers exactly; pack/unpack, what ranks gather), folder inference runs
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
from conftest import COCO_SETS, COCO_TINY, run, script, tiny_cfg
from evaluate import detection_agreement


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


def coco_root(source, request):
    """The folder of a data set named in COCO_SETS or a fixture name."""
    return COCO_TINY if source == "coco_tiny" else request.getfixturevalue(source)


def installed(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("which", ["hotcoco", "faster_coco_eval"])
@pytest.mark.parametrize("source", ["demo_root", *COCO_SETS])
def test_fast_evaluators_match_pycocotools(which, source, request):
    if not installed(which):
        pytest.skip(f"{which} is not installed")
    root = coco_root(source, request)
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



def generated_set(tmp_path, images, classes, per_image, seed=0):
    """(ann_file, {index: det} in the model's form, image ids, label_to_cat_id) of a generated val set: 1 to 2 x
    per_image - 1 boxes of `classes` classes with ids 3, 6, 9, ... (gaps) and image ids 10, 20, ..., some crowd; per
    box 2 noisy copies and 2 random boxes, scores rounded (ties), and one image without detections."""
    rng = np.random.default_rng(seed)
    cat_ids, ids = [3 * (c + 1) for c in range(classes)], [10 * (i + 1) for i in range(images)]
    anns, dets = [], {}
    for i in range(images):
        n = int(rng.integers(1, 2 * per_image))
        wh = rng.uniform(4, 200, (n, 2))
        xy = rng.uniform(0, 1, (n, 2)) * (np.array([320, 240]) - wh)
        labels = rng.integers(1, classes + 1, n)
        for (x, y), (w, h), label in zip(xy.tolist(), wh.tolist(), labels.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": ids[i], "category_id": cat_ids[label - 1],
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.02)})
        near = np.repeat(np.concatenate([xy, xy + wh], 1), 2, 0) + rng.normal(0, 6, (2 * n, 4))
        far = rng.uniform(0, 160, (2 * n, 2))
        boxes = np.concatenate([near, np.concatenate([far, far + rng.uniform(4, 150, (2 * n, 2))], 1)])
        dets[i] = {"boxes": torch.tensor(boxes, dtype=torch.float32),
                   "scores": torch.tensor(rng.integers(0, 50, 4 * n) / 50, dtype=torch.float32),
                   "labels": torch.tensor(np.concatenate([np.repeat(labels, 2), rng.integers(1, classes + 1, 2 * n)]))}
    dets[images - 1] = {k: v[:0] for k, v in dets[images - 1].items()}
    path = str(tmp_path / f"generated_{images}.json")
    with open(path, "w") as f:
        json.dump({"images": [{"id": i, "file_name": f"{i}.jpg", "width": 320, "height": 240} for i in ids],
                   "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids]}, f)
    return path, dets, ids, {label: c for label, c in enumerate(cat_ids, 1)}


def test_coco_array_holds_coco_records_numbers_and_writes_the_same_json(tmp_path):
    _, dets, ids, label_to_cat_id = generated_set(tmp_path, 30, 7, 4)
    records = [{"image_id": ids[i], **r} for i in sorted(dets) for r in evaluate.coco_records(dets[i], label_to_cat_id)]
    arr = evaluate.coco_array(dict(reversed(dets.items())), ids, label_to_cat_id)  # index order, not dict order
    assert arr.shape == (len(records), 7) and arr.dtype == np.float64
    assert arr.tolist() == [[r["image_id"], *r["bbox"], r["score"], r["category_id"]] for r in records]  # exactly
    a, b = io.StringIO(), io.StringIO()
    evaluate.dump_results(arr, a, chunk=37)  # chunks that do not divide the rows
    json.dump(records, b)
    assert a.getvalue() == b.getvalue()
    empty = io.StringIO()
    evaluate.dump_results(evaluate.coco_array({}, ids, label_to_cat_id), empty)
    assert json.loads(empty.getvalue()) == [] and evaluate.coco_array({}, ids, label_to_cat_id).shape == (0, 7)


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(1)
    dets = {i: {"boxes": torch.tensor(rng.uniform(0, 99, (n, 4)), dtype=torch.float32),
                "scores": torch.rand(n), "labels": torch.randint(1, 5, (n,))} for i, n in [(7, 3), (2, 0), (4, 5)]}
    packed = evaluate.pack({**dets, 9: {"unreadable": "the file is empty (0 bytes)"}})
    assert all(isinstance(v, np.ndarray) for k, v in packed.items() if k != "unreadable")
    assert packed["index"].tolist() == [2, 4, 7] and packed["unreadable"] == {9: "the file is empty (0 bytes)"}
    back = evaluate.unpack(packed)
    assert sorted(back) == [2, 4, 7, 9] and back[9] == {"unreadable": "the file is empty (0 bytes)"}
    for i, d in dets.items():
        assert all(torch.equal(back[i][k], v) and back[i][k].dtype == v.dtype for k, v in d.items()), i
    assert back[2]["boxes"].shape == (0, 4)
    bf16 = evaluate.unpack(evaluate.pack({3: {**dets[7], "scores": dets[7]["scores"].bfloat16()}}))[3]["scores"]
    assert bf16.dtype == torch.float32 and torch.equal(bf16, dets[7]["scores"].bfloat16().float())  # amp=bf16
    assert evaluate.unpack(evaluate.pack({})) == {}


@pytest.mark.parametrize("size", ["small", "medium"])
def test_every_evaluator_on_the_array_gives_pycocotools_numbers_on_the_records(tmp_path, size):
    images, classes, per_image = {"small": (12, 4, 3), "medium": (250, 25, 10)}[size]
    ann, dets, ids, label_to_cat_id = generated_set(tmp_path, images, classes, per_image)
    records = [{"image_id": ids[i], **r} for i in sorted(dets) for r in evaluate.coco_records(dets[i], label_to_cat_id)]
    arr = evaluate.coco_array(dets, ids, label_to_cat_id)
    with contextlib.redirect_stdout(io.StringIO()):
        ref, ref_classes, ref_pr = evaluate.coco_eval(ann, records, pycocotools())
        for evaluator in evaluators():
            got, got_classes, got_pr = evaluate.coco_eval(ann, arr, evaluator)
            assert list(got) == list(ref)  # 1e-12: numpy builds average to another last bit (see above)
            assert np.allclose(list(got.values()), list(ref.values()), rtol=0, atol=1e-12), (evaluator[0], got, ref)
            assert np.allclose(got_pr["precision"], ref_pr["precision"], rtol=0, atol=1e-12), evaluator[0]
            assert [c["gt_boxes"] for c in got_classes] == [c["gt_boxes"] for c in ref_classes]
    assert 0.05 < ref["AP"] < 0.95 and len(ref_classes) == classes
    assert stats(ann, arr, pycocotools()) == ref  # pycocotools itself: the array and the records, bit for bit

@pytest.mark.slow
def test_folder_inference_command(tmp_path, coco_like):
    src = os.path.join(coco_like, "val2017")
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
        rw, rh = data.resize_size(w, h, 160, 256)
        x, y, bw, bh = d["bbox"]
        assert d["category_id"] in evaluate.COCO_IDS and 0.005 < d["score"] <= 1
        # the RPN keeps boxes of legacy width x2 - x1 + 1 >= 0 in resized pixels (remove_small_boxes with min_size
        # 0, maskrcnn_benchmark/modeling/rpn/inference.py): x2 >= x1 - 1 there, rescaled without +1
        assert x >= 0 and y >= 0 and bw >= 1 - w / rw - 1e-3 and bh >= 1 - h / rh - 1e-3
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
    assert f"(image id {int(os.path.basename(victim)[:-4])} of " in proc.stderr  # the json's id beside the file
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


# ---- where evaluate.py writes, and what it takes as --images

@pytest.mark.slow
def test_images_take_several_paths_and_evaluation_writes_beside_the_training(demo_root, tmp_path):
    cfg = config.get("demo", [f"output_dir={tmp_path / 'train'}", "min_size_test=96", "max_size_test=128"],
                     verbose=False)
    os.makedirs(cfg.output_dir)
    ckpt = os.path.join(cfg.output_dir, "model_final.pth")
    checkpoint.save(ckpt, model.build_model(cfg), cfg)
    (tmp_path / "train" / "metrics_val2017.json").write_text("the training's own")
    names = sorted(os.listdir(os.path.join(demo_root, "val2017")))[:3]
    paths = [os.path.join(demo_root, "val2017", n) for n in names]  # as the shell expands val2017/*.jpg
    out, vis = str(tmp_path / "dets.json"), str(tmp_path / "vis")
    res = run(script("evaluate.py", "--ckpt", ckpt, "--images", *paths, "score_thresh=0.0", "--output", out,
                     "--vis", vis))
    assert res.returncode == 0, res.stderr[-3000:]
    assert {d["file_name"] for d in json.load(open(out))} == set(names) and sorted(os.listdir(vis)) == names
    assert f"-> {out}; drawn (score >= 0.5) into {vis}" in res.stdout
    assert "config: score_thresh = 0.0" in res.stdout and "test_ims_per_batch" not in res.stdout  # what the user set
    res = run(script("evaluate.py", "--ckpt", ckpt, f"data_root={demo_root}", "vis_images=1"))
    assert res.returncode == 0, res.stderr[-3000:]
    beside = tmp_path / "train" / "eval_model_final"
    assert json.load(open(beside / "metrics_val2017.json"))["images"] == 8 and len(os.listdir(beside / "vis")) == 1
    assert (tmp_path / "train" / "metrics_val2017.json").read_text() == "the training's own"  # not written over


# ---- per-class results

def per_class_set(tmp_path, seed=0):
    """(annotation file, detections) with per-class APs that differ: "sharp" found with little noise, "blurry" with
    much, "missed" never detected, "absent" without ground truth but detected; a crowd box of "sharp" in image 1."""
    rng = random.Random(seed)
    cats = [{"id": i, "name": n} for i, n in [(1, "sharp"), (3, "blurry"), (4, "missed"), (7, "absent")]]
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 150} for i in range(1, 7)]
    anns, dets = [], []
    for img in images:
        for cat, count, noise in [(1, 2, 0.03), (3, 2, 0.25), (4, 1, None)]:
            for _ in range(count):
                w, h = rng.uniform(20, 60), rng.uniform(20, 60)
                x, y = rng.uniform(0, 200 - w), rng.uniform(0, 150 - h)
                anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": cat, "bbox": [x, y, w, h],
                             "area": w * h, "iscrowd": 0})
                if noise is not None:
                    size = [v * rng.uniform(1 - noise, 1 + noise) for v in (w, h)]
                    dets.append({"image_id": img["id"], "category_id": cat, "score": rng.random(),
                                 "bbox": [x + rng.gauss(0, noise * w), y + rng.gauss(0, noise * h), *size]})
        for cat in (1, 3, 7):  # a false positive of each detected class
            dets.append({"image_id": img["id"], "category_id": cat, "score": rng.random(),
                         "bbox": [rng.uniform(0, 140), rng.uniform(0, 90), rng.uniform(10, 60), rng.uniform(10, 60)]})
    anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "area": 1e4,
                 "iscrowd": 1})
    path = str(tmp_path / "per_class.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return path, dets


def evaluators():
    """(name, COCO, COCOeval) of every evaluator of coco_evaluator's chain that is installed."""
    out = [pycocotools()]
    if installed("hotcoco"):
        import hotcoco
        out.append(("hotcoco", hotcoco.COCO, hotcoco.COCOeval))
    if installed("faster_coco_eval"):
        from faster_coco_eval import COCO, COCOeval_faster
        out.append(("faster-coco-eval", COCO, COCOeval_faster))
    return out


@pytest.mark.parametrize("which", ["pycocotools", "hotcoco", "faster-coco-eval"])
def test_per_class_ap_equals_pycocotools_precision(tmp_path, which):
    evaluator = {e[0]: e for e in evaluators()}.get(which)
    if evaluator is None:
        pytest.skip(f"{which} is not installed")
    ann, dets = per_class_set(tmp_path)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann)
        e = COCOeval(gt, gt.loadRes(dets), "bbox")
        e.evaluate()
        e.accumulate()
        stats, per_class, pr = evaluate.coco_eval(ann, dets, evaluator)
    ref = e.eval["precision"][:, :, :, 0, 2]  # (T, R, K): area "all", maxDets 100
    assert e.params.areaRngLbl[0] == "all" and e.params.maxDets[2] == 100
    assert list(e.params.iouThrs[[0, 5]]) == [0.5, 0.75]

    def ap(p):  # detectron2's per-category AP (evaluation/coco_evaluation.py), -1 for its NaN
        return float(p[p > -1].mean()) if (p > -1).any() else -1.0
    assert [c["id"] for c in per_class] == [1, 3, 4, 7] and [c["name"] for c in per_class][0] == "sharp"
    for k, c in enumerate(per_class):
        for key, p in (("AP", ref[:, :, k]), ("AP50", ref[0, :, k]), ("AP75", ref[5, :, k])):
            assert c[key] == pytest.approx(ap(p), abs=1e-12), (c, key)
    assert np.allclose(pr["precision"], ref, rtol=0, atol=1e-12)
    sharp, blurry, missed, absent = per_class
    assert 0 < blurry["AP"] < sharp["AP"] < 1 and blurry["AP50"] > blurry["AP75"]  # they differ, as built
    assert missed["AP"] == missed["AP50"] == 0 and absent["AP"] == absent["AP50"] == absent["AP75"] == -1
    assert [c["gt_boxes"] for c in per_class] == [12, 12, 6, 0]  # 2, 2 and 1 per image; the crowd box not counted
    assert stats["AP"] == pytest.approx(np.mean([c["AP"] for c in per_class[:3]]), abs=1e-12)


def test_per_class_without_detections(tmp_path):
    ann, _ = per_class_set(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        stats, per_class, pr = evaluate.coco_eval(ann, [], pycocotools())
    assert stats["AP"] == 0 and [c["AP"] for c in per_class] == [0, 0, 0, -1]
    assert pr["precision"].shape == (10, 101, 4) and (pr["precision"][:, :, 3] == -1).all()


def test_per_class_table_columns():
    few = [{"id": 1, "name": "a", "AP": 0.5, "AP50": 0.75, "AP75": 0.125, "gt_boxes": 3},
           {"id": 2, "name": "b", "AP": -1, "AP50": -1, "AP75": -1, "gt_boxes": 0}]
    assert evaluate.per_class_table(few).splitlines() == ["class    AP  AP50  AP75     gt",
                                                          "a     0.500 0.750 0.125      3",
                                                          "b         -     -     -      0"]
    many = [{"id": i, "name": n, "AP": i / 100, "AP50": 0.5, "AP75": 0.25, "gt_boxes": i * 7}
            for i, n in zip(evaluate.COCO_IDS, evaluate.COCO_NAMES)]
    lines = evaluate.per_class_table(many).splitlines()
    assert len(lines) == 1 + 40 and len(lines[0]) <= 120 and lines[0].count("class") == 2  # 2 columns of 40
    assert len({len(line) for line in lines}) == 1  # aligned
    cells = [line.split(" | ")[col] for col in range(2) for line in lines[1:]]  # down each column
    assert [cell[:15].strip() for cell in cells] == evaluate.COCO_NAMES  # in category id order
    assert cells[-1] == "toothbrush     0.900 0.500 0.250    630"  # id 90: AP 0.9, 630 boxes


def test_output_naming_a_folder_is_refused_before_inference(tmp_path, capsys, monkeypatch):
    import launch
    from PIL import Image
    cfg = config.get("demo", verbose=False)
    ckpt = str(tmp_path / "demo.pth")
    checkpoint.save(ckpt, model.build_model(cfg), cfg)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "a.png")
    monkeypatch.setattr(evaluate, "predict", lambda *a, **k: pytest.fail("inference ran"))
    with pytest.raises(SystemExit) as end:
        launch.run_cli(lambda: evaluate.main(["--ckpt", ckpt, "--images", str(tmp_path / "images"), "--output",
                                              str(tmp_path)]))
    err = capsys.readouterr().err
    assert end.value.code == 2 and f"--output {tmp_path} is a folder; name the json file to write" in err, err


# ---- the edges of a run: files that are not checkpoints, bad files among good ones, names, a full disk, labels

def run_main(argv, capsys):
    """(exit code, stdout, stderr) of evaluate.main run as the script runs it (launch.run_cli)."""
    import launch
    try:
        launch.run_cli(lambda: evaluate.main(argv))
        code = 0
    except SystemExit as end:
        code = end.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def demo_ckpt(tmp_path):
    cfg = config.get("demo", ["min_size_test=96", "max_size_test=128", "num_workers=0"], verbose=False)
    torch.manual_seed(0)
    path = str(tmp_path / "demo.pth")
    checkpoint.save(path, model.build_model(cfg), cfg)
    return path


def test_ckpt_that_is_not_a_checkpoint_is_one_paragraph(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "notes.pth").write_text("hello world\n")
    (tmp_path / "folder.pth").mkdir()
    torch.save([1, 2], tmp_path / "list.pth")
    for name, what in [("empty.pth", "the file is empty"), ("notes.pth", "a text file of 12 bytes"),
                       ("folder.pth", "is a folder, not a file"), ("list.pth", "is not a checkpoint: it holds a list")]:
        code, _, err = run_main(["--ckpt", str(tmp_path / name), "--images", str(tmp_path / "images"),
                                 "device=cpu"], capsys)
        assert code == 2 and "Traceback" not in err and what in err and str(tmp_path / name) in err, (name, err)
        assert err.count("\n") == 1, err  # one paragraph, before the device or the model is looked at


def bad_folder(folder, demo_root):
    """Two good pictures plus every kind of file an image folder may hold; returns (readable, unreadable) names."""
    from PIL import Image
    folder.mkdir()
    src = sorted(os.path.join(demo_root, "val2017", n) for n in os.listdir(os.path.join(demo_root, "val2017")))
    shutil.copy(src[0], folder / "good0.jpg")
    shutil.copy(src[1], folder / "good1.jpg")
    Image.open(src[2]).save(folder / "png_named.jpg", format="PNG")
    Image.open(src[3]).convert("CMYK").save(folder / "cmyk.jpg")
    gray = np.asarray(Image.open(src[4]).convert("L"))
    Image.fromarray(gray).save(folder / "gray8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "gray16.png")  # the same picture, 16 bits
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "one.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 10000, 3), dtype=np.uint8)).save(
        folder / "strip.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a picture")
    raw = open(src[5], "rb").read()
    (folder / "cut.jpg").write_bytes(raw[: len(raw) // 2])  # decodes only as far as the loader
    return (["cmyk.jpg", "good0.jpg", "good1.jpg", "gray16.png", "gray8.png", "one.png", "png_named.jpg",
             "strip.jpg"], ["cut.jpg", "empty.jpg", "notes.jpg"])


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_files_among_images_are_skipped_and_named_readable_ones_all_done(demo_root, demo_ckpt, tmp_path,
                                                                                     capsys, workers):
    readable, unreadable = bad_folder(tmp_path / "photos", demo_root)
    out, vis = tmp_path / "res" / "dets.json", tmp_path / "vis"
    code, stdout, err = run_main(["--ckpt", demo_ckpt, "--images", str(tmp_path / "photos"), "--output", str(out),
                                  "--vis", str(vis), "score_thresh=0.0", f"num_workers={workers}"], capsys)
    assert code == 3 and evaluate.SKIPPED_EXIT == 3 and "Traceback" not in err, err
    dets = json.load(open(out))
    assert sorted({d["file_name"] for d in dets}) == readable  # random weights: 100 detections on every image
    assert sorted(os.listdir(vis)) == readable
    lines = [line for line in err.splitlines() if unreadable[0] in line]
    assert len(lines) == 1 and f"{len(unreadable)} of {len(readable) + len(unreadable)} files skipped" in lines[0]
    assert all(f"{n} (" in lines[0] for n in unreadable) and not any(f"{n} (" in lines[0] for n in readable)
    assert "the file is empty" in lines[0] and "truncated" in lines[0]
    # a 16-bit PNG is read as the 8-bit picture it holds: the same detections
    by = {n: sorted((d["category_id"], d["score"], *d["bbox"]) for d in dets if d["file_name"] == n)
          for n in ("gray8.png", "gray16.png")}
    assert by["gray8.png"] == by["gray16.png"] and len(by["gray8.png"]) == 100
    for n in ("cmyk.jpg", "gray16.png", "strip.jpg"):  # drawn in colour, in the input's own size
        from PIL import Image
        with Image.open(vis / n) as img, Image.open(tmp_path / "photos" / n) as src:
            assert img.mode == "RGB" and img.size == src.size
    # nothing readable: one paragraph, exit code 2, no output folder left
    for n in readable:
        os.remove(tmp_path / "photos" / n)
    code, _, err = run_main(["--ckpt", demo_ckpt, "--images", str(tmp_path / "photos"), "--output",
                             str(tmp_path / "none" / "dets.json")], capsys)
    assert code == 2 and "none of the 3 files can be read as an image" in err and not os.path.exists(tmp_path / "none")


def test_drawings_of_two_inputs_never_share_a_name(demo_root, demo_ckpt, tmp_path, capsys):
    from PIL import Image
    src = sorted(os.path.join(demo_root, "val2017", n) for n in os.listdir(os.path.join(demo_root, "val2017")))
    for folder in ("in", "in/a", "in/b"):
        (tmp_path / folder).mkdir()
    inputs = {"photo.jpg": src[0], "photo.png": src[1], "a/x.jpg": src[2], "b/x.jpg": src[3]}
    for name, picture in inputs.items():
        Image.open(picture).save(tmp_path / "in" / name)
    vis = tmp_path / "vis"
    code, _, err = run_main(["--ckpt", demo_ckpt, "--images", *[str(tmp_path / "in" / n) for n in inputs],
                             "--output", str(tmp_path / "dets.json"), "--vis", str(vis)], capsys)
    assert code == 0, err
    assert {d["file_name"] for d in json.load(open(tmp_path / "dets.json"))} <= set(inputs)
    pictures = {n: np.asarray(Image.open(p).convert("RGB"), np.int16) for n, p in inputs.items()}
    for name in inputs:  # each drawing is of its own input: its size and format, nearest its pixels
        with Image.open(vis / name) as drawn:
            assert drawn.format == ("PNG" if name.endswith(".png") else "JPEG")
            drawn = np.asarray(drawn, np.int16)
        diffs = {n: np.abs(drawn - p).mean() for n, p in pictures.items() if p.shape == drawn.shape}
        assert min(diffs, key=diffs.get) == name, (name, diffs)
    # drawings over the inputs themselves are refused before any work
    code, _, err = run_main(["--ckpt", demo_ckpt, "--images", str(tmp_path / "in" / "a"), "--vis",
                             str(tmp_path / "in" / "a"), "--output", str(tmp_path / "d2.json")], capsys)
    assert code == 2 and "would overwrite an input image" in err and not os.path.exists(tmp_path / "d2.json")


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EDQUOT"])
def test_full_disk_at_the_end_of_a_run_is_one_paragraph_without_partial_files(demo_root, demo_ckpt, tmp_path,
                                                                              capsys, monkeypatch, errno_name):
    import errno
    real_fsync, calls = os.fsync, []

    def fsync_until_full(limit):
        def fsync(fd):  # the disk fills after `limit` files: as write() would, at the last moment
            calls.append(fd)
            if len(calls) > limit:
                raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))
            return real_fsync(fd)
        return fsync
    photos = tmp_path / "photos"
    photos.mkdir()
    for n in sorted(os.listdir(os.path.join(demo_root, "val2017")))[:3]:
        shutil.copy(os.path.join(demo_root, "val2017", n), photos / n)
    for limit, folder in ((0, "res"), (2, "vis")):  # the json, then the second drawing
        calls.clear()
        monkeypatch.setattr(os, "fsync", fsync_until_full(limit))
        out, vis = tmp_path / f"res{limit}" / "dets.json", tmp_path / f"vis{limit}"
        code, _, err = run_main(["--ckpt", demo_ckpt, "--images", str(photos), "--output", str(out), "--vis",
                                 str(vis)], capsys)
        monkeypatch.setattr(os, "fsync", real_fsync)
        where = os.path.dirname(out) if folder == "res" else str(vis)
        assert code == 2 and "Traceback" not in err and f"in {where}: {os.strerror(getattr(errno, errno_name))}" in err
        left = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if "res" in d or "vis" in d]
        assert not [p for p in left if p.endswith(".tmp") or os.path.getsize(p) == 0], left
        assert len(left) == limit  # the json and the first drawing, whole
    # a COCO split: coco_results first
    calls.clear()
    monkeypatch.setattr(os, "fsync", fsync_until_full(0))
    code, _, err = run_main(["--ckpt", demo_ckpt, f"data_root={demo_root}", f"output_dir={tmp_path / 'ev'}"], capsys)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert code == 2 and f"cannot write coco_results_val2017.json in {tmp_path / 'ev'}" in err
    assert not os.path.exists(tmp_path / "ev")  # nothing written: the folder it made is gone


def test_full_disk_on_a_real_small_file_system(demo_root, demo_ckpt, tmp_path, capsys):
    """The same on a 16 KiB tmpfs where one can be mounted (root on Linux), the real ENOSPC of write()."""
    import subprocess
    full = tmp_path / "full"
    full.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(full)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        code, _, err = run_main(["--ckpt", demo_ckpt, "--images", os.path.join(demo_root, "val2017"), "--output",
                                 str(full / "dets.json"), "score_thresh=0.0"], capsys)
        assert code == 2 and f"cannot write dets.json in {full}: No space left on device" in err, err
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_labels_stay_inside_the_image(tmp_path):
    """A box at the right or bottom edge: its label ("rectangle 0.87") is moved in whole, as wide as in the middle."""
    from PIL import Image

    def label_width(w, h, box, row):
        Image.new("RGB", (w, h), (128, 128, 128)).save(tmp_path / "bg.png")
        det = {"boxes": torch.tensor([box]), "scores": torch.tensor([0.87]), "labels": torch.tensor([1])}
        evaluate.draw(str(tmp_path / "bg.png"), det, ["bg", "rectangle"], str(tmp_path / "out.png"), 0.5)
        pixels = np.asarray(Image.open(tmp_path / "out.png"), np.int16)
        return int((np.abs(pixels - 128).sum(2) > 0)[row].sum())  # drawn pixels along one row of the label
    middle = label_width(300, 300, [100., 50., 140., 90.], 45)
    assert middle > 40  # a label as wide as its text, above the box
    assert label_width(150, 300, [100., 50., 140., 90.], 45) == middle  # would pass the right edge at x = 150
    assert label_width(150, 300, [140., 50., 149., 90.], 45) == middle  # a box at the very edge
    assert label_width(300, 150, [10., 130., 60., 149.], 125) == middle  # at the bottom: above it, inside


def test_split_drawings_keep_the_json_file_names_sub_folders(tmp_path, demo_ckpt, capsys):
    from conftest import ann, solid, write_split
    (tmp_path / "s" / "a").mkdir(parents=True)
    (tmp_path / "s" / "b").mkdir()
    cats = [{"id": i, "name": n} for i, n in enumerate(("rectangle", "ellipse", "triangle"), 1)]
    root = write_split(tmp_path, [(1, "a/x.jpg", solid((250, 0, 0))), (2, "b/x.jpg", solid((0, 0, 250)))],
                       [ann(1, 1, [5, 5, 20, 15]), ann(2, 2, [5, 5, 20, 15])], cats)
    out = tmp_path / "ev"
    code, _, err = run_main(["--ckpt", demo_ckpt, f"data_root={root}", "val_split=s", "vis_images=2",
                             f"output_dir={out}"], capsys)
    assert code == 0, err
    from PIL import Image
    reds = [np.asarray(Image.open(out / "vis" / n), np.int16)[..., 0].mean() for n in ("a/x.jpg", "b/x.jpg")]
    assert reds[0] > 200 > 50 > reds[1]  # two drawings, each of its own picture
