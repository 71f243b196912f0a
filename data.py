"""Data: COCO-format datasets and image files, upstream's transforms (maskrcnn_benchmark/data/transforms/,
data/datasets/coco.py), batching, samplers.

Loaders (both yield (images (N,3,Hp,Wp), image_sizes [(h, w)], targets [dict], dataset indices [int])):
    loader = make_train_loader(cfg, rank, world_size, start_iter=0, sampler_state=None)  # endless; per-rank
    loader.state(it)            # the sampler position after `it` iterations: store it in the checkpoint
    loader = make_test_loader(cfg, split=None, rank=0, world_size=1)  # every image once, contiguous shards
    loader = make_test_loader(cfg, dataset=ImageFiles(paths, cfg))   # the same test transform for any files
    loader.dataset              # .sizes (w, h) of each original image, .path(i); CocoDetection also .ids,
                                # .cat_ids, .names, .label_to_cat_id
A target is {"boxes": (G,4) float32 legacy xyxy in resized pixels, "labels": (G,) int64 in 1..K} ({} for image
files); training adds "skipped": the unreadable files passed over to fill this slot (count them in the log).
Resuming replays the batch stream from (seed, epoch), so a resumed run sees exactly the images and augmentations
an uninterrupted one would have seen. A split under cfg.demo_data is generated first (demo.py) if absent.
"""
import collections
import collections.abc
import contextlib
import fcntl
import functools
import glob
import hashlib
import itertools
import json
import math
import mmap
import os
import random
import socket
import tempfile
import time

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import config
import demo


class DataError(config.UserError, ValueError):
    """A data set the user must fix (a json field, an annotation, a category): the message names the file, the
    image id, the annotation id and the field."""


class MissingData(config.UserError, FileNotFoundError):
    """An annotation file or image the data set needs is not there; the message names it."""


class UnreadableImage(config.UserError, OSError):
    """An image file that is missing, empty or cannot be decoded; the message names the file."""


_WARNED = set()


def _warn_once(key, message):
    """One warning per key per process (each loader worker is a process)."""
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"data: warning: {message}", flush=True)


def load_image(path):
    """PIL RGB image on the file's raw pixel grid. EXIF orientation is deliberately NOT applied: upstream
    doesn't, and a COCO json's width, height and boxes describe the stored pixel grid. Any failure (missing,
    0 bytes, not an image, truncated) raises UnreadableImage naming the file. PIL.ImageFile.LOAD_TRUNCATED_IMAGES
    is left False (PIL's default) on purpose: a truncated file is an error, never an image padded with grey."""
    try:
        if os.path.getsize(path) == 0:
            raise ValueError("the file is empty (0 bytes)")
        with Image.open(path) as img:
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                # 16-bit / 32-bit grayscale: convert("RGB") would clip every value above 255 to white; rescale.
                arr = np.asarray(img).astype(np.float64)
                peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
                arr = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
                return Image.fromarray(arr).convert("RGB")  # 2-D uint8 is mode "L" (Pillow 13 drops the mode arg)
            return img.convert("RGB")  # grayscale, palette, CMYK, RGBA (alpha dropped, as upstream) -> RGB
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, struct.error...
        raise UnreadableImage(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def resize_size(w, h, min_size, max_size):
    """(new_w, new_h) by upstream's get_size: short side to min_size unless the long side would pass
    max_size. Python round (half to even) then int() truncation, both upstream quirks: the long side can
    exceed max_size by a pixel or two (1000x200 -> 1335x267)."""
    size = min_size
    lo, hi = float(min(w, h)), float(max(w, h))
    if max_size is not None and hi / lo * size > max_size:
        size = max(1, int(round(max_size * lo / hi)))  # at least 1 px: a 2000x2 strip would give 0 (PIL raises)
    if (w <= h and w == size) or (h <= w and h == size):
        return w, h
    if w < h:
        return size, int(size * h / w)
    return int(size * w / h), size


def to_model_tensor(img, pixel_mean):
    """(3, H, W) float32: BGR on the 0..255 scale minus the BGR mean. Same float32 operation order as
    upstream (ToTensor's /255, then [2,1,0] and *255, then - mean), so values match it bit for bit."""
    bgr = np.asarray(img, dtype=np.uint8)[:, :, ::-1].transpose(2, 0, 1)  # (3, H, W) BGR view
    # Channels reordered before the arithmetic (every op is per element, so the values are the same) and the
    # float32 IEEE ops done in numpy: single-threaded, where torch's intra-op threads stall on a busy machine.
    x = bgr.astype(np.float32, order="C") / np.float32(255) * np.float32(255)
    return torch.from_numpy(x - np.asarray(pixel_mean, dtype=np.float32)[:, None, None])


def pad_batch(tensors, size_divisibility=32):
    """Zero-filled (N, 3, Hp, Wp) batch, each image top-left, Hp and Wp rounded up to size_divisibility
    (also for a single image), and the unpadded [(h, w)]. Zero is after mean subtraction: the mean colour."""
    assert len(tensors) > 0, "pad_batch needs at least one image"
    hs, ws = [t.shape[1] for t in tensors], [t.shape[2] for t in tensors]
    hp, wp = max(hs), max(ws)
    if size_divisibility > 0:
        hp = -(-hp // size_divisibility) * size_divisibility
        wp = -(-wp // size_divisibility) * size_divisibility
    shape = (len(tensors), tensors[0].shape[0], hp, wp)
    if all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in tensors):
        batch = np.zeros(shape, dtype=np.float32)  # numpy: torch's threaded fill and copy stall on a busy machine
        for b, t in zip(batch, tensors):
            b[:, : t.shape[1], : t.shape[2]] = t.numpy()
        return torch.from_numpy(batch), list(zip(hs, ws))
    batch = tensors[0].new_zeros(shape)
    for i, t in enumerate(tensors):
        batch[i, :, : t.shape[1], : t.shape[2]] = t
    return batch, list(zip(hs, ws))


def legacy_boxes(xywh, width, height):
    """COCO [x, y, w, h] rows -> (G, 4) legacy xyxy (x2 = x + max(w - 1, 0)) clipped to [0, W-1] x [0, H-1],
    and the keep mask: finite with x2 > x1 and y2 > y1, which drops every box of w <= 1 or h <= 1 (upstream).
    width and height are numbers, or (G,) arrays giving each row its image's size."""
    b = np.asarray(xywh, dtype=np.float32).reshape(-1, 4)  # float32 arithmetic, as upstream's BoxList
    x1, y1 = b[:, 0], b[:, 1]
    x2, y2 = x1 + np.maximum(b[:, 2] - 1, 0), y1 + np.maximum(b[:, 3] - 1, 0)
    hi = np.stack(np.broadcast_arrays(width - 1, height - 1, width - 1, height - 1), -1).astype(np.float32)
    out = np.clip(np.stack([x1, y1, x2, y2], 1), 0, hi)
    keep = np.isfinite(b).all(1) & (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out, keep


# ---- the COCO json, parsed once per machine
# Every rank parsing COCO train's json at once costs 1.5-3.5 GB each (the 448 MB file is mostly polygons), and
# per-image Python objects get copied into every loader worker as their reference counts are written. So the first
# process of a machine checks the json and writes flat arrays to an index file; the others wait on its lock and
# memory-map that file. Evaluation's metric still reads the json with pycocotools (evaluate.py).
INDEX_VERSION = 1  # bump when the layout or the checks change: older index files are then rebuilt
_MAGIC = b"FRCNNIDX"


def cache_dirs():
    """Folders an index file may go to, in order: $FRCNN_DATA_CACHE alone when set, else the user's cache folder
    ($XDG_CACHE_HOME or ~/.cache) then the temp folder. Never the data set's folder, often read-only or shared."""
    if os.environ.get("FRCNN_DATA_CACHE"):
        return [os.environ["FRCNN_DATA_CACHE"]]
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(user, "frcnn", "coco_index"), os.path.join(tempfile.gettempdir(), f"frcnn-{os.getuid()}")]


def coco_index(ann, train):
    """(meta, arrays) of the json `ann` (see _build_index). The index file is named after the json's real path and
    used only when it records the SHA-1 of the json's current bytes, so an edited json is never served stale. It
    is written to a temporary file and renamed, so a process killed mid-write leaves no partial index; the folder's
    exclusive lock (released by the kernel if its holder dies) makes the machine's other processes wait for the
    first one's build and map its file instead of parsing too. Without a writable folder every process builds."""
    sha1 = hashlib.sha1()
    with open(ann, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha1.update(block)
    name = hashlib.sha1(os.path.realpath(ann).encode()).hexdigest()[:20] + ".idx"
    for folder in cache_dirs():
        path = os.path.join(folder, name)
        index = _read_index(path, sha1.hexdigest())
        if index:
            return index
        try:
            os.makedirs(folder, exist_ok=True)
            lock = open(os.path.join(folder, "lock"), "a")  # one for the folder: no lock file per json to clean up
        except OSError:
            continue  # read-only or absent: the next folder
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = _read_index(path, sha1.hexdigest())  # built by the process we waited for
            if index is None:
                t0 = time.perf_counter()
                index = _build_index(ann, train)
                written = _write_index(path, *index)
                print(f"data: indexed {ann} in {time.perf_counter() - t0:.1f} s ({len(index[1]['ids'])} images, "
                      f"{len(index[1]['labels'])} boxes)" + (f"; cached for this machine's processes in {path}"
                                                             if written else ""), flush=True)
                index = written and _read_index(path, index[0]["digest"]) or index
        return index
    return _build_index(ann, train)


def _read_header(f):
    """(meta, offset of the arrays) of an open index file; ValueError if it is not one."""
    head = f.read(16)
    size = int.from_bytes(head[8:], "little")
    if head[:8] != _MAGIC or size > os.fstat(f.fileno()).st_size:
        raise ValueError(f"{f.name} is not an index file")
    return json.loads(f.read(size)), -(-(16 + size) // 64) * 64


def _read_index(path, digest):
    """(meta, read-only arrays mapped from the file) when path is a complete index of the json whose SHA-1 is
    digest, else None (absent, another json's or version's, truncated, damaged)."""
    try:
        with open(path, "rb") as f:
            meta, start = _read_header(f)
            if (meta["version"], meta["digest"]) != (INDEX_VERSION, digest) or \
                    os.fstat(f.fileno()).st_size != start + meta["data_bytes"]:
                return None
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # pages shared by every process and worker
    except (OSError, ValueError, KeyError, TypeError):
        return None
    arrays = {k: np.frombuffer(buf, np.dtype(dtype), math.prod(shape), start + offset).reshape(shape)
              for k, (dtype, shape, offset) in meta.pop("arrays").items()}
    return meta, arrays


def _write_index(path, meta, arrays):
    """The index file: magic, header length, json header, then each array at a 64-byte aligned offset, written to
    a temporary file that is renamed into place after fsync. False, with a warning, if that fails (a full disk)."""
    for name in glob.glob(glob.escape(path) + ".*.tmp"):  # left by a process killed while writing
        with contextlib.suppress(OSError):
            os.remove(name)
    for name in glob.glob(os.path.join(glob.escape(os.path.dirname(path)), "*.idx")):
        gone = False
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError), open(name, "rb") as f:
            gone = not os.path.exists(_read_header(f)[0]["source"])
        if gone:  # its json was deleted (a test's temp folder, a moved data set): the folder must not grow for ever
            with contextlib.suppress(OSError):
                os.remove(name)
    table, size = {}, 0
    for k, a in arrays.items():
        table[k], size = [a.dtype.str, list(a.shape), size], size + -(-a.nbytes // 64) * 64
    header = json.dumps({**meta, "arrays": table, "data_bytes": size}).encode()
    start = -(-(16 + len(header)) // 64) * 64
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(_MAGIC + len(header).to_bytes(8, "little") + header)
            for k, a in arrays.items():
                f.seek(start + table[k][2])
                f.write(np.ascontiguousarray(a).tobytes())
            f.truncate(start + size)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        print(f"data: warning: cannot write the index {path} ({e}); each process parses the json itself", flush=True)
        return False


def _parse_json(ann):
    """(the json's object, SHA-1 of its bytes) without any 'segmentation', dropped as each object is parsed: COCO
    train's polygons never exist at once (1.0 GB peak instead of pycocotools' 2.6 GB)."""
    with open(ann, "rb") as f:
        raw = f.read()
    digest = hashlib.sha1(raw).hexdigest()
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")  # as json.loads(bytes) does
    del raw
    try:
        return json.loads(text, object_hook=_drop_segmentation), digest
    except ValueError as e:  # pycocotools' json.load would fail alike
        raise _index_error(ann, e) from None


def _drop_segmentation(obj):
    obj.pop("segmentation", None)
    return obj


def _index_error(ann, e):
    return DataError(f"{ann}: pycocotools cannot index it ({type(e).__name__}: {e}): every image needs 'id', every "
                      f"annotation 'id' and 'image_id'")


def _pycocotools_error(d):
    """The exception pycocotools' COCO.createIndex (pycocotools/coco.py) raises first on the json d, replaying its
    loops in their order; None if it would index d. Evaluation's metric needs that index."""
    try:
        anns, imgs, cats = {}, {}, {}
        img_to_anns, cat_to_imgs = collections.defaultdict(list), collections.defaultdict(list)
        if "annotations" in d:
            for a in d["annotations"]:
                img_to_anns[a["image_id"]].append(a)
                anns[a["id"]] = a
        if "images" in d:
            for img in d["images"]:
                imgs[img["id"]] = img
        if "categories" in d:
            for c in d["categories"]:
                cats[c["id"]] = c
        if "annotations" in d and "categories" in d:
            for a in d["annotations"]:
                cat_to_imgs[a["category_id"]].append(a["image_id"])
    except Exception as e:  # noqa: BLE001 whatever it is, pycocotools would raise it
        return e
    return None


def _is_bbox(b):
    return (isinstance(b, (list, tuple)) and len(b) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b))


def _build_index(ann, train):
    """The json checked and flattened, as (meta, arrays). Images sorted by id (upstream), the last entry of a
    repeated id (pycocotools' imgs dict): "ids" (N,), "sizes" (N, 2) (w, h), file names as utf-8 in "name_buf" cut
    at "name_off" (N+1,), and the boxes training and evaluation use (non-crowd, legacy xyxy clipped to the image,
    positive area) in "boxes" (B, 4) float32 and "labels" (B,) int64, image i's at box_off[i]:box_off[i+1], each in
    the json's order (pycocotools' imgToAnns). Every check runs over all annotations at once; what they refuse is
    raised as the per-image pass would find it first: image i's width, height, file_name, then each of its
    annotations' bbox, category_id and, for evaluation, area. Evaluation-only errors (no 'area', a repeated
    annotation id) are kept in meta["eval_error"], so one index serves training and evaluation."""
    d, digest = _parse_json(ann)
    if not isinstance(d, dict):
        raise DataError(f"{ann}: holds a json {type(d).__name__}, not COCO's object of images and annotations")
    anns, images = d["annotations"] if "annotations" in d else [], d["images"] if "images" in d else []
    try:  # what pycocotools indexes by must be there and hashable
        ann_img, ann_ids = [a["image_id"] for a in anns], [a["id"] for a in anns]
        img_ids = [img["id"] for img in images]
        ann_cat = [a["category_id"] for a in anns] if "categories" in d else []
        uses = collections.Counter(ann_ids)
        set(ann_img), set(img_ids), set(ann_cat), {c["id"] for c in d.get("categories") or []}
    except (KeyError, TypeError, AttributeError) as e:
        raise _index_error(ann, _pycocotools_error(d) or e) from None
    if not isinstance(d.get("categories"), list) or not all(isinstance(c, dict) and "name" in c
                                                            for c in d["categories"]):
        raise DataError(f"{ann}: 'categories' must list every class as {{'id': ..., 'name': ...}}")
    cat_ids = [c["id"] for c in d["categories"]]  # pycocotools' getCatIds: the file's order; label = 1 + position
    cat_by_id = {c["id"]: c for c in d["categories"]}
    names = ["__background__"] + [cat_by_id[c]["name"] for c in cat_ids]
    cat_id_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
    odd = next((i for i in img_ids if type(i) is not int), None) if set(map(type, img_ids)) - {int} else None
    if odd is not None or (img_ids and not -2 ** 63 <= min(img_ids) <= max(img_ids) < 2 ** 63):
        raise DataError(f"{ann}: image id {odd if odd is not None else max(img_ids, key=abs)!r} is not a 64-bit "
                         f"integer, which COCO's image ids are")
    ids = np.array(img_ids, dtype=np.int64)
    ids, last = np.unique(ids[::-1], return_index=True)  # sorted; the last entry of a repeated id
    infos = [images[k] for k in (len(img_ids) - 1 - last).tolist()]
    n = len(infos)
    width, height = [img.get("width") for img in infos], [img.get("height") for img in infos]
    files = [img.get("file_name") for img in infos]
    bad_img = np.stack([np.fromiter((not (type(v) is int and v > 0) for v in vs), bool, n) for vs in (width, height)]
                       + [np.fromiter((not (type(f) is str and f) for f in files), bool, n)], 1).reshape(n, 3)
    k_img = int(np.flatnonzero(bad_img.any(1))[0]) if bad_img.any() else n  # the first image with a bad field
    # annotations of listed images, grouped by image in the file's order (pycocotools' imgToAnns); others unused.
    # Fields are read in the file's order, sequential in memory (in image order it is random access, 8x slower).
    rank_of = dict(zip(ids.tolist(), range(n)))
    rank = np.fromiter(map(rank_of.get, ann_img, itertools.repeat(-1)), np.int64, len(anns))
    order = np.argsort(rank, kind="stable")
    order = order[rank[order] >= 0]
    bbox = [a.get("bbox") for a in anns]
    if set(map(type, bbox)) <= {list} and set(map(len, bbox)) <= {4} and \
            set(map(type, itertools.chain.from_iterable(bbox))) <= {int, float}:  # the common case, in C loops
        xywh = np.fromiter(itertools.chain.from_iterable(bbox), np.float32, 4 * len(bbox)).reshape(-1, 4)
        bad_bbox = np.zeros(len(anns), bool)
    else:
        good = [_is_bbox(b) for b in bbox]
        xywh = np.array([b if ok else (0, 0, 0, 0) for b, ok in zip(bbox, good)], np.float32).reshape(-1, 4)
        bad_bbox = ~np.array(good, bool).reshape(-1)
    unknown = {c for c in set(ann_cat) if c not in cat_id_to_label}
    bad_cat = np.fromiter((c in unknown for c in ann_cat), bool, len(anns)) if unknown else np.zeros(len(anns), bool)
    labels = np.fromiter(map(cat_id_to_label.get, ann_cat, itertools.repeat(0)), np.int64, len(anns))
    has_area = np.fromiter(("area" in a for a in anns), bool, len(anns))
    has_crowd = np.fromiter(("iscrowd" in a for a in anns), bool, len(anns))
    crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, len(anns))
    rank, xywh, bad_bbox, bad_cat, labels, has_area, has_crowd, crowd = (
        x[order] for x in (rank, xywh, bad_bbox, bad_cat, labels, has_area, has_crowd, crowd))
    m = len(order)

    def where(j):
        return f": annotation {anns[order[j]].get('id')!r} of image {ids[rank[j]]}"

    def first_error(checks):  # [(bad mask, message of annotation j)] in the per-annotation order
        bad = np.zeros(m, bool)
        for mask, _ in checks:
            bad |= mask
        j = int(np.flatnonzero(bad)[0]) if bad.any() else m
        if k_img < n and (j == m or k_img <= rank[j]):  # an image's fields are checked before its annotations
            field, value = [("width", width), ("height", height), ("file_name", files)][bad_img[k_img].argmax()]
            if field != "file_name":
                return f": image {ids[k_img]} has {field} {value[k_img]!r}; a positive integer is needed"
            return f": image {ids[k_img]} has " + ("no 'file_name'" if not files[k_img] else
                                                  f"file_name {files[k_img]!r}; a string is needed")
        return next((message(j) for mask, message in checks if j < m and mask[j]), None)
    checks = [(bad_bbox, lambda j: f"{where(j)}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox[order[j]]!r}"),
              (bad_cat, lambda j: f"{where(j)} has category_id {ann_cat[order[j]]!r}, which is not in "
                                  f"'categories'")]
    no_area = (~has_area, lambda j: f"{where(j)} has no 'area', which COCOeval needs: add it (w * h of the box "
                                    f"will do)")  # COCOeval reads it for its small/medium/large ranges
    dup = next((i for i, k in uses.items() if k > 1), None)
    eval_error = first_error(checks + [no_area])
    if dup is not None:  # pycocotools' anns dict keeps the last: COCOeval would lose boxes
        images_of = sorted({a.get("image_id") for a in d["annotations"] if a.get("id") == dup})
        eval_error = (f": annotation id {dup!r} is used {uses[dup]} times (images {images_of}); evaluation needs "
                      f"unique annotation ids")
    train_error = first_error(checks)
    if train_error:
        raise DataError(ann + (train_error if train else eval_error))
    sizes = np.stack([np.array(width, np.int64), np.array(height, np.int64)], 1).reshape(n, 2)
    boxes, keep = legacy_boxes(xywh[~crowd], sizes[rank[~crowd], 0], sizes[rank[~crowd], 1])
    labels = labels[~crowd][keep]
    box_off = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rank[~crowd][keep], minlength=n), out=box_off[1:])
    encoded = [f.encode("utf-8", "surrogatepass") for f in files]
    name_off = np.zeros(n + 1, np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, n), out=name_off[1:])
    counts = [["without 'iscrowd' (taken as 0)", int((~has_crowd).sum())],
              ["without 'area' (not used in training)", int((~has_area).sum())],
              ["boxes dropped without positive area inside the image (degenerate, outside, NaN/inf)",
               int((~keep).sum())]]
    meta = {"version": INDEX_VERSION, "source": os.path.realpath(ann), "digest": digest, "cat_ids": cat_ids,
            "names": names, "annotations": len(d.get("annotations") or []), "counts": counts, "eval_error": eval_error,
            "repeated_ids": sum(k > 1 for k in uses.values()) if dup is not None else 0}
    return meta, {"ids": ids, "sizes": sizes, "name_off": name_off,
                  "name_buf": np.frombuffer(b"".join(encoded), np.uint8), "box_off": box_off,
                  "boxes": np.ascontiguousarray(boxes[keep]), "labels": labels}


def _copy(values):
    return np.array(values)


def _size(values):
    return tuple(values[0].tolist())


def _file_name(values):
    return values.tobytes().decode("utf-8", "surrogatepass")


class _Cut(collections.abc.Sequence):
    """Item i of a flat array cut at offsets: convert(values[start[i]:end[i]]). It holds no per-item Python object,
    so forked loader workers have no reference count to write and copy nothing of it."""

    def __init__(self, values, start, end, convert):
        self.values, self.start, self.end, self.convert = values, start, end, convert

    def __len__(self):
        return len(self.start)

    def __getitem__(self, i):
        return self.convert(self.values[self.start[i]:self.end[i]])


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format split, root/annotations/instances_{split}.json with images in root/{split}/. Classes come
    from the json's categories: label = 1 + position in getCatIds(), 0 is background. Boxes are clipped to the
    image; training drops crowd boxes, boxes without positive area (degenerate, outside, NaN/inf) and the images
    left with none, and replaces an unreadable image by the next one that loads (target["skipped"] lists the
    files passed over). Evaluation keeps every image and refuses, before any work, missing or empty files,
    duplicate annotation ids and annotations without 'area'. self.notes: what was dropped, printed by the loaders.
    The json is parsed once per machine (coco_index); .boxes[i], .labels[i], .sizes[i] (w, h) and .files[i] are
    read from flat arrays shared by all processes, .ids is a list.
    Item: dataset[i] (test transform) or dataset[(i, rng_key)] (training augmentation drawn from rng_key)
    -> (image (3, H, W) float32, target dict, i)."""

    def __init__(self, root, split, cfg, train, ann_file=None, image_dir=None):
        ann = ann_file or os.path.join(root, "annotations", f"instances_{split}.json")
        self.image_dir = image_dir or os.path.join(root, split)
        if cfg.demo_data and os.path.abspath(root) == os.path.abspath(cfg.demo_data) and not os.path.isfile(ann):
            demo.make_demo_dataset(root)  # each split's json is written last: absent means not done
        if not os.path.isfile(ann):
            raise MissingData(f"no annotation file {ann}: set data_root to a folder in COCO's layout "
                              f"(annotations/instances_{split}.json and {split}/), or give the files with "
                              f"{'train' if train else 'val'}_ann= and {'train' if train else 'val'}_images=")
        if not os.path.isdir(self.image_dir):
            raise MissingData(f"no image folder {self.image_dir} for {ann}: set data_root, or "
                              f"{'train' if train else 'val'}_images= to the folder holding its file_name paths")
        meta, a = coco_index(ann, train)
        if meta["eval_error"] and not train:
            raise DataError(ann + meta["eval_error"])
        self.root, self.split, self.cfg, self.train, self.ann_file = root, split, cfg, train, ann
        self.cat_ids, self.names = meta["cat_ids"], meta["names"]
        self.cat_id_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id = {i + 1: c for i, c in enumerate(self.cat_ids)}
        count = dict(meta["counts"])
        rows = np.arange(len(a["ids"]))
        if train:  # upstream keeps images whose boxes are all crowd or degenerate, then crashes on them
            rows = np.flatnonzero(np.diff(a["box_off"]) > 0)
            count["images dropped without a usable non-crowd box"] = len(a["ids"]) - len(rows)
        count["annotation ids used more than once (all kept)"] = meta["repeated_ids"]
        self.notes = [f"data: {split}: {n} {what}" for what, n in count.items() if n]
        if train and not len(rows):
            raise DataError(f"{ann}: no image has a usable box ({meta['annotations']} annotations): nothing to "
                             f"train on")
        self.ids = a["ids"][rows].tolist()
        self.boxes = _Cut(a["boxes"], a["box_off"][rows], a["box_off"][rows + 1], _copy)  # (G, 4) writable copies
        self.labels = _Cut(a["labels"], a["box_off"][rows], a["box_off"][rows + 1], _copy)
        self.sizes = _Cut(a["sizes"], rows, rows + 1, _size)  # (w, h)
        self.files = _Cut(a["name_buf"], a["name_off"][rows], a["name_off"][rows + 1], _file_name)
        if not train:  # skipping an image would change the metric: refuse now, before any work
            bad = [p for p in map(self.path, range(len(self))) if not os.path.isfile(p) or os.path.getsize(p) == 0]
            if bad:
                raise MissingData(f"evaluation needs every image of {split}; {len(bad)} missing or empty: "
                                        + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
        self.bad = set()  # training: indices found unreadable in this process
        sizes = a["sizes"][rows]
        self.aspect_group = (sizes[:, 1] >= sizes[:, 0]).astype(np.int64)  # upstream: h/w < 1 -> 0

    def __len__(self):
        return len(self.ids)

    def path(self, index):
        return os.path.join(self.image_dir, self.files[index])

    def __getitem__(self, key):
        index, key = (int(key), None) if isinstance(key, (int, np.integer)) else key
        if not self.train:
            return self._load(index, None)
        skipped = []  # training: a bad image is replaced by the next index that loads, so the batch stays full
        for k in range(len(self)):
            i = (index + k) % len(self)
            item = None if i in self.bad else self._load(i, None if key is None else random.Random(key))
            if item is not None:
                item[1]["skipped"] = skipped
                return item
            self.bad.add(i)
            skipped.append(self.path(i))
        raise UnreadableImage(f"none of the {len(self)} training images of {self.ann_file} under {self.image_dir} "
                              f"loads")

    def _load(self, index, rng):
        """The item, or None in training when the file is unreadable or keeps no box (warned once per file)."""
        path = self.path(index)
        try:
            img = load_image(path)
        except UnreadableImage as e:
            if not self.train:
                raise
            _warn_once(path, f"{e}; skipped in training, replaced by the next image that loads")
            return None
        w, h = img.size
        boxes = self.boxes[index]
        labels = self.labels[index]
        if (w, h) != self.sizes[index]:  # the file disagrees with the json: clip to the file, as upstream
            _warn_once(("size", path), f"{path} is {w}x{h}, its json entry says {self.sizes[index][0]}x"
                                       f"{self.sizes[index][1]}: boxes clipped to the file")
            boxes = np.minimum(boxes, np.array([w - 1, h - 1, w - 1, h - 1], np.float32))
            ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, labels = boxes[ok], labels[ok]
            if self.train and not ok.any():
                _warn_once(path, f"{path} keeps no box inside its {w}x{h} pixels; skipped in training")
                return None
        img, boxes, keep = transform(img, boxes, self.cfg, rng)
        target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels[keep])}
        return to_model_tensor(img, self.cfg.pixel_mean), target, index


class ImageFiles(torch.utils.data.Dataset):
    """Image files for inference, preprocessed exactly as a COCO split at test time: item i -> (image (3, H, W),
    {}, i). .sizes holds each file's (w, h), read from its header here, so a file that is not an image is named
    before any inference."""

    def __init__(self, paths, cfg):
        self.paths, self.cfg, self.sizes = list(paths), cfg, []
        for path in self.paths:
            try:
                with Image.open(path) as img:
                    self.sizes.append(img.size)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... for a file it cannot read
                raise UnreadableImage(f"cannot read image {path}: {type(e).__name__}: {e}") from e
        self.aspect_group = np.array([int(h >= w) for w, h in self.sizes], dtype=np.int64)

    def __len__(self):
        return len(self.paths)

    def path(self, index):
        return self.paths[index]

    def __getitem__(self, index):
        img, _, _ = transform(load_image(self.paths[index]), np.zeros((0, 4), np.float32), self.cfg, None)
        return to_model_tensor(img, self.cfg.pixel_mean), {}, index


def random_crop(img, boxes, size, rng, tries=10):
    """Crop a size x size window (clamped to the image) so that at least one box keeps positive area: up to
    `tries` random windows, then one placed at a random box's top-left corner, which always keeps that box.
    Boxes are shifted, clipped to the window in legacy pixels and dropped when they lose all area."""
    w, h = img.size
    cw, ch = min(size, w), min(size, h)
    for t in range(tries + 1):
        if t < tries or not len(boxes):
            x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        else:
            b = boxes[rng.randrange(len(boxes))]
            x0, y0 = min(int(b[0]), w - cw), min(int(b[1]), h - ch)
        out = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
        out = np.clip(out, 0, [cw - 1, ch - 1, cw - 1, ch - 1]).astype(np.float32)
        keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
        if keep.any() or not len(boxes):
            break
    return img.crop((x0, y0, x0 + cw, y0 + ch)), out, keep


def transform(img, boxes, cfg, rng):
    """Upstream's pipeline: resize (short side drawn from min_size_train when training), flip p=flip_prob after
    the resize; plus the MLU recipe's options: crop (crop_size), fixed resize (fixed_size), colour jitter.
    rng None means test time: resize only. Returns (PIL image, boxes (G', 4), keep mask over the input boxes)."""
    keep = np.ones(len(boxes), dtype=bool)
    if rng is not None and cfg.crop_size > 0:
        img, boxes, keep = random_crop(img, boxes, cfg.crop_size, rng)
        boxes = boxes[keep]
    w, h = img.size
    if cfg.fixed_size > 0:
        nw = nh = cfg.fixed_size
    elif rng is None:
        nw, nh = resize_size(w, h, cfg.min_size_test, cfg.max_size_test)
    else:
        nw, nh = resize_size(w, h, rng.choice(cfg.min_size_train), cfg.max_size_train)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)  # PIL bilinear, antialiased when shrinking, as upstream
        boxes = boxes * np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)  # no +1 (upstream)
    if rng is not None and rng.random() < cfg.flip_prob:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        boxes = np.stack([nw - boxes[:, 2] - 1, boxes[:, 1], nw - boxes[:, 0] - 1, boxes[:, 3]], 1)  # legacy +1
    if rng is not None and (cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue):
        img = color_jitter(img, cfg, rng)
    return img, np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4), keep


def color_jitter(img, cfg, rng):
    """torchvision ColorJitter's factors (uniform in [1-s, 1+s], hue in [-h, h]) in a random order, drawn from
    the sample's own rng so a resumed run repeats them."""
    ops = [(TF.adjust_brightness, cfg.brightness, 1), (TF.adjust_contrast, cfg.contrast, 1),
           (TF.adjust_saturation, cfg.saturation, 1), (TF.adjust_hue, cfg.hue, 0)]
    rng.shuffle(ops)
    for fn, s, center in ops:
        if s > 0:
            img = fn(img, rng.uniform(max(0.0, center - s), center + s) if center else rng.uniform(-s, s))
    return img


def collate(items, size_divisibility=32):
    """Dataset items -> (images (N, 3, Hp, Wp) zero-padded, image_sizes [(h, w)], targets, indices)."""
    images, image_sizes = pad_batch([x for x, _, _ in items], size_divisibility)
    return images, image_sizes, [t for _, t, _ in items], [i for _, _, i in items]


def group_batches(groups, indices, batch_size, buffers):
    """Deal indices into their group's buffer; yield each buffer the moment it holds batch_size indices.
    Upstream's GroupedBatchSampler makes the same batches; what is left stays in `buffers`."""
    for i in indices:
        buffers.setdefault(groups[i], []).append(i)
        if len(buffers[groups[i]]) == batch_size:
            yield buffers.pop(groups[i])


class TrainBatchSampler(torch.utils.data.Sampler):
    """Endless per-rank batches of (index, rng_key). Epoch e shuffles all images with a generator seeded by
    (seed, e); images are dealt into their aspect group (or one group) and every ims_per_batch of a group make
    one global batch, whose rank-th slice this rank loads. A group's remainder carries into the next epoch, so
    every global batch is full and every rank gets the same count (no distributed hang). The stream depends
    only on (seed, data set size, ims_per_batch, groups), never on the world size or workers: resuming skips
    start_iter global batches of it."""

    def __init__(self, groups, ims_per_batch, rank=0, world_size=1, seed=0, start_iter=0):
        assert ims_per_batch % world_size == 0, (ims_per_batch, world_size)
        assert len(groups) > 0, "no training images"
        self.groups, self.batch, self.seed, self.start_iter = np.asarray(groups), ims_per_batch, seed, start_iter
        self.per_rank, self.rank = ims_per_batch // world_size, rank

    def global_batches(self):
        buffers, epoch = {}, 0
        while True:
            yield from group_batches(self.groups, np.random.default_rng([self.seed, epoch]).permutation(
                len(self.groups)).tolist(), self.batch, buffers)
            epoch += 1

    def __iter__(self):
        lo = self.rank * self.per_rank
        for it, batch in enumerate(self.global_batches()):
            if it >= self.start_iter:
                yield [(i, f"{self.seed}:{it}:{lo + j}") for j, i in enumerate(batch[lo: lo + self.per_rank])]

    def state(self, iteration):
        return {"iteration": iteration, "seed": self.seed, "ims_per_batch": self.batch, "num_images": len(self.groups)}


def make_train_loader(cfg, rank=0, world_size=1, start_iter=0, sampler_state=None):
    """Endless training loader for this rank; loader.state(it) is the sampler position to checkpoint."""
    dataset = CocoDetection(cfg.data_root, cfg.train_split, cfg, True, cfg.train_ann, cfg.train_images)
    for note in dataset.notes if rank == 0 else ():
        print(note)
    groups = dataset.aspect_group if cfg.aspect_grouping else np.zeros(len(dataset), dtype=np.int64)
    seed = cfg.seed
    if sampler_state:
        if (sampler_state["ims_per_batch"], sampler_state["num_images"]) != (cfg.ims_per_batch, len(dataset)):
            print(f"data: warning: the checkpoint's sampler ran {sampler_state['ims_per_batch']} images per batch "
                  f"over {sampler_state['num_images']} images, now {cfg.ims_per_batch} over {len(dataset)}: "
                  f"the resumed batches differ from an uninterrupted run's")
        seed, start_iter = sampler_state["seed"], sampler_state["iteration"]
    sampler = TrainBatchSampler(groups, cfg.ims_per_batch, rank, world_size, seed, start_iter)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, persistent_workers=cfg.num_workers > 0,
                                         **_loader_options(cfg))
    loader.state = sampler.state
    return loader


def make_test_loader(cfg, split=None, rank=0, world_size=1, dataset=None):
    """Every image of the split (or of `dataset`, e.g. ImageFiles) once; rank r takes the r-th contiguous block of
    indices (upstream's shards), test_ims_per_batch // world_size images per forward, grouped by aspect when
    aspect_grouping."""
    if dataset is None:
        split = split or cfg.val_split
        own = split == cfg.val_split  # val_ann / val_images belong to val_split
        dataset = CocoDetection(cfg.data_root, split, cfg, False, own and cfg.val_ann, own and cfg.val_images)
        for note in dataset.notes if rank == 0 else ():
            print(note)
    per = math.ceil(len(dataset) / world_size)
    indices = list(range(rank * per, min(len(dataset), (rank + 1) * per)))
    groups = dataset.aspect_group if cfg.aspect_grouping else np.zeros(len(dataset), dtype=np.int64)
    buffers = {}
    batches = list(group_batches(groups, indices, max(1, cfg.test_ims_per_batch // world_size), buffers))
    batches = sorted(batches + [b for b in buffers.values() if b], key=lambda b: b[0])  # leftovers: smaller
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, **_loader_options(cfg))


def _own_process_group(worker_id):
    """Each loader worker leaves the training process's group: SIGTERM or SIGINT sent to that group (Ctrl-C, a
    scheduler's preemption, torchrun's shutdown) reaches the main process only, which finishes the iteration and
    checkpoints (train.py) instead of dying of a killed worker mid-batch. A worker still exits with its parent."""
    os.setpgrp()


def _loader_options(cfg):
    """Worker processes, the padding collate, and pinned host memory for cuda, or mlu through torch_mlu."""
    options = dict(num_workers=cfg.num_workers, worker_init_fn=_own_process_group if cfg.num_workers else None,
                   collate_fn=functools.partial(collate, size_divisibility=cfg.size_divisibility))
    kind = cfg.device.split(":")[0]
    if kind == "cuda" and torch.cuda.is_available():
        options.update(pin_memory=True)
    elif kind == "mlu" and hasattr(torch, "mlu") and torch.mlu.is_available():
        # torch 2.1 pins for cuda unless told; newer torch pins for the current accelerator and deprecates the arg
        options.update(pin_memory=True, **({} if hasattr(torch, "accelerator") else {"pin_memory_device": "mlu"}))
    return options


def categories(dataset):
    """[{"id", "name"}] of a COCO dataset's classes in label order (label l is entry l - 1): stored with each
    checkpoint, so inference on image files writes the json's ids and draws its names."""
    return [{"id": c, "name": n} for c, n in zip(dataset.cat_ids, dataset.names[1:])]


def check_classes(dataset, cfg):
    """The model's num_classes must be the json's categories + 1 (background), or the box head is wrong in
    silence (too many), crashes in the loss (too few) or writes ids the json lacks."""
    n = len(dataset.cat_ids)
    if cfg.num_classes != n + 1:
        names = ", ".join(dataset.names[1:6]) + (" ..." if n > 5 else "")
        raise config.ConfigError(f"{dataset.ann_file} has {n} categories ({names}), so set num_classes={n + 1} "
                          f"(categories + background); the config has num_classes={cfg.num_classes}")
