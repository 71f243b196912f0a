"""Faults in data (issue 5, items 2 and 3): bad image files (every PIL mode to RGB, EXIF not applied, empty,
truncated, non-image, missing, size disagreeing with the json) and bad annotations (degenerate, outside,
non-finite boxes, missing fields, duplicate ids, unknown categories, crowd-only images, empty lists). Training
skips what it cannot read and never yields an image without boxes; evaluation refuses before any work."""
import dataclasses
import io
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

import config
import data

W, H = 40, 30


def solid(colour, size=(W, H)):
    return Image.new("RGB", size, colour)


def write_split(root, images, annotations, categories=None, split="s", drop=()):
    """root/annotations/instances_{split}.json and root/{split}/ files. images: [(id, file_name, content)] with
    content a PIL image (saved as PNG or JPEG by the name), raw bytes, or None (no file written)."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    infos = []
    for img_id, name, content in images:
        path = os.path.join(root, split, name)
        if isinstance(content, Image.Image):
            content.save(path)
        elif content is not None:
            with open(path, "wb") as f:
                f.write(content)
        infos.append({"id": img_id, "file_name": name, "width": W, "height": H})
    out = {"images": infos, "annotations": annotations,
           "categories": categories or [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    for key in drop:
        out.pop(key)
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(out, f)  # NaN / Infinity written as JSON's common extension, which json and pycocotools read
    return str(root)


def ann(ann_id, img_id, bbox, cat=1, **extra):
    return {"id": ann_id, "image_id": img_id, "category_id": cat, "bbox": bbox, "iscrowd": 0,
            "area": 100.0, **extra}


def cfg_for(root, *overrides):
    return config.get("demo", [f"data_root={root}", "train_split=s", "val_split=s", "num_workers=0",
                               "min_size_train=(30,)", "max_size_train=64", "min_size_test=30", "max_size_test=64",
                               "flip_prob=0", "ims_per_batch=2", "test_ims_per_batch=2", *overrides], verbose=False)


def dataset(root, train, *overrides):
    return data.CocoDetection(root, "s", cfg_for(root, *overrides), train)


# ---- item 2: bad images

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
        for t in targets:
            assert t["image_id"] in (1, 3, 5) and len(t["boxes"]) == 1
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
    assert (t["image_id"], index, t["skipped"]) == (3, 2, [ds.path(1)])
    x, t, index = ds[(5, "k")]  # image 6 (empty) -> wraps round to image 1
    assert (t["image_id"], index, t["skipped"]) == (1, 0, [ds.path(5)])
    x, t, index = ds[(3, "k")]
    assert t["image_id"] == 5 and t["skipped"] == [ds.path(3)]
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
    assert x.shape[1:] == (15, 20) and t["orig_size"] == (15, 20)
    assert t["boxes"].tolist() == [[2, 3, 19, 14]]  # x2 = 2 + 29 -> 19, y2 = 3 + 19 -> 14; the other dropped
    assert len(ds[1][1]["boxes"]) == 0  # evaluation keeps the image
    tr = dataset(root, True, "min_size_train=(15,)")
    _, t, index = tr[(1, "k")]
    assert t["image_id"] == 1 and t["skipped"] == [tr.path(1)] and len(t["boxes"]) == 1


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


# ---- item 3: bad annotations

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
    with pytest.raises(ValueError, match=r"annotation 2 of image 1 has no 'area'"):
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
    cases = [(ann(5, 1, [1, 1, 9, 9], cat=99), r"annotation 5 of image 1 has category_id 99"),
             (ann(5, 1, [1, 1, 9, 9], cat=None), r"annotation 5 of image 1 has category_id None"),
             (ann(6, 1, [1, 2, 3]), r"annotation 6 of image 1: 'bbox' must be 4 numbers"),
             (ann(6, 1, "1 2 3 4"), r"annotation 6 of image 1: 'bbox'"),
             (ann(6, 1, [1, 2, 3, None]), r"annotation 6 of image 1: 'bbox'"),
             (ann(6, 1, [1, 2, 3, 4, 5]), r"annotation 6 of image 1: 'bbox'"),
             (ann(6, 1, [1, 2], iscrowd=1), r"annotation 6 of image 1: 'bbox'")]
    nobox = ann(6, 1, None)
    del nobox["bbox"]
    cases.append((nobox, r"annotation 6 of image 1: 'bbox' must be 4 numbers \[x, y, w, h\], got None"))
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
            with pytest.raises(ValueError, match=rf"image 2 has {field} {re.escape(repr(value))}"):
                dataset(root, train)
    bad = json.loads(json.dumps(good))
    del bad["annotations"][0]["image_id"]
    with open(path, "w") as f:
        json.dump(bad, f)
    with pytest.raises(ValueError, match=r"instances_s\.json: pycocotools cannot index it \(KeyError: 'image_id'\)"):
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
