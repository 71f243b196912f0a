"""Tests of data.py: upstream's resize rule and normalisation, box bookkeeping through crop/resize/flip,
samplers (groups, ranks, resume), COCO loading against pycocotools, and the demo generator."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import config
import data
import demo

COCO_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "datasets", "coco_tiny")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    demo.make_demo_dataset(root, seed=3, num_train=24, num_val=8)
    return root


def demo_cfg(root, *overrides):
    return config.get("demo", [f"data_root={root}", "num_workers=0", *overrides], verbose=False)


def test_resize_rule_spec_examples():
    # spec 3.1.2, written there as w x h -> new h x new w
    for (w, h), (nh, nw) in {(640, 480): (800, 1066), (480, 640): (1066, 800), (640, 427): (800, 1199),
                             (333, 500): (1201, 800), (1000, 200): (267, 1335)}.items():
        assert data.resize_size(w, h, 800, 1333) == (nw, nh)
    assert data.resize_size(800, 600, 600, 1333) == (800, 600)  # short side already S: unchanged
    assert data.resize_size(500, 500, 800, 1333) == (800, 800)
    # S = round(1333 * 400 / 1000 = 533.2) = 533, then truncation: int(533 * 1000 / 400 = 1332.5) = 1332
    assert data.resize_size(1000, 400, 800, 1333) == (1332, 533)
    # round half to even: S = round(10 * 1 / 4 = 2.5) = 2, so 8 x 2 (round half up would give 12 x 3)
    assert data.resize_size(4, 1, 5, 10) == (8, 2)


def test_to_model_tensor_bit_exact():
    rng = np.random.default_rng(0)
    rgb = np.stack([rng.permutation(256) for _ in range(3)], 1).astype(np.uint8).reshape(8, 32, 3)  # every value
    mean = (102.9801, 115.9465, 122.7717)
    out = data.to_model_tensor(Image.fromarray(rgb), mean)
    # by hand in float32, in upstream's order: /255 (ToTensor), BGR, *255, - mean
    f = np.float32
    ref = (rgb.astype(f) / f(255))[:, :, ::-1].transpose(2, 0, 1) * f(255) - np.array(mean, f)[:, None, None]
    assert out.dtype == torch.float32 and out.shape == (3, 8, 32) and out.is_contiguous()
    assert np.array_equal(out.numpy(), ref)
    # and against torchvision's ToTensor + normalize, the functions upstream called
    tv = TF.normalize(TF.to_tensor(Image.fromarray(rgb))[[2, 1, 0]] * 255, mean, (1.0, 1.0, 1.0))
    assert torch.equal(out, tv)


def test_pad_batch():
    a, b = torch.randn(3, 5, 40), torch.randn(3, 33, 7)
    batch, sizes = data.pad_batch([a, b], 32)
    assert batch.shape == (2, 3, 64, 64) and sizes == [(5, 40), (33, 7)]
    assert torch.equal(batch[0, :, :5, :40], a) and torch.equal(batch[1, :, :33, :7], b)
    assert batch[0, :, 5:].abs().sum() == 0 and batch[0, :, :, 40:].abs().sum() == 0
    assert data.pad_batch([torch.ones(3, 32, 33)], 32)[0].shape == (1, 3, 32, 64)  # one image is padded too
    assert data.pad_batch([torch.ones(3, 5, 6)], 0)[0].shape == (1, 3, 5, 6)
    grad = torch.ones(3, 5, 6, requires_grad=True)  # the torch path (also taken for device tensors)
    out = data.pad_batch([grad, b], 32)[0]
    assert out.requires_grad and torch.equal(out[1, :, :33, :7], b) and out[0, :, :5, :6].sum() == 90


def test_load_image_modes(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 200
    cases = {
        "gray.png": (Image.fromarray(np.full((4, 6), 77, np.uint8)), (77, 77, 77)),
        "pal.png": (Image.fromarray(rgb).quantize(4), (200, 0, 0)),
        "rgba.png": (Image.fromarray(np.dstack([rgb, np.full((4, 6), 10, np.uint8)]), "RGBA"), (200, 0, 0)),
        "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), (200, 0, 0)),
        "deep.png": (Image.fromarray(np.full((4, 6), 32896, np.uint16)), (128, 128, 128)),  # 32896 / 257 = 128
    }
    for name, (img, rgb_expected) in cases.items():
        img.save(tmp_path / name)
        out = data.load_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (6, 4), name
        assert np.abs(np.asarray(out, np.int32)[2, 3] - rgb_expected).max() <= 3, (name, np.asarray(out)[2, 3])


def test_legacy_boxes():
    boxes, keep = data.legacy_boxes([[10, 20, 5, 6], [10, 20, 1, 6], [10, 20, 0, 0], [-5, 90, 20, 30],
                                     [float("nan"), 1, 5, 5], [50, 5, 5, 5]], width=100, height=100)
    assert keep.tolist() == [True, False, False, True, False, True]
    assert boxes[0].tolist() == [10, 20, 14, 25]  # x2 = x + w - 1
    assert boxes[3].tolist() == [0, 90, 14, 99]  # clipped to [0, W-1] x [0, H-1]
    assert data.legacy_boxes([], 10, 10)[0].shape == (0, 4)


def coloured_box_image(w, h, box, colour=(255, 0, 0)):
    """Noise image with the legacy box [x1, y1, x2, y2] (inclusive pixels) filled with a pure colour."""
    arr = np.random.default_rng(1).integers(0, 100, (h, w, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    arr[y1:y2 + 1, x1:x2 + 1] = colour
    return Image.fromarray(arr)


def red_extent(img):
    arr = np.asarray(img).astype(int)
    ys, xs = np.nonzero((arr[..., 0] > 180) & (arr[..., 1] < 60))
    return [xs.min(), ys.min(), xs.max(), ys.max()] if len(xs) else None


@pytest.mark.parametrize("seed", range(6))
def test_crop_and_flip_keep_boxes_on_their_pixels(seed):
    import random
    # no resize (the short side equals the min size), so the box must match the red pixels exactly
    box = [37, 22, 80, 61]
    img = coloured_box_image(120, 90, box)
    cfg = config.get("R-50-FPN", ["crop_size=50", "flip_prob=0.5", "min_size_train=(50,)"], verbose=False)
    for k in range(20):
        out, boxes, keep = data.transform(img, np.array([box], np.float32), cfg, random.Random(f"{seed}:{k}"))
        assert out.size == (50, 50) and keep.tolist() == [True]  # the crop always keeps one box
        assert boxes[0].tolist() == red_extent(out), (seed, k)
    # with a resize, boxes follow the pixels to within the bilinear blur
    cfg = config.get("R-50-FPN", ["flip_prob=1.0", "min_size_train=(180,)", "max_size_train=1000"], verbose=False)
    out, boxes, _ = data.transform(img, np.array([box], np.float32), cfg, random.Random(seed))
    assert out.size == (240, 180)
    assert np.abs(boxes[0] - red_extent(out)).max() <= 2
    assert boxes[0].tolist() == pytest.approx([240 - 80 * 2 - 1, 22 * 2, 240 - 37 * 2 - 1, 61 * 2])  # x1' = W - x2 - 1


def test_flip_formula_and_crop_drop():
    import random
    img = coloured_box_image(100, 60, [10, 5, 29, 24])
    cfg = config.get("R-50-FPN", ["flip_prob=1.0", "min_size_train=(60,)"], verbose=False)
    out, boxes, _ = data.transform(img, np.array([[10, 5, 29, 24]], np.float32), cfg, random.Random(0))
    assert boxes[0].tolist() == [100 - 29 - 1, 5, 100 - 10 - 1, 24] == red_extent(out)
    # fixed resize: per-axis scale, boxes stay on the pixels (to within the bilinear blur)
    cfg = config.get("R-50-FPN", ["flip_prob=0", "fixed_size=64"], verbose=False)
    out, boxes, _ = data.transform(img, np.array([[10, 5, 29, 24]], np.float32), cfg, random.Random(0))
    assert out.size == (64, 64) and boxes[0].tolist() == pytest.approx([6.4, 5 * 64 / 60, 29 * 0.64, 24 * 64 / 60])
    assert np.abs(boxes[0] - red_extent(out)).max() <= 1.5
    # a crop far from a second box drops it and keeps the labels aligned through the keep mask
    two = np.array([[0, 0, 9, 9], [90, 50, 99, 59]], np.float32)
    _, boxes, keep = data.random_crop(img, two, 20, random.Random(5), tries=0)
    assert keep.sum() >= 1 and len(boxes) == 2 and (boxes[keep][:, 2:] > boxes[keep][:, :2]).all()


def test_color_jitter_changes_colours_not_geometry(demo_root):
    import random
    cfg = demo_cfg(demo_root, "brightness=0.4", "contrast=0.4", "saturation=0.4", "hue=0.1", "flip_prob=0")
    img = coloured_box_image(64, 48, [5, 5, 20, 20])
    out = data.color_jitter(img, cfg, random.Random(2))
    assert out.size == img.size and not np.array_equal(np.asarray(out), np.asarray(img))


def test_train_batch_sampler_groups_ranks_and_resume():
    groups = np.random.default_rng(0).integers(0, 2, 41)
    full = data.TrainBatchSampler(groups, 4, seed=7)
    stream = [b for _, b in zip(range(40), full)]
    for b in stream:
        assert len(b) == 4 and len({groups[i] for i, _ in b}) == 1  # one aspect group per batch
    # the first epoch (at least its first 7 batches, 28 of 41 images) holds distinct images
    first = [i for b in stream[:7] for i, _ in b]
    assert len(first) == len(set(first))
    # over 40 batches (about 4 epochs) every image is used 3 to 5 times
    counts = np.bincount([i for b in stream for i, _ in b], minlength=41)
    assert counts.min() >= 3 and counts.max() <= 5
    # resume at iteration 9 sees exactly the uninterrupted stream's batches from there
    resumed = data.TrainBatchSampler(groups, 4, seed=7, start_iter=9)
    assert [b for _, b in zip(range(31), resumed)] == stream[9:]
    # two ranks: halves of the single-process batch (same augmentation keys), disjoint in the first epoch
    r0, r1 = (data.TrainBatchSampler(groups, 4, rank=r, world_size=2, seed=7) for r in (0, 1))
    for k, (b, b0, b1) in enumerate(zip(stream, r0, r1)):
        assert b0 + b1 == b and len(b0) == len(b1) == 2
        assert k >= 7 or not {i for i, _ in b0} & {i for i, _ in b1}
    assert stream != [b for _, b in zip(range(40), data.TrainBatchSampler(groups, 4, seed=8))]


def test_train_loader_resume_gives_identical_batches(demo_root):
    cfg = demo_cfg(demo_root, "ims_per_batch=2", "min_size_train=(64,96)", "max_size_train=160", "crop_size=120")
    loader = data.make_train_loader(cfg, 0, 1)
    ref = [b for _, b in zip(range(5), loader)]
    state = loader.state(3)
    resumed = data.make_train_loader(cfg, 0, 1, start_iter=3, sampler_state=json.loads(json.dumps(state)))
    for images, sizes, targets, _ in ref:  # multi-scale: short side drawn from (64, 96) unless the long side caps
        assert all(min(s) in (64, 96) or max(s) in (159, 160, 161) for s in sizes)
    for a, b in zip(ref[3:], resumed):
        assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[3] == b[3]
        assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a[2], b[2]))
    # worker processes change nothing
    workers = data.make_train_loader(dataclass_replace(cfg, num_workers=2), 0, 1)
    for a, b in zip(ref, workers):
        assert torch.equal(a[0], b[0]) and a[3] == b[3]


def dataclass_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_test_loader_shards_cover_every_image_once(demo_root):
    cfg = demo_cfg(demo_root, "test_ims_per_batch=4")
    seen = []
    for rank in range(3):
        loader = data.make_test_loader(cfg, None, rank, 3)
        for images, sizes, targets, indices in loader:
            assert images.shape[0] == len(indices) <= 1 and images.shape[2] % 32 == 0
            groups = {loader.dataset.aspect_group[i] for i in indices}
            assert len(groups) == 1
            seen += indices
    assert sorted(seen) == list(range(8))
    buffers = {}
    assert list(data.group_batches(np.array([0, 1, 0, 0, 1, 0, 1]), range(7), 2, buffers)) == [[0, 2], [1, 4], [3, 5]]
    assert buffers == {1: [6]}


def test_coco_tiny_matches_pycocotools():
    if not os.path.isdir(COCO_TINY):
        pytest.skip(f"{COCO_TINY} is absent (needs ../shared)")
    from pycocotools.coco import COCO
    cfg = config.get("R-50-FPN", [f"data_root={COCO_TINY}", "min_size_test=160", "max_size_test=267"], verbose=False)
    for split, train in (("train2017", True), ("val2017", False)):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(os.path.join(COCO_TINY, "annotations", f"instances_{split}.json"))
        ds = data.CocoDetection(COCO_TINY, split, cfg, train)
        cat_ids = sorted(coco.getCatIds())
        assert ds.cat_ids == cat_ids and len(ds.names) == 81 and ds.names[1] == coco.cats[cat_ids[0]]["name"]
        usable = {i: [a for a in coco.imgToAnns[i] if not a["iscrowd"] and a["bbox"][2] > 1 and a["bbox"][3] > 1]
                  for i in coco.getImgIds()}
        expected_ids = sorted(i for i in coco.getImgIds() if usable[i] or not train)
        assert ds.ids == expected_ids
        assert sum(map(len, ds.boxes)) == sum(len(usable[i]) for i in expected_ids)
        n_crowd = sum(a["iscrowd"] for a in coco.dataset["annotations"])
        assert n_crowd > 0 and sum(map(len, ds.boxes)) < len(coco.dataset["annotations"])
        for k in range(len(ds)):
            x, target, index = ds[k]
            info = coco.imgs[ds.ids[k]]
            h, w = x.shape[1:]
            assert index == k and target["image_id"] == info["id"]
            assert target["orig_size"] == (info["height"], info["width"])
            assert min(h, w) == 160 or max(h, w) in (266, 267, 268)
            ref = sorted([1 + cat_ids.index(a["category_id"]), a["bbox"][0] * w / info["width"]]
                         for a in usable[ds.ids[k]])
            got = sorted([int(l), float(b[0])] for l, b in zip(target["labels"], target["boxes"]))
            assert [r[0] for r in ref] == [g[0] for g in got]
            assert np.allclose([r[1] for r in ref], [g[1] for g in got], atol=1e-3)


def test_demo_dataset_is_coco_and_deterministic(demo_root, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    ann = os.path.join(demo_root, "annotations", "instances_val2017.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann)
        dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
                for a in gt.dataset["annotations"]]
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0) and ev.stats[1] == pytest.approx(1.0)
    assert [c["name"] for c in gt.dataset["categories"]] == list(demo.DEMO_CLASSES)
    for a in gt.dataset["annotations"]:
        img = gt.imgs[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert 16 <= w and 16 <= h and x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
    assert all(1 <= len(gt.imgToAnns[i]) <= 5 for i in gt.getImgIds())
    # the same seed writes the same files; a second call leaves a complete split alone
    demo.make_demo_dataset(str(tmp_path), seed=3, num_train=24, num_val=8)
    a_jpg = sorted(os.listdir(os.path.join(demo_root, "train2017")))[5]
    for rel in ["annotations/instances_val2017.json", "train2017/" + a_jpg]:
        with open(os.path.join(demo_root, rel), "rb") as f1, open(os.path.join(tmp_path, rel), "rb") as f2:
            assert f1.read() == f2.read(), rel
    mtime = os.path.getmtime(ann)
    demo.make_demo_dataset(demo_root, seed=3, num_train=24, num_val=8)
    assert os.path.getmtime(ann) == mtime


def test_missing_root_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        data.CocoDetection(str(tmp_path), "val2017", config.Config(), train=False)
