"""COCO evaluation: perfect detections score AP 1.0 through our own result-writing path, and the fast
evaluators give pycocotools' twelve numbers on real (coco_tiny) and synthetic results."""
import contextlib
import io
import os
import random

import numpy as np
import pytest
import torch

import config
import data
import demo
import evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
COCO_TINY = os.path.join(HERE, "..", "shared", "datasets", "coco_tiny")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo_eval"))
    demo.make_demo_dataset(root, num_train=2, num_val=12)
    return root


def pycocotools():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    return "pycocotools", COCO, COCOeval


def stats(ann_file, results, evaluator):
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluate.coco_stats(ann_file, results, evaluator)


def perfect_records(ds, cfg):
    """The dataset's own GT, as the model would return it on the resized image, through coco_records."""
    results = []
    for i in range(len(ds)):
        w, h = ds.sizes[i]
        nw, nh = data.resize_size(w, h, cfg.min_size_test, cfg.max_size_test)
        boxes = torch.from_numpy(ds.boxes[i]) * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        det = {"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": torch.from_numpy(ds.labels[i])}
        results += [{"image_id": ds.ids[i], **r} for r in evaluate.coco_records(det, (nh, nw), (h, w), ds.label_to_cat_id)]
    return results


def test_perfect_detections_score_ap_one(demo_root):
    cfg = config.get("demo", [f"data_root={demo_root}"], verbose=False)
    ds = data.make_test_loader(cfg).dataset
    results = perfect_records(ds, cfg)
    ann = os.path.join(demo_root, "annotations", "instances_val2017.json")
    s = stats(ann, results, pycocotools())
    assert s["AP"] == pytest.approx(1.0) and s["AP50"] == pytest.approx(1.0)
    # the +1 round trip gives back the json's boxes, to float32 rounding of the resize
    import json
    gt = sorted((a["image_id"], a["category_id"], *a["bbox"]) for a in json.load(open(ann))["annotations"])
    got = sorted((r["image_id"], r["category_id"], *r["bbox"]) for r in results)
    assert len(got) == len(gt) and np.allclose(np.array(got), np.array(gt), atol=1e-3)
    # and a shifted detection set scores lower: the metric is not trivially 1
    worse = [dict(r, bbox=[r["bbox"][0] + r["bbox"][2] * 0.6] + r["bbox"][1:]) for r in results]
    assert stats(ann, worse, pycocotools())["AP"] < 0.5


def synthetic_results(ann_file, seed=0):
    """Noisy copies of the GT plus wrong-class and random boxes, scores with ties."""
    import json
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
    expected = "hotcoco" if installed("hotcoco") else "faster-coco-eval" if installed("faster_coco_eval") else "pycocotools"
    assert name == expected
