"""The built-in demo data set: generated pictures of shapes (rectangle, ellipse, triangle) in COCO 2017's layout,
deterministic from a seed, so `python train.py --config demo` runs the whole job on a fresh machine.

    make_demo_dataset(root, seed=0)   # root/{train2017,val2017}/*.jpg + root/annotations/instances_*.json
data.py's loader factories call it when data_root is the config's demo_data folder (the demo preset's).
"""
import colorsys
import json
import os

import numpy as np
from PIL import Image, ImageDraw

import launch


DEMO_CLASSES = ("rectangle", "ellipse", "triangle")
DEMO_SIZES = ((320, 256), (256, 320), (352, 256), (288, 288), (384, 256), (256, 352))  # (w, h)


def _demo_image(rng, file_name, img_id, ann_id):
    """One generated picture: a smooth random background with grain and clutter lines, then 1-5 shapes of
    24-120 px, h/w between 1:2 and 2:1 like the anchors, whose hue leans on the class. Shapes may overlap
    (another box covers at most half of one, IoU <= 0.3) and may run off the border (the box is then the
    visible part). Returns (image, info, annotations)."""
    w, h = DEMO_SIZES[rng.integers(len(DEMO_SIZES))]
    low = rng.uniform(0, 255, (h // 40 + 2, w // 40 + 2, 3)).astype(np.uint8)
    low = Image.fromarray(low).resize((w, h), Image.BICUBIC)  # smooth colour blotches
    img = rng.uniform(70, 170) + 0.3 * (np.asarray(low, np.float32) - 128) + rng.normal(0, 10, (h, w, 3))
    clutter = Image.new("L", (w, h))
    for _ in range(rng.integers(0, 6)):
        ImageDraw.Draw(clutter).line([tuple(rng.uniform(0, w, 2)), tuple(rng.uniform(0, h, 2))], fill=255, width=2)
    img[np.asarray(clutter) > 0] = rng.uniform(40, 200)
    anns, boxes = [], []
    for _ in range(rng.integers(1, 6)):
        for _try in range(20):
            cls = int(rng.integers(len(DEMO_CLASSES)))
            side, aspect = rng.uniform(30, 110), np.exp(rng.uniform(-0.7, 0.7))  # h/w within 1:2 and 2:1
            bw, bh = np.clip([side / np.sqrt(aspect), side * np.sqrt(aspect)], 24, 120)
            x0, y0 = rng.uniform(-0.3 * bw, w - 0.7 * bw), rng.uniform(-0.3 * bh, h - 0.7 * bh)
            shape = [x0, y0, x0 + bw, y0 + bh]
            mask = Image.new("L", (w, h))
            if cls == 0:
                ImageDraw.Draw(mask).rectangle(shape, fill=255)
            elif cls == 1:
                ImageDraw.Draw(mask).ellipse(shape, fill=255)
            else:
                apex = (x0 + rng.uniform(0.2, 0.8) * bw, y0)
                ImageDraw.Draw(mask).polygon([(x0, y0 + bh), (x0 + bw, y0 + bh), apex], fill=255)
            box = mask.getbbox()  # (l, t, r, b), r and b exclusive
            if box is None or min(box[2] - box[0], box[3] - box[1]) < 16:
                continue
            if all(_overlap_ok(box, other) for other in boxes):
                break
        else:
            continue
        hue = (cls / len(DEMO_CLASSES) + rng.normal(0, 0.05)) % 1.0
        colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1), rng.uniform(0.55, 1))) * 255
        m = np.asarray(mask) > 0
        img[m] = colour + rng.normal(0, 6, (int(m.sum()), 3))
        boxes.append(box)
        l, t, r, b = box
        anns.append({"id": ann_id + len(anns), "image_id": img_id, "category_id": cls + 1, "iscrowd": 0,
                     "bbox": [l, t, r - l, b - t], "area": int(m.sum()), "segmentation": [[l, t, r, t, r, b, l, b]]})
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return pil, {"id": img_id, "file_name": file_name, "width": w, "height": h}, anns


def _overlap_ok(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return iw * ih <= 0.5 * min(area_a, area_b) and iw * ih <= 0.3 * (area_a + area_b - iw * ih)


def make_demo_dataset(root, seed=0, num_train=500, num_val=100, splits=("train2017", "val2017")):
    """Write the demo data set once: root/{split}/*.jpg and root/annotations/instances_{split}.json, COCO 2017's
    layout, everything a function of seed. A split whose json exists with the same recipe and all its images
    is left alone; the json is written last (temporary file, rename), so an interrupted run is redone. torchrun's
    ranks all ask: one writes, the others wait, then find it done (launch.build_once)."""
    todo = [(k, split, count) for k, (split, count) in enumerate(zip(splits, (num_train, num_val)))]

    def ready():
        return True if all(_is_written(root, split, k, count, seed) for k, split, count in todo) else None

    def build():
        for k, split, count in todo:
            if not _is_written(root, split, k, count, seed):
                _write_split(root, split, k, count, seed)
        return True

    launch.build_once(os.path.join(root, "annotations", ".lock"), ready, build)


def _recipe(k, count, seed):
    return f"demo shapes v3 seed={seed} split={k} count={count}"


def _is_written(root, split, k, count, seed):
    """The split's json exists, says it was written by this recipe, and all its images are there."""
    ann_path = os.path.join(root, "annotations", f"instances_{split}.json")
    try:
        with open(ann_path) as f:
            old = json.load(f)
    except (OSError, ValueError):  # absent, or not ours to trust: written anew
        return False
    return isinstance(old, dict) and old.get("info", {}).get("description") == _recipe(k, count, seed) and all(
        os.path.isfile(os.path.join(root, split, i["file_name"])) for i in old["images"])


def _write_split(root, split, k, count, seed):
    """One split: its images, then its json."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    rng = np.random.default_rng([seed, k])
    images, anns = [], []
    for i in range(count):
        img_id = k * 1000000 + i + 1
        img, info, a = _demo_image(rng, f"{img_id:012d}.jpg", img_id, len(anns) + 1 + k * 10000000)
        img.save(os.path.join(root, split, info["file_name"]), quality=92)
        images.append(info)
        anns += a
    out = {"info": {"description": _recipe(k, count, seed)}, "licenses": [], "images": images, "annotations": anns,
           "categories": [{"id": c + 1, "name": n, "supercategory": "shape"} for c, n in enumerate(DEMO_CLASSES)]}
    launch.atomic_write(os.path.join(root, "annotations", f"instances_{split}.json"), lambda f: json.dump(out, f), "w")
    print(f"data: wrote the demo split {split}: {count} images, {len(anns)} boxes under {root}")
