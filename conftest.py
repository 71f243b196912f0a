"""Shared test fixtures: a small generated data set, coco_tiny's location (../shared, absent in a user's clone),
tiny training settings, and helpers to run the scripts as a user would."""
import json
import os
import socket
import subprocess
import sys

import pytest
from PIL import Image

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the scripts run (train.py): before torch loads
import config  # noqa: E402
import data  # noqa: E402
import demo  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(1, os.path.join(HERE, "fake_mlu"))  # the stand-in torch_mlu's helpers (test_mlu.py, test_ops.py)
SHARED = os.path.join(HERE, "..", "shared")
COCO_TINY = os.path.join(SHARED, "datasets", "coco_tiny")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared (fixtures, coco_tiny) is absent")
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
