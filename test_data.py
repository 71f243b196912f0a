"""Tests of data.py: upstream's resize rule and normalisation, box bookkeeping through crop/resize/flip,
samplers (groups, ranks, resume), COCO loading against pycocotools, the demo generator, and faults: bad image
files (every PIL mode to RGB, EXIF not applied, empty, truncated, non-image, missing, size disagreeing with the
json) and bad annotations (degenerate, outside, non-finite boxes, missing fields, duplicate ids, unknown
categories, crowd-only images, empty lists). Training skips what it cannot read and never yields an image without
boxes; evaluation refuses before any work."""
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFile, ImageOps

import coco_index
import config
import data
import demo
from conftest import W, H, ann, cfg_for, dataset, solid, write_split


def demo_cfg(root, *overrides):
    return config.get("demo", [f"data_root={root}", "num_workers=0", *overrides], verbose=False)


def test_resize_rule_spec_examples():
    # upstream's get_size (data/transforms/transforms.py, Resize) on w x h -> new h x new w
    for (w, h), (nh, nw) in {(640, 480): (800, 1066), (480, 640): (1066, 800), (640, 427): (800, 1199),
                             (333, 500): (1201, 800), (1000, 200): (267, 1335), (2000, 2): (1, 1000)}.items():
        assert data.resize_size(w, h, 800, 1333) == (nw, nh)
    assert data.resize_size(2000, 2, 288, 400) == (1000, 1)  # upstream's rule gives a 0 px side here; ours 1
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
    boxes, keep = coco_index.legacy_boxes([[10, 20, 5, 6], [10, 20, 1, 6], [10, 20, 0, 0], [-5, 90, 20, 30],
                                     [float("nan"), 1, 5, 5], [50, 5, 5, 5]], width=100, height=100)
    assert keep.tolist() == [True, False, False, True, False, True]
    assert boxes[0].tolist() == [10, 20, 14, 25]  # x2 = x + w - 1
    assert boxes[3].tolist() == [0, 90, 14, 99]  # clipped to [0, W-1] x [0, H-1]
    assert coco_index.legacy_boxes([], 10, 10)[0].shape == (0, 4)


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
    workers = data.make_train_loader(dataclasses.replace(cfg, num_workers=2), 0, 1)
    for a, b in zip(ref, workers):
        assert torch.equal(a[0], b[0]) and a[3] == b[3]


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


def test_coco_split_matches_pycocotools(coco_set):
    from pycocotools.coco import COCO
    cfg = config.get("R-50-FPN", [f"data_root={coco_set}", "min_size_test=160", "max_size_test=267"], verbose=False)
    for split, train in (("train2017", True), ("val2017", False)):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(os.path.join(coco_set, "annotations", f"instances_{split}.json"))
        ds = data.CocoDetection(coco_set, split, cfg, train)
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
            assert index == k and ds.sizes[k] == (info["width"], info["height"])
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
    # a json cut short (an interrupted copy) is not trusted: the split is written anew, the same bytes again
    copy = os.path.join(tmp_path, "annotations/instances_val2017.json")
    whole = open(copy, "rb").read()
    open(copy, "wb").write(whole[:100])
    demo.make_demo_dataset(str(tmp_path), seed=3, num_train=24, num_val=8)
    assert open(copy, "rb").read() == whole


def test_missing_root_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        data.CocoDetection(str(tmp_path), "val2017", config.Config(), train=False)


# ---- faults: a small split written per test

# ---- faults: bad images

def test_every_mode_converts_to_expected_rgb(tmp_path):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 200, 40
    deep = np.full((H, W), 257 * 100, np.uint16)
    deep[0, 0], deep[0, 1] = 65535, 0
    cases = {  # name: (image, expected RGB at pixel (5, 5)), values worked out by hand
        "gray.png": (Image.fromarray(np.full((H, W), 77, np.uint8)), (77, 77, 77)),
        "la.png": (Image.fromarray(np.full((H, W, 2), 90, np.uint8), "LA"), (90, 90, 90)),
        "bw.png": (Image.new("1", (W, H), 1), (255, 255, 255)),
        "pal.png": (Image.fromarray(rgb).quantize(4), (200, 0, 40)),
        "rgba.png": (Image.fromarray(np.dstack([rgb, np.full((H, W), 3, np.uint8)]), "RGBA"), (200, 0, 40)),
        # CMYK (0, 255, 215, 55): R = (255 - 0)(255 - 55)/255 = 200, G = 0, B = 40 * 200 / 255 = 31.4
        "cmyk.tif": (Image.new("CMYK", (W, H), (0, 255, 215, 55)), (200, 0, 31)),
        "cmyk.jpg": (Image.new("CMYK", (W, H), (0, 255, 215, 55)), (200, 0, 31)),
        "deep16.png": (Image.fromarray(deep), (100, 100, 100)),  # 16-bit: 25700 / 257 = 100, not clipped to 255
    }
    for name, (img, expected) in cases.items():
        img.save(tmp_path / name)
        out = data.load_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (W, H), name
        tol = 3 if name.endswith(".jpg") else 1
        assert np.abs(np.asarray(out, np.int32)[5, 5] - expected).max() <= tol, (name, np.asarray(out)[5, 5])
    with Image.open(tmp_path / "deep16.png") as raw:
        assert raw.mode.startswith("I")  # really stored as 16 bits
    deep_rgb = np.asarray(data.load_image(tmp_path / "deep16.png"))
    assert deep_rgb[0, 0].tolist() == [255] * 3 and deep_rgb[0, 1].tolist() == [0] * 3


def test_exif_orientation_is_not_applied(tmp_path):
    arr = np.zeros((H, W, 3), np.uint8)
    arr[:, : W // 2] = (250, 0, 0)  # left half red on the stored grid
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(tmp_path / "rot.jpg") as raw:
        assert ImageOps.exif_transpose(raw).size == (H, W)  # the tag is there and would rotate
    out = np.asarray(data.load_image(tmp_path / "rot.jpg"), np.int32)
    assert out.shape == (H, W, 3)  # the stored grid, where the json's boxes live
    assert out[H // 2, 2, 0] > 200 and out[H // 2, W - 3, 0] < 50


def truncated(img, fmt):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def noisy(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8))


def test_unreadable_files_raise_naming_the_file(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # a truncated file is an error, never grey pixels
    bad = {"empty.jpg": b"", "half.jpg": truncated(noisy(), "JPEG"), "half.png": truncated(noisy(), "PNG"),
           "text.jpg": b"this is not an image\n" * 10}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    for name in [*bad, "missing.png"]:
        with pytest.raises(data.UnreadableImage, match=re.escape(str(tmp_path / name))):
            data.load_image(tmp_path / name)
    assert issubclass(data.UnreadableImage, OSError)  # evaluate.py's folder mode catches OSError


def bad_training_split(root):
    """Six images: ids 1, 3, 5 good; 2 a non-image file, 4 missing, 6 empty. Each has one box."""
    contents = {1: solid((250, 0, 0)), 2: b"not an image", 3: solid((0, 250, 0)), 4: None, 5: solid((0, 0, 250)),
                6: b""}
    images = [(i, f"{i}.png", c) for i, c in contents.items()]
    return write_split(root, images, [ann(i, i, [5, 5, 20, 15]) for i in contents])


@pytest.mark.parametrize("workers", [0, 1])
def test_training_skips_bad_images_with_full_batches(tmp_path, capfd, workers):
    root = bad_training_split(tmp_path)
    cfg = cfg_for(root, f"num_workers={workers}", "aspect_grouping=False")
    loader = data.make_train_loader(cfg)
    batches = [b for _, b in zip(range(9), loader)]  # 18 draws: each bad image drawn 3 times
    skipped = []
    for images, sizes, targets, indices in batches:
        assert images.shape[0] == 2 and len(targets) == 2 and torch.isfinite(images).all()
        assert {loader.dataset.ids[i] for i in indices} <= {1, 3, 5}
        for t in targets:
            assert len(t["boxes"]) == 1
            skipped += t["skipped"]
    bad = {os.path.join(root, "s", f"{i}.png") for i in (2, 4, 6)}
    assert set(skipped) == bad and len(skipped) >= 9  # every draw of a bad image is counted
    out = capfd.readouterr().out
    for path in bad:  # one warning per file per process (the one worker, or the main process)
        assert out.count(f"cannot read image {path}") == 1, out
    if workers:
        ref = [b for _, b in zip(range(9), data.make_train_loader(dataclasses.replace(cfg, num_workers=0)))]
        for a, b in zip(ref, batches):  # the replacement is deterministic: same batches in and out of workers
            assert torch.equal(a[0], b[0]) and a[3] == b[3]


def test_training_replacement_is_the_next_image_that_loads(tmp_path):
    ds = dataset(bad_training_split(tmp_path), True)
    assert ds.ids == [1, 2, 3, 4, 5, 6]
    x, t, index = ds[(1, "k")]  # index 1 is image 2 (not an image) -> image 3
    assert (ds.ids[index], t["skipped"]) == (3, [ds.path(1)])
    x, t, index = ds[(5, "k")]  # image 6 (empty) -> wraps round to image 1
    assert (ds.ids[index], t["skipped"]) == (1, [ds.path(5)])
    x, t, index = ds[(3, "k")]
    assert ds.ids[index] == 5 and t["skipped"] == [ds.path(3)]
    assert ds[(0, "k")][1]["skipped"] == []


def test_all_training_images_unreadable_is_a_clear_error(tmp_path):
    root = write_split(tmp_path, [(1, "1.png", b"x"), (2, "2.png", None)], [ann(1, 1, [1, 1, 9, 9]),
                                                                              ann(2, 2, [1, 1, 9, 9])])
    with pytest.raises(data.UnreadableImage, match="none of the 2 training images"):
        dataset(root, True)[(0, "k")]


def test_file_size_disagreeing_with_json(tmp_path):
    # the json says 40x30, the files are 20x15: boxes clipped to the file; a box left outside it is dropped,
    # and in training an image left without boxes is replaced
    small = solid((9, 9, 9), (20, 15))
    root = write_split(tmp_path, [(1, "1.png", small), (2, "2.png", small)],
                       [ann(1, 1, [2, 3, 30, 20]), ann(2, 1, [25, 2, 5, 5]), ann(3, 2, [25, 2, 10, 10])])
    ds = dataset(root, False, "min_size_test=15")
    x, t, _ = ds[0]
    assert x.shape[1:] == (15, 20)
    assert t["boxes"].tolist() == [[2, 3, 19, 14]]  # x2 = 2 + 29 -> 19, y2 = 3 + 19 -> 14; the other dropped
    assert len(ds[1][1]["boxes"]) == 0  # evaluation keeps the image
    tr = dataset(root, True, "min_size_train=(15,)")
    _, t, index = tr[(1, "k")]
    assert tr.ids[index] == 1 and t["skipped"] == [tr.path(1)] and len(t["boxes"]) == 1


def test_evaluation_refuses_missing_or_empty_files_before_any_work(tmp_path):
    root = write_split(tmp_path, [(1, "1.png", solid((1, 2, 3))), (2, "gone.png", None), (3, "zero.png", b"")],
                       [ann(1, 1, [1, 1, 9, 9])])
    with pytest.raises(FileNotFoundError, match=r"2 missing or empty: .*gone\.png, .*zero\.png"):
        data.make_test_loader(cfg_for(root))
    data.make_train_loader(cfg_for(root))  # training is not refused: it skips them


@pytest.mark.parametrize("workers", [0, 1])
def test_evaluation_undecodable_file_is_an_error_naming_it(tmp_path, workers):
    root = write_split(tmp_path, [(1, "1.png", solid((1, 2, 3))), (2, "bad.png", truncated(noisy(), "PNG"))], [])
    loader = data.make_test_loader(cfg_for(root, f"num_workers={workers}", "test_ims_per_batch=1"))
    with pytest.raises(Exception, match=re.escape(os.path.join(root, "s", "bad.png"))):
        for _ in loader:
            pass


# ---- faults: bad annotations

def test_degenerate_outside_and_nonfinite_boxes(tmp_path, capsys):
    nan, inf = float("nan"), float("inf")
    anns = [ann(1, 1, [2, 3, 10, 8]), ann(2, 1, [5, 5, 0, 9]), ann(3, 1, [5, 5, -4, 9]), ann(4, 1, [5, 5, 9, 1]),
            ann(5, 1, [30, 20, 20, 20]), ann(6, 1, [-10, -10, 15, 15]), ann(7, 1, [50, 5, 9, 9]),
            ann(8, 1, [-30, 5, 9, 9]), ann(9, 1, [nan, 5, 9, 9]), ann(10, 1, [5, 5, inf, 9]),
            ann(11, 1, [5, -inf, 9, 9]), ann(12, 2, [nan] * 4), ann(13, 2, [3, 3, 0.5, 9])]
    root = write_split(tmp_path, [(1, "1.png", noisy()), (2, "2.png", noisy(1))], anns)
    cfg = cfg_for(root)
    loader = data.make_train_loader(cfg)
    out = capsys.readouterr().out
    assert "data: s: 10 boxes dropped without positive area" in out and "1 images dropped" in out
    ds = loader.dataset
    assert ds.ids == [1]  # image 2 kept no box
    # by hand, legacy xyxy: x2 = x + w - 1 then clipped to [0, 39] x [0, 29]
    assert ds.boxes[0].tolist() == [[2, 3, 11, 10], [30, 20, 39, 29], [0, 0, 4, 4]]
    for images, sizes, targets, _ in (b for _, b in zip(range(3), loader)):
        for t in targets:
            b = t["boxes"]
            assert len(b) == 3 and torch.isfinite(b).all() and (b[:, 2:] > b[:, :2]).all()


def test_missing_iscrowd_and_area(tmp_path):
    a1 = ann(1, 1, [2, 2, 9, 9])
    del a1["iscrowd"]
    a2 = ann(2, 1, [12, 2, 9, 9])
    del a2["area"]
    root = write_split(tmp_path, [(1, "1.png", noisy())], [a1, a2])
    ds = dataset(root, True)
    assert len(ds.boxes[0]) == 2  # missing iscrowd is not crowd (COCOeval reads it the same way)
    assert any("1 without 'iscrowd'" in n for n in ds.notes) and any("1 without 'area'" in n for n in ds.notes)
    with pytest.raises(ValueError, match=r"annotation 2 \(#1 of 'annotations', image 1\) has no 'area'"):
        dataset(root, False)  # COCOeval would KeyError on it after the whole inference
    root2 = write_split(tmp_path / "b", [(1, "1.png", noisy())], [a1])
    assert dataset(root2, False)[0][1]["boxes"].shape == (1, 4)


def test_duplicate_annotation_ids(tmp_path):
    root = write_split(tmp_path, [(1, "1.png", noisy()), (2, "2.png", noisy())],
                       [ann(7, 1, [2, 2, 9, 9]), ann(7, 2, [3, 3, 9, 9]), ann(8, 2, [12, 3, 9, 9])])
    ds = dataset(root, True)
    assert [len(b) for b in ds.boxes] == [1, 2]  # training keeps both: pycocotools' per-image lists do
    assert any("1 annotation ids used more than once" in n for n in ds.notes)
    with pytest.raises(ValueError, match=r"annotation id 7 is used 2 times \(images \[1, 2\]\)"):
        dataset(root, False)


def test_unknown_category_and_bad_bbox_name_annotation_and_image(tmp_path):
    cases = [(ann(5, 1, [1, 1, 9, 9], cat=99), r"annotation 5 \(#1 of 'annotations', image 1\) has category_id 99"),
             (ann(5, 1, [1, 1, 9, 9], cat=None), r"annotation 5 \(#1 of 'annotations', image 1\) has category_id None"),
             (ann(6, 1, [1, 2, 3]), r"annotation 6 \(#1 of 'annotations', image 1\): 'bbox' must be 4 numbers"),
             (ann(6, 1, "1 2 3 4"), r"annotation 6 \(#1 of 'annotations', image 1\): 'bbox'"),
             (ann(6, 1, [1, 2, 3, None]), r"annotation 6 \(#1 of 'annotations', image 1\): 'bbox'"),
             (ann(6, 1, [1, 2, 3, 4, 5]), r"annotation 6 \(#1 of 'annotations', image 1\): 'bbox'"),
             (ann(6, 1, [1, 2], iscrowd=1), r"annotation 6 \(#1 of 'annotations', image 1\): 'bbox'")]
    nobox = ann(6, 1, None)
    del nobox["bbox"]
    cases.append((nobox, r"annotation 6 \(#1 of 'annotations', image 1\): 'bbox' must be 4 numbers \[x, y, w, h\], "
                         r"got None"))
    for k, (a, message) in enumerate(cases):
        root = write_split(tmp_path / str(k), [(1, "1.png", noisy())], [ann(1, 1, [1, 1, 9, 9]), a])
        for train in (True, False):
            with pytest.raises(ValueError, match=message):
                dataset(root, train)


def test_crowd_only_image_empty_list_and_empty_category(tmp_path):
    cats = [{"id": 1, "name": "a"}, {"id": 3, "name": "unused"}, {"id": 5, "name": "c"}]
    root = write_split(tmp_path, [(1, "1.png", noisy()), (2, "2.png", noisy(1))],
                       [ann(1, 1, [1, 1, 9, 9], cat=5), ann(2, 2, [1, 1, 9, 9], iscrowd=1)], categories=cats)
    ds = dataset(root, True)
    assert ds.ids == [1] and ds.labels[0].tolist() == [3]  # the empty category keeps its label (2) as upstream
    assert ds.names == ["__background__", "a", "unused", "c"] and ds.label_to_cat_id == {1: 1, 2: 3, 3: 5}
    assert any("1 images dropped without a usable non-crowd box" in n for n in ds.notes)
    assert dataset(root, False).ids == [1, 2]  # evaluation keeps the crowd-only image
    for k, drop in enumerate([(), ("annotations",)]):  # an empty list, and no 'annotations' key at all
        root = write_split(tmp_path / f"e{k}", [(1, "1.png", noisy())], [], drop=drop)
        with pytest.raises(ValueError, match=r"instances_s\.json: no image has a usable box \(0 annotations\)"):
            data.make_train_loader(cfg_for(root))
        ev = dataset(root, False)
        assert ev.ids == [1] and len(ev[0][1]["boxes"]) == 0


def test_missing_image_fields_and_unindexable_json(tmp_path):
    root = write_split(tmp_path, [(1, "1.png", noisy()), (2, "2.png", noisy())], [ann(1, 1, [1, 1, 9, 9])])
    path = os.path.join(root, "annotations", "instances_s.json")
    with open(path) as f:
        good = json.load(f)
    for field, value in [("width", None), ("height", None), ("width", 0), ("height", "30")]:
        bad = json.loads(json.dumps(good))
        if value is None:
            del bad["images"][1][field]
        else:
            bad["images"][1][field] = value
        with open(path, "w") as f:
            json.dump(bad, f)
        for train in (True, False):
            got = f"no '{field}'" if value is None else f"{field} {re.escape(repr(value))}"
            with pytest.raises(ValueError, match=rf"image #1 of 'images' \(id 2\) has {got}; a positive integer"):
                dataset(root, train)
    bad = json.loads(json.dumps(good))
    del bad["annotations"][0]["image_id"]
    with open(path, "w") as f:
        json.dump(bad, f)
    with pytest.raises(ValueError, match=r"instances_s\.json: annotation #0 of 'annotations' .* needs an 'id' \(an "
                       r"integer or a string\) and an 'image_id'"):
        dataset(root, True)


def test_bad_boxes_give_finite_losses(tmp_path):
    import model
    nan, inf = float("nan"), float("inf")
    anns = [ann(1, 1, [2, 3, 10, 8]), ann(2, 1, [5, 5, 0, 9]), ann(3, 1, [nan, 5, 9, 9]), ann(4, 1, [5, 5, inf, 9]),
            ann(5, 1, [30, 20, 20, 20]), ann(6, 1, [-50, 2, 9, 9]), ann(7, 2, [nan] * 4), ann(8, 3, [1, 1, 9, 9]),
            ann(9, 3, [4, 4, 9, 9], iscrowd=1)]
    root = write_split(tmp_path, [(i, f"{i}.png", noisy(i)) for i in (1, 2, 3)], anns)
    cfg = cfg_for(root, "min_size_train=(64,)", "max_size_train=96")
    torch.manual_seed(0)
    net = model.build_model(cfg).train()
    images, sizes, targets, _ = next(iter(data.make_train_loader(cfg)))
    plain = [{k: t[k] for k in ("boxes", "labels")} for t in targets]
    losses = net(images, sizes, plain)
    assert all(len(t["boxes"]) for t in plain) and all(torch.isfinite(v) for v in losses.values()), losses
    # the same step with one NaN box let through is NaN: the filtering above is what keeps the loss finite
    plain[0] = {"boxes": torch.cat([plain[0]["boxes"], torch.tensor([[nan, 5.0, 20.0, 20.0]])]),
                "labels": torch.cat([plain[0]["labels"], torch.tensor([1])])}
    assert not all(torch.isfinite(v) for v in net(images, sizes, plain).values())


# ---- loader workers under each start method: the dataset pickles as its index file's path

def many_images(root, n):
    """A split of n images (one PNG behind every file name) with a box or two each, image 3 crowd-only."""
    png = os.path.join(root, "one.png")
    os.makedirs(root, exist_ok=True)
    solid((90, 20, 200)).save(png)
    os.makedirs(os.path.join(root, "s"), exist_ok=True)
    for i in range(1, n + 1):
        os.symlink(png, os.path.join(root, "s", f"{i}.png"))
    anns = [ann(j, 1 + j % n, [1 + j % 7, 2, 9 + j % 5, 8], cat=1 + j % 2, iscrowd=int(1 + j % n == 3))
            for j in range(2 * n)]
    return write_split(root, [(i, f"{i}.png", None) for i in range(1, n + 1)], anns)


def test_dataset_pickles_as_its_index_path_whatever_its_size(tmp_path):
    import pickle
    sizes = []
    for n in (20, 2000):
        for train in (True, False):
            ds = dataset(many_images(str(tmp_path / f"{n}{train}"), n), train)
            blob = pickle.dumps(ds)
            sizes.append(len(blob))
            copy = pickle.loads(blob)
            assert copy._index == ds._index and "_arrays" not in pickle.loads(blob).__getstate__()
            assert len(copy) == len(ds) and copy.ids == ds.ids
            assert copy.aspect_group.tolist() == ds.aspect_group.tolist()
            for i in (0, len(ds) // 2, len(ds) - 1):
                assert copy.path(i) == ds.path(i) and copy.sizes[i] == ds.sizes[i]
                assert np.array_equal(copy.boxes[i], ds.boxes[i]) and np.array_equal(copy.labels[i], ds.labels[i])
    assert max(sizes) - min(sizes) < 200, sizes  # the path, not the images: 100x the images, the same pickle


def test_dataset_without_an_index_file_pickles_its_arrays(tmp_path, monkeypatch):
    import pickle
    root = many_images(str(tmp_path / "d"), 30)
    monkeypatch.setattr(coco_index, "cache_dirs", lambda: [])  # no folder to write an index to
    ds = dataset(root, True)
    copy = pickle.loads(pickle.dumps(ds))
    assert ds._index is None and copy.ids == ds.ids and all(np.array_equal(a, b) for a, b in zip(copy.boxes, ds.boxes))


START_METHOD = r"""
import multiprocessing, os, sys
sys.path.insert(0, os.getcwd())
import torch
import config, data
method, root = sys.argv[1], sys.argv[2]
if method != "default":
    multiprocessing.set_start_method(method, force=True)
out = []
for workers in (0, 2):
    c = config.get("demo", [f"data_root={root}", "train_split=s", "val_split=s", "min_size_train=(30,)",
                            "max_size_train=64", "min_size_test=30", "max_size_test=64", "ims_per_batch=2",
                            "test_ims_per_batch=3", f"num_workers={workers}"], verbose=False)
    train = data.make_train_loader(c)
    batches = [b for _, b in zip(range(12), train)] + list(data.make_test_loader(c))
    if workers:
        print("method", train.multiprocessing_context.get_start_method() if train.multiprocessing_context else None)
    out.append(batches)
for a, b in zip(*out):
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[3] == b[3], (a[3], b[3])
    assert all(torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["labels"], y["labels"])
               for x, y in zip(a[2], b[2]))
print("same", len(out[0]), len(out[1]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["default", "fork", "forkserver", "spawn"])
def test_loader_workers_give_the_same_batches_under_each_start_method(tmp_path, method):
    root = many_images(str(tmp_path / "d"), 25)
    proc = subprocess.run([sys.executable, "-c", START_METHOD, method, root], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = "fork" if method == "default" and sys.platform.startswith("linux") else method
    assert f"method {expected}" in proc.stdout and "same 21 21" in proc.stdout, proc.stdout + proc.stderr


class FreezeCount(torch.utils.data.Dataset):
    """Each item: how many objects the worker's garbage collector holds frozen (never visits)."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        import gc
        return gc.get_freeze_count()


def test_forked_loader_workers_hold_the_parents_objects_frozen():
    # A full collection in a forked worker writes to every tracked object it visits, copying each page of the
    # parent's that holds one (about 80 MiB per worker with torch loaded). data.Loader starts its workers with
    # those objects frozen, so their collections skip them, and gives them back to the parent's collector.
    import gc
    assert gc.get_freeze_count() == 0
    ours = list(data.Loader(FreezeCount(), batch_size=None, num_workers=1, multiprocessing_context="fork"))
    assert gc.get_freeze_count() == 0  # the parent collects its objects as before
    assert min(ours) > 10000, ours  # torch and the tests' modules alone are tens of thousands of objects
    plain = list(torch.utils.data.DataLoader(FreezeCount(), batch_size=None, num_workers=1,
                                             multiprocessing_context="fork"))
    assert plain == [0, 0]  # what a worker of torch's own loader sees: the reason for data.Loader
