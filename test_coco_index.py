"""Tests of coco_index.py: the json of a split parsed once per machine into flat arrays (the same images, boxes,
labels and errors as the per-image construction it replaced), its index file (never stale, never half-written,
rebuilt when damaged, pruned with its json), the lock that lets one process build while the others wait, and
per-image data that holds no Python object per image."""
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import coco_index
import config
import data
from conftest import ann, dataset, solid


# ---- the json parsed once per machine: flat arrays, the index file and its lock

def per_image_reference(ann, train):
    """data.py's construction before the index file (its per-image pass over pycocotools' COCO, copied from commit
    af428b4): the reference the flat arrays must reproduce. (ids, boxes, labels, sizes, files, cat_ids, names,
    notes), or the error it raised."""
    import collections
    from pycocotools.coco import COCO
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(ann)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{ann}: pycocotools cannot index it ({type(e).__name__}: {e}): every image needs "
                         f"'id', every annotation 'id' and 'image_id'") from e
    cat_ids = coco.getCatIds()
    listed = collections.Counter(img["id"] for img in coco.dataset.get("images") or [])
    repeated = next((i for i, n in listed.items() if n > 1), None)
    if repeated is not None:  # pycocotools keeps the last entry; we refuse
        raise ValueError(f"{ann}: image id {repeated} is listed {listed[repeated]} times in 'images'")
    names = ["__background__"] + [coco.cats[c]["name"] for c in cat_ids]
    cat_id_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
    all_anns = coco.dataset.get("annotations") or []
    uses = collections.Counter(a.get("id") for a in all_anns)
    dup = next((i for i, n in uses.items() if n > 1), None)
    if dup is not None and not train:
        imgs = sorted({a.get("image_id") for a in all_anns if a.get("id") == dup})
        raise ValueError(f"{ann}: annotation id {dup!r} is used {uses[dup]} times (images {imgs}); "
                         f"evaluation needs unique annotation ids")
    count = collections.Counter()
    ids, boxes, labels, sizes, files = [], [], [], [], []
    for img_id in sorted(coco.imgs):
        info = coco.imgs[img_id]
        for field in ("width", "height"):
            v = info.get(field)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"{ann}: image {img_id} has {field} {v!r}; a positive integer is needed")
        if not info.get("file_name"):
            raise ValueError(f"{ann}: image {img_id} has no 'file_name'")
        img_anns = coco.imgToAnns.get(img_id, [])
        for a in img_anns:
            where = f"{ann}: annotation {a.get('id')!r} of image {img_id}"
            bbox = a.get("bbox")
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
                raise ValueError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
            if a.get("category_id") not in cat_id_to_label:
                raise ValueError(f"{where} has category_id {a.get('category_id')!r}, which is not in 'categories'")
            if not train and "area" not in a:
                raise ValueError(f"{where} has no 'area', which COCOeval needs: add it (w * h of the box will do)")
        count["without 'iscrowd' (taken as 0)"] += sum("iscrowd" not in a for a in img_anns)
        count["without 'area' (not used in training)"] += sum("area" not in a for a in img_anns)
        anns = [a for a in img_anns if not a.get("iscrowd", 0)]
        b, keep = coco_index.legacy_boxes([a["bbox"] for a in anns], info["width"], info["height"])
        lab = np.array([cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        count["boxes dropped without positive area inside the image (degenerate, outside, NaN/inf)"] += \
            int((~keep).sum())
        if train and not keep.any():
            count["images dropped without a usable non-crowd box"] += 1
            continue
        ids.append(img_id)
        boxes.append(b[keep])
        labels.append(lab[keep])
        sizes.append((info["width"], info["height"]))
        files.append(info["file_name"])
    count["annotations of image ids that 'images' does not list (unused)"] = sum(
        a.get("image_id") not in coco.imgs for a in all_anns)
    if dup is not None:
        count["annotation ids used more than once (all kept)"] = sum(n > 1 for n in uses.values())
    first = ["without 'iscrowd' (taken as 0)", "without 'area' (not used in training)",
             "boxes dropped without positive area inside the image (degenerate, outside, NaN/inf)",
             "annotations of image ids that 'images' does not list (unused)"]  # the order data.py prints them in
    count = {k: count[k] for k in first + [k for k in count if k not in first]}
    notes = [f"data: {os.path.basename(ann)[10:-5]}: {n} {what}" for what, n in count.items() if n]
    if train and not ids:
        raise ValueError(f"{ann}: no image has a usable box ({len(all_anns)} annotations): nothing to train on")
    return ids, boxes, labels, sizes, files, cat_ids, names, notes


def assert_same_as_reference(root, split, train):
    """CocoDetection gives the reference's images, boxes, labels, sizes, files, classes and notes, or raises its
    error with the same message."""
    ann = os.path.join(root, "annotations", f"instances_{split}.json")
    cfg = config.get("demo", [f"data_root={root}"], verbose=False)
    try:
        ids, boxes, labels, sizes, files, cat_ids, names, notes = per_image_reference(ann, train)
    except ValueError as e:  # the same data refused; which bad record it names first may differ
        with pytest.raises(coco_index.DataError) as got:
            data.CocoDetection(root, split, cfg, train)
        assert str(got.value).startswith(ann) and ("'images'" in str(e)) <= ("'images'" in str(got.value)), (e, got)
        return str(got.value)
    ds = data.CocoDetection(root, split, cfg, train)
    assert ds.ids == ids and json.loads(json.dumps(ds.ids)) == ids  # Python ints: evaluate.py writes them to json
    assert (ds.cat_ids, ds.names, ds.notes) == (cat_ids, names, notes)
    assert len(ds) == len(ds.boxes) == len(ds.labels) == len(ds.sizes) == len(ds.files) == len(ids)
    for i in range(len(ds)):
        assert ds.boxes[i].dtype == boxes[i].dtype and np.array_equal(ds.boxes[i], boxes[i], equal_nan=True)
        assert ds.labels[i].dtype == labels[i].dtype and np.array_equal(ds.labels[i], labels[i])
        assert ds.sizes[i] == sizes[i] and ds.files[i] == files[i] and ds.path(i) == os.path.join(root, split, files[i])
    assert [len(b) for b in ds.boxes] == [len(b) for b in boxes] and list(ds.sizes) == sizes
    assert ds.aspect_group.tolist() == [int(h >= w) for w, h in sizes]
    if len(ds):
        assert ds.boxes[-1].flags.writeable and ds.boxes[0] is not ds.boxes[0]  # a copy: the shared index stays intact
    return ds


@pytest.fixture
def index_cache(tmp_path, monkeypatch):
    folder = tmp_path / "index_cache"
    monkeypatch.setenv("FRCNN_DATA_CACHE", str(folder))
    return folder


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_index_matches_per_image_construction_on_coco_sets(index_cache, coco_set, split):
    for train in (True, False, True):  # the second and third construction read the index the first one wrote
        assert_same_as_reference(coco_set, split, train)
    assert len(list(index_cache.glob("*.idx"))) == 1


def generated_json(rng, num_images=300, evaluable=False):
    """A json with everything the per-image pass handles: sparse unsorted ids, int and float
    boxes, crowd, degenerate, outside and NaN boxes, annotations of unlisted images, categories out of order with
    gaps, missing iscrowd, images without annotations; unless evaluable, missing area and a repeated annotation id
    (which evaluation refuses)."""
    cats = [{"id": c, "name": f"c{c}"} for c in (5, 1, 90, 3, 77)]
    ids = rng.choice(10 ** 6, num_images, replace=False).tolist()
    images = [{"id": i, "file_name": f"{i:012d}.png", "width": int(rng.integers(20, 90)),
               "height": int(rng.integers(20, 90))} for i in ids]
    anns = []
    for k in range(num_images * 5):
        img = images[int(rng.integers(len(images)))]
        x, y, w, h = (rng.uniform(-0.1, [1, 1, 0.5, 0.5]) * ([img["width"], img["height"]] * 2)).round(2).tolist()
        bbox = [int(x), int(y), int(w), int(h)] if k % 3 == 0 else [x, y, w, h]
        if k % 17 == 0:
            bbox[int(rng.integers(4))] = float("nan") if k % 2 else float("inf")
        a = {"id": 1000 + k, "image_id": img["id"] if k % 41 else 999999999, "bbox": bbox, "area": w * h,
             "category_id": cats[int(rng.integers(len(cats)))]["id"], "iscrowd": int(rng.random() < 0.1),
             "segmentation": [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]}
        for key in ("iscrowd",) if evaluable else ("iscrowd", "area"):
            if rng.random() < 0.05:
                del a[key]
        anns.append(a)
    if not evaluable:
        anns[7]["id"] = anns[8]["id"]
    return {"images": images, "annotations": [anns[k] for k in rng.permutation(len(anns))], "categories": cats}


def write_json(root, content, split="s", files=True):
    """root/annotations/instances_{split}.json; with files, the images it names as one tiny PNG (evaluation
    checks that they exist)."""
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    for img in content.get("images", []) if files else ():
        name = img.get("file_name") if isinstance(img, dict) else None
        if isinstance(name, str) and name and not os.path.exists(os.path.join(root, split, name)):
            solid((1, 2, 3), (4, 4)).save(os.path.join(root, split, name))
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(path, "w") as f:
        json.dump(content, f)
    return path


def test_index_matches_per_image_construction_on_a_generated_set(tmp_path, index_cache):
    content = generated_json(np.random.default_rng(0))
    write_json(tmp_path, content)
    ds = assert_same_as_reference(str(tmp_path), "s", True)
    assert 250 < len(ds) < 300 and 500 < sum(map(len, ds.boxes)) < 1300  # images and boxes dropped, many kept
    for what in ("without 'iscrowd'", "without 'area'", "boxes dropped", "images dropped", "used more than once"):
        assert any(what in note for note in ds.notes), (what, ds.notes)
    assert "is used 2 times" in assert_same_as_reference(str(tmp_path), "s", False)
    write_json(tmp_path, generated_json(np.random.default_rng(0), evaluable=True))
    ds = assert_same_as_reference(str(tmp_path), "s", False)
    assert len(ds) == 300 and any(len(b) == 0 for b in ds.boxes)


FAULTS = [  # (where, key, value): value None deletes the key
    ("ann", "bbox", [1, 2, 3]), ("ann", "bbox", "1 2 3 4"), ("ann", "bbox", None), ("ann", "bbox", [1, 2, 3, True]),
    ("ann", "bbox", [1, 2, 3, "4"]), ("ann", "bbox", [1, 2, 3, 4, 5]), ("ann", "bbox", {"x": 1}),
    ("ann", "category_id", 99), ("ann", "category_id", "1"), ("ann", "category_id", None), ("ann", "area", None),
    ("ann", "iscrowd", None), ("ann", "iscrowd", 1), ("ann", "image_id", None), ("ann", "id", None),
    ("ann", "image_id", 123456789), ("ann", "id", "dup"), ("ann", "bbox", [float("nan")] * 4),
    ("img", "width", 0), ("img", "height", "30"), ("img", "width", None), ("img", "height", 2.5),
    ("img", "file_name", ""), ("img", "file_name", None), ("img", "width", True)]


@pytest.mark.parametrize("seed", range(40))
def test_index_refuses_what_the_per_image_pass_refuses_naming_a_bad_record(tmp_path, index_cache, seed):
    rng = np.random.default_rng(seed)
    content = generated_json(rng, num_images=12, evaluable=True)
    names = []  # how a message may name each damaged record
    for k in rng.choice(len(FAULTS), int(rng.integers(1, 4)), replace=False).tolist():
        where, key, value = FAULTS[k]
        section = "annotations" if where == "ann" else "images"
        j = int(rng.integers(len(content[section])))
        item = content[section][j]
        if value is None:
            item.pop(key, None)
        elif value == "dup":
            item["id"] = content["annotations"][0]["id"]
        else:
            item[key] = value
        names += [f"#{j} of '{section}'", f"annotation id {item.get('id')!r} is used"]
    write_json(tmp_path, content)
    for train in (True, False):
        message = assert_same_as_reference(str(tmp_path), "s", train)
        if isinstance(message, str):
            assert any(name in message for name in names), (message, names)


def test_edited_json_is_never_served_stale(tmp_path, index_cache):
    path = write_json(tmp_path, {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
                                 "annotations": [ann(1, 1, [2, 3, 10, 8])], "categories": [{"id": 1, "name": "a"}]})
    assert dataset(str(tmp_path), True).boxes[0].tolist() == [[2, 3, 11, 10]]
    stat = os.stat(path)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:  # same size, same mtime: only the bytes tell
        f.write(text.replace("[2, 3, 10, 8]", "[4, 3, 10, 8]"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    assert dataset(str(tmp_path), True).boxes[0].tolist() == [[4, 3, 13, 10]]
    assert len(list(index_cache.glob("*.idx"))) == 1  # one index per json: the edited one replaced it


CONSTRUCT = """
import os, signal, sys
import config, data
root, how = sys.argv[1], sys.argv[2]
if how == "killed-before-rename":  # the index is written in full to its temporary file, then the process dies
    os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
if how == "killed-mid-write":
    os.fsync = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
print("start", flush=True)
ds = data.CocoDetection(root, "s", config.get("demo", [f"data_root={root}"], verbose=False), True)
print("boxes", sum(len(b) for b in ds.boxes), sum(float(b.sum()) for b in ds.boxes), flush=True)
"""


def construct_in(root, how="plain"):
    import subprocess
    import sys
    return subprocess.Popen([sys.executable, "-c", CONSTRUCT, str(root), how], cwd=os.path.dirname(data.__file__),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_one_process_builds_while_the_others_wait_for_its_index(tmp_path, index_cache):
    import fcntl
    import time
    write_json(tmp_path, generated_json(np.random.default_rng(1), 2000), files=False)
    dataset(str(tmp_path), True)
    content = generated_json(np.random.default_rng(2), 2000)  # edited: the index is stale for every process
    write_json(tmp_path, content, files=False)
    lock_path = index_cache / "lock"
    with open(lock_path) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until all four are started, so they contend for it together
        procs = [construct_in(tmp_path) for _ in range(4)]
        assert all(p.stdout.readline().strip() == "start" for p in procs)
        time.sleep(1.0)
        assert all(p.poll() is None for p in procs)  # waiting on the lock, none has parsed
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(out.count("data: indexed") for out in outs) == 1, outs  # one parse for the machine
    ref = dataset(str(tmp_path), True)
    expected = f"boxes {sum(len(b) for b in ref.boxes)} {sum(float(b.sum()) for b in ref.boxes)}"
    assert all(out.strip().splitlines()[-1] == expected for out in outs), (expected, outs)
    assert len(list(index_cache.glob("*.idx"))) == 1 and not list(index_cache.glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed-before-rename", "killed-mid-write"])
def test_killed_writer_leaves_no_partial_index(tmp_path, index_cache, how):
    write_json(tmp_path, generated_json(np.random.default_rng(3), 500), files=False)
    proc = construct_in(tmp_path, how)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == -9, out
    assert list(index_cache.glob("*.tmp")) and not list(index_cache.glob("*.idx"))  # it died writing
    ds = assert_same_as_reference(str(tmp_path), "s", True)  # built again, in full
    assert len(ds) and not list(index_cache.glob("*.tmp")) and len(list(index_cache.glob("*.idx"))) == 1


def test_damaged_index_is_rebuilt(tmp_path, index_cache, capsys):
    write_json(tmp_path, generated_json(np.random.default_rng(4), 50), files=False)
    dataset(str(tmp_path), True)
    (index,) = index_cache.glob("*.idx")
    whole = index.read_bytes()
    for damaged in (whole[: len(whole) // 2], whole[:10], b"", b"x" * len(whole)):
        index.write_bytes(damaged)  # as a copy that stopped half-way, or another program's file
        capsys.readouterr()
        assert_same_as_reference(str(tmp_path), "s", True)
        assert "data: indexed" in capsys.readouterr().out and index.read_bytes() == whole


def test_unwritable_cache_folders_fall_back(tmp_path, monkeypatch):
    import tempfile
    write_json(tmp_path / "d", generated_json(np.random.default_rng(5), 50), files=False)
    before = sorted(p for p in (tmp_path / "d").rglob("*"))
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("FRCNN_DATA_CACHE", str(tmp_path / "file" / "cache"))  # cannot be created
    assert_same_as_reference(str(tmp_path / "d"), "s", True)  # built in memory, each process for itself
    monkeypatch.delenv("FRCNN_DATA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "xdg"))  # the user's cache folder is unwritable
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert_same_as_reference(str(tmp_path / "d"), "s", True)
    assert len(list((tmp_path / "tmp").glob("frcnn-*/*.idx"))) == 1  # the temp folder took it
    assert sorted(p for p in (tmp_path / "d").rglob("*")) == before  # nothing written beside the data set


def test_index_of_a_deleted_json_is_pruned(tmp_path, index_cache):
    for name in ("a", "b"):
        write_json(tmp_path / name, generated_json(np.random.default_rng(6), 20), files=False)
        dataset(str(tmp_path / name), True)
    assert len(list(index_cache.glob("*.idx"))) == 2
    import shutil
    shutil.rmtree(tmp_path / "a")
    write_json(tmp_path / "c", generated_json(np.random.default_rng(7), 20), files=False)
    dataset(str(tmp_path / "c"), True)  # a build looks over the folder: a's index goes, b's stays
    assert sorted(p.name for p in index_cache.iterdir() if not p.name.endswith(".idx")) == ["lock"]


def python_objects(ds):
    """How many Python objects the dataset's per-image data holds: containers followed, the config and the classes
    not (they do not grow with the images), nor .ids (a list of ints, which workers never read and the cyclic
    collector never writes to)."""
    import gc
    seen, todo = set(), [v for k, v in vars(ds).items() if k not in ("cfg", "ids", "names", "cat_id_to_label",
                                                                      "label_to_cat_id", "cat_ids")]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        if isinstance(obj, (list, tuple, dict, set, np.ndarray)) or type(obj).__module__ == "data":
            todo += gc.get_referents(obj)
    return len(seen)


def test_per_image_data_holds_no_python_object_per_image(tmp_path, index_cache):
    # loader workers are forked: every per-image Python object is a reference count that a worker's read writes,
    # copying its memory page into the worker; flat arrays are read without writing
    counts = []
    for n in (40, 400):
        write_json(tmp_path / str(n), generated_json(np.random.default_rng(8), n, evaluable=True))
        counts.append([python_objects(dataset(str(tmp_path / str(n)), train)) for train in (True, False)])
    assert counts[0] == counts[1], counts


def test_index_zeroed_after_its_header_is_caught_and_rebuilt(tmp_path, index_cache, capsys):
    # as a bad disk or an interrupted copy leaves it: same size, same mtime, a valid header, zeros after it
    write_json(tmp_path, generated_json(np.random.default_rng(9), 60), files=False)
    ref = dataset(str(tmp_path), True)
    ref_boxes = [b.copy() for b in ref.boxes]  # the writes below change the mapped file in place
    (index,) = index_cache.glob("*.idx")
    whole, stat = index.read_bytes(), index.stat()
    size = int.from_bytes(whole[8:16], "little")
    last = len(whole.rstrip(b"\0")) - 1  # the last byte that is not already 0
    for start in (coco_index._HEAD + size, last):  # everything after the header; the last data byte only
        index.write_bytes(whole[:start] + bytes(len(whole) - start))
        os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        capsys.readouterr()
        ds = dataset(str(tmp_path), True)
        out = capsys.readouterr().out
        assert "is damaged (its checksum does not hold); rebuilding it" in out and "data: indexed" in out, out
        assert index.read_bytes() == whole and ds.ids == ref.ids
        assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(ds.boxes, ref_boxes))


def test_json_that_is_not_utf8_is_named(tmp_path, index_cache):
    path = write_json(tmp_path, {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
                                 "annotations": [ann(1, 1, [2, 3, 10, 8])],
                                 "categories": [{"id": 1, "name": "caf\u00e9"}]})
    with open(path, "rb") as f:
        text = f.read().decode("ascii")  # json.dump wrote the name as \\u00e9
    with open(path, "wb") as f:
        f.write(text.replace("caf\\u00e9", "caf\u00e9").encode("latin-1"))  # as an editor saving in Latin-1 does
    with pytest.raises(coco_index.DataError, match=rf"{re.escape(path)} is not UTF-8 text \(byte \d+: b'\\xe9"):
        dataset(str(tmp_path), True)
    with open(path, "wb") as f:  # with a byte-order mark, as Windows tools write UTF-8: read
        f.write(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert dataset(str(tmp_path), True).names == ["__background__", "caf\u00e9"]


def test_repeated_image_id_is_named(tmp_path, index_cache):
    write_json(tmp_path, {"images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 30},
                                     {"id": 7, "file_name": "b.png", "width": 40, "height": 30}],
                          "annotations": [ann(1, 7, [2, 3, 10, 8])], "categories": [{"id": 1, "name": "a"}]})
    for train in (True, False):
        with pytest.raises(coco_index.DataError, match=r"image id 7 is listed 2 times in 'images' \(a\.png, b\.png\)"):
            dataset(str(tmp_path), train)


def test_string_category_ids_map_to_labels_and_back(tmp_path, index_cache):
    cats = [{"id": "cat-b", "name": "b"}, {"id": "cat-a", "name": "a"}, {"id": "3", "name": "c"}]
    write_json(tmp_path, {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
                          "annotations": [ann(1, 1, [2, 3, 10, 8], cat="cat-a"), ann(2, 1, [5, 5, 9, 9], cat="3")],
                          "categories": cats})
    ds = dataset(str(tmp_path), True)
    assert ds.cat_ids == ["cat-b", "cat-a", "3"] and ds.labels[0].tolist() == [2, 3]  # label = 1 + position
    assert ds.label_to_cat_id == {1: "cat-b", 2: "cat-a", 3: "3"} and not ds.plain_ids  # hotcoco cannot read them
    write_json(tmp_path, {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
                          "annotations": [ann(1, 1, [2, 3, 10, 8], cat="cat-c")], "categories": cats})
    with pytest.raises(coco_index.DataError, match=r"annotation 1 \(#0 of 'annotations', image 1\) has category_id "
                                                   r"'cat-c', which 'categories' does not list"):
        dataset(str(tmp_path), True)
    for bad in ([{"id": 1.5, "name": "a"}], [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], [{"id": 1}],
                [{"id": 1, "name": "a"}, {"id": "2", "name": "b"}]):
        write_json(tmp_path, {"images": [], "annotations": [], "categories": bad})
        with pytest.raises(coco_index.DataError, match=r"categor"):
            dataset(str(tmp_path), False)


# ---- the streaming build: runs of records, typed or read by json, in bounded memory

def strict_json(content):
    """content with its NaN and infinite bbox values (not json: Python's json writes them) made finite numbers that
    float32 cannot hold, which training drops the same way, so the typed decoder reads the file."""
    for a in content["annotations"]:
        if isinstance(a.get("bbox"), list):
            a["bbox"] = [v if not isinstance(v, float) or math.isfinite(v) else 1e39 for v in a["bbox"]]
    return content


@pytest.fixture
def small_runs(monkeypatch):
    """Runs of a few records (many runs per section), and the list of which images' and annotations' runs were
    decoded typed."""
    typed = []
    chunks = coco_index._chunks

    def counted(buf, at, decoder, end):
        for k, records, was_typed in chunks(buf, at, decoder, end):
            typed.extend([was_typed] if decoder not in (None, coco_index._SKIP) else [])  # categories: json's

            yield k, records, was_typed
    monkeypatch.setattr(coco_index, "CHUNK_BYTES", 700)
    monkeypatch.setattr(coco_index, "_chunks", counted)
    return typed


@pytest.mark.parametrize("seed", range(12))
def test_streaming_runs_give_the_per_image_construction_and_its_errors(tmp_path, index_cache, small_runs, seed):
    rng = np.random.default_rng(seed)
    content = strict_json(generated_json(rng, num_images=40, evaluable=seed % 2 == 0))
    names = []
    for k in rng.choice(len(FAULTS), int(rng.integers(0, 3)), replace=False).tolist():
        where, key, value = FAULTS[k]
        if isinstance(value, float) and not math.isfinite(value) or (where, value) == ("ann", "dup"):
            continue
        section = "annotations" if where == "ann" else "images"
        j = int(rng.integers(len(content[section])))
        if value is None:
            content[section][j].pop(key, None)
        else:
            content[section][j][key] = value
        names += [f"#{j} of '{section}'", f"annotation id {content[section][j].get('id')!r} is used"]
    write_json(tmp_path, content)
    for train in (True, False):
        message = assert_same_as_reference(str(tmp_path), "s", train)
        if isinstance(message, str) and names and "is used" not in message:
            assert any(name in message for name in names), (message, names)
    assert sum(small_runs) > 10  # most runs decoded typed
    assert all(small_runs) or names  # json reads only the runs holding a value the typed decoder refuses


def test_index_arrays_are_the_same_for_any_run_size(tmp_path, index_cache, monkeypatch):
    content = strict_json(generated_json(np.random.default_rng(3), num_images=200))
    content["annotations"][5]["segmentation"] = [[0.5] * 12, "}, {\"id\": 1}, {"]  # a cut candidate in a string
    content["annotations"][9]["extra"] = [{"a": 1}, {"b": [2]}]  # one in a nested value
    path = write_json(tmp_path, content, files=False)
    ref = coco_index._build_index(path, True)
    for size in (1, 300, 5000, 1 << 30):
        monkeypatch.setattr(coco_index, "CHUNK_BYTES", size)
        meta, arrays = coco_index._build_index(path, True)
        assert meta == ref[0] and arrays.keys() == ref[1].keys()
        assert all(a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True) for a, b in
                   zip(arrays.values(), ref[1].values()))


BOUNDED = r"""
import json, os, resource, sys
sys.path.insert(0, os.getcwd())
import coco_index
path, how, headroom = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + headroom, size + headroom))
try:
    if how == "json.load":
        with open(path, "rb") as f:
            n = len(json.load(f)["annotations"])
    else:
        meta, arrays = coco_index._build_index(path, True)
        n = meta["annotations"]
except MemoryError:
    print("MemoryError")
else:
    print(n, len(arrays["labels"]) if how != "json.load" else "")
"""


@pytest.mark.slow
def test_streaming_build_fits_where_json_load_does_not(tmp_path):
    # A 60 MB json: json.load's objects need several times that, the streaming build its memory map of the file
    # and its arrays. Address space (RLIMIT_AS) counts the map, so the headroom covers the file and ~60 MB more.
    n = 400_000
    rng = np.random.default_rng(0)
    wh = rng.integers(50, 600, (1000, 2))
    path = tmp_path / "big.json"
    with open(path, "w") as f:
        f.write('{"images": [' + ", ".join(f'{{"id": {i}, "file_name": "{i}.jpg", "width": {w}, "height": {h}}}'
                                            for i, (w, h) in enumerate(wh.tolist())) + '], "annotations": [')
        xywh = rng.uniform(0, 40, (n, 4)).round(2).tolist()
        f.write(", ".join(f'{{"segmentation": [[1.5, 2.5, 3.5]], "area": 9.0, "iscrowd": 0, "image_id": {j % 1000}, '
                          f'"bbox": {b}, "category_id": 1, "id": {j}}}' for j, b in enumerate(xywh)))
        f.write('], "categories": [{"id": 1, "name": "a"}]}')
    headroom = os.path.getsize(path) + 64 * 2 ** 20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = {how: subprocess.run([sys.executable, "-c", BOUNDED, str(path), how, str(headroom)], capture_output=True,
                               text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
           for how in ("json.load", "index")}
    assert out["json.load"].stdout.strip() == "MemoryError", out["json.load"]
    kept = int((np.maximum(np.array(xywh)[:, 2:] - 1, 0) > 0).all(1).sum())  # legacy boxes of positive area
    assert out["index"].stdout.split() == [str(n), str(kept)], out["index"]
