"""Shared test fixtures: small generated data sets (the demo's shapes; a COCO-like set with COCO's 80 category ids,
crowd, tiny and polygon annotations), tiny model and training settings, and helpers to run the scripts as a user
would. coco_tiny (80 + 80 real COCO 2017 images in ../shared, absent in a user's clone) is an extra case where
present, never the only one."""
import contextlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the scripts run (train.py): before torch loads
import config  # noqa: E402
import data  # noqa: E402
import demo  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(1, os.path.join(HERE, "fake_mlu"))  # the stand-in torch_mlu's helpers (test_mlu.py, test_ops.py)
COCO_TINY = os.path.join(HERE, "..", "shared", "datasets", "coco_tiny")
# Data sets in COCO 2017's layout the COCO tests run on: the generated one always, coco_tiny where present.
COCO_SETS = ["coco_like"] + (["coco_tiny"] if os.path.isdir(COCO_TINY) else [])
# The demo network on 96-128 px images: a training iteration takes well under a second on 2 cores.
TINY = ["min_size_train=(96,)", "max_size_train=128", "min_size_test=96", "max_size_test=128", "ims_per_batch=2",
        "test_ims_per_batch=2", "log_period=1", "num_workers=0", "rpn_pre_nms_top_n_train=200",
        "rpn_post_nms_top_n_train=100", "fpn_post_nms_top_n_train=100", "roi_batch_per_image=32"]


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """data.py's per-machine index of each json goes to a temporary folder, not the user's ~/.cache (subprocesses
    inherit it)."""
    os.environ.setdefault("FRCNN_DATA_CACHE", str(tmp_path_factory.mktemp("data_cache")))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The demo's generated shapes, 24 training and 8 validation images (read-only for tests)."""
    root = str(tmp_path_factory.mktemp("demo"))
    demo.make_demo_dataset(root, seed=3, num_train=24, num_val=8)
    return root


def tiny_cfg(**kw):
    """The real key layout at toy widths; frozen_bn by default to cover upstream's path."""
    base = dict(stage_blocks=(1, 1, 1, 1), stem_channels=8, width_per_group=4, fpn_channels=16, mlp_dim=32,
                num_classes=5, anchor_sizes=(16, 32, 64, 128, 256), rpn_pre_nms_top_n_train=200,
                rpn_post_nms_top_n_train=100, fpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=100,
                rpn_post_nms_top_n_test=50, fpn_post_nms_top_n_test=60, rpn_batch_per_image=64,
                roi_batch_per_image=32, device="cpu")
    base.update(kw)
    return config.Config(**base)


@pytest.fixture(scope="session")
def coco_like(tmp_path_factory):
    """A generated data set shaped like COCO 2017's (read-only for tests): train2017 (16 images) and val2017 (8),
    the demo's pictures at several sizes with each box given one of COCO's 80 category ids (1..90 with gaps),
    sparse unsorted image ids, polygons, crowd boxes, 1-px boxes (dropped by training), an image without
    annotations, and an 'info' and 'licenses' as COCO's files have."""
    import evaluate
    root = str(tmp_path_factory.mktemp("coco_like"))
    rng = np.random.default_rng(7)
    for k, (split, count) in enumerate((("train2017", 16), ("val2017", 8))):
        os.makedirs(os.path.join(root, split))
        images, anns = [], []
        for img_id in rng.choice(10 ** 6, count, replace=False).tolist():
            img, info, boxes = demo._demo_image(rng, f"{img_id:012d}.jpg", img_id, 1)
            img.save(os.path.join(root, split, info["file_name"]), quality=90)
            images.append(info)
            if len(images) == 2:
                continue  # an image without annotations
            boxes.append(dict(boxes[0], bbox=[5, 5, 1, 30]))  # 1 px wide: no area after upstream's -1
            for b in boxes:
                anns.append(dict(b, id=len(anns) + 1 + 100000 * k, category_id=int(rng.choice(evaluate.COCO_IDS)),
                                 iscrowd=int(rng.random() < 0.15)))
        out = {"info": {"description": "coco-like test set"}, "licenses": [], "images": images,
               "annotations": anns, "categories": [{"id": i, "name": n, "supercategory": "thing"}
                                                   for i, n in zip(evaluate.COCO_IDS, evaluate.COCO_NAMES)]}
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(out, f)
    return root


@pytest.fixture(params=COCO_SETS)
def coco_set(request):
    """The folder of each COCO-layout set (see COCO_SETS), one test run each."""
    return request.getfixturevalue("coco_like") if request.param == "coco_like" else COCO_TINY


@contextlib.contextmanager
def unwritable(folder):
    """folder made unwritable: chmod for a user, the immutable flag for root (whom chmod does not stop)."""
    os.chmod(folder, 0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        probe = folder / "probe"
        try:
            probe.mkdir()
        except OSError:
            pass
        else:
            probe.rmdir()
            pytest.skip(f"cannot make {folder} unwritable here (root without chattr)")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        os.chmod(folder, 0o755)


def free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def script(name, *args, torchrun=None):
    """The command line of one of our scripts, under torchrun with its arguments when given."""
    launcher = [sys.executable, "-m", "torch.distributed.run", *map(str, torchrun)] if torchrun else [sys.executable]
    return [*launcher, os.path.join(HERE, name), *map(str, args)]


def train_cmd(root, out, *extra, torchrun=None):
    return script("train.py", "--config", "demo", f"data_root={root}", f"output_dir={out}", *TINY, *extra,
                  torchrun=torchrun)


def run(cmd, timeout=600):
    """Run a command from the repository root; returns the CompletedProcess with text output."""
    return subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=timeout)


# ---- a small split written per test (data faults, the COCO index)

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
