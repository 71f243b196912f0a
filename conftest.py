"""Shared test fixtures: a small generated data set, coco_tiny's location (../shared, absent in a user's clone),
tiny training settings, and helpers to run the scripts as a user would."""
import os
import socket
import subprocess
import sys

import pytest

import demo

HERE = os.path.dirname(os.path.abspath(__file__))
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
