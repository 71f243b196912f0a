"""The COCO json of a split, read once per machine into flat arrays (maskrcnn_benchmark/data/datasets/coco.py's
filters, checked over all annotations at once): data.CocoDetection's storage.

    meta, arrays = coco_index(ann_file, train)   # built by the first process, memory-mapped by the others
    boxes, keep = legacy_boxes(xywh, width, height)

Every rank parsing COCO train's json at once costs 1.5-3.5 GB each (the 448 MB file is mostly polygons), and
per-image Python objects get copied into every loader worker as their reference counts are written. So the first
process of a machine checks the json and writes flat arrays to an index file; the others wait on its lock and
memory-map that file. Evaluation's metric still reads the json with pycocotools (evaluate.py).
"""
import collections
import collections.abc
import contextlib
import fcntl
import glob
import hashlib
import itertools
import json
import math
import mmap
import os
import socket
import tempfile
import time

import numpy as np

import config


class DataError(config.UserError, ValueError):
    """A data set the user must fix (a json field, an annotation, a category): the message names the file, the
    image id, the annotation id and the field."""


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


def _categories(ann, d):
    """(category ids, names with "__background__" first): pycocotools' getCatIds, the file's order, so label =
    1 + position."""
    if not isinstance(d.get("categories"), list) or not all(isinstance(c, dict) and "name" in c
                                                            for c in d["categories"]):
        raise DataError(f"{ann}: 'categories' must list every class as {{'id': ..., 'name': ...}}")
    cat_ids = [c["id"] for c in d["categories"]]
    cat_by_id = {c["id"]: c for c in d["categories"]}
    return cat_ids, ["__background__"] + [cat_by_id[c]["name"] for c in cat_ids]


def _annotation_fields(anns, ann_cat, cat_id_to_label):
    """Every annotation's fields in the file's order: (bbox as written, xywh (A, 4) float32 with zeros where bbox is
    not 4 numbers, bad_bbox, bad_cat (a category_id not in 'categories'), labels (0 for those), has_area, has_crowd,
    crowd), all but bbox arrays of length A."""
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
    return bbox, xywh, bad_bbox, bad_cat, labels, has_area, has_crowd, crowd


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
    cat_ids, names = _categories(ann, d)
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
    bbox, *fields = _annotation_fields(anns, ann_cat, cat_id_to_label)
    rank, xywh, bad_bbox, bad_cat, labels, has_area, has_crowd, crowd = (x[order] for x in (rank, *fields))
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
    arrays, dropped = _flat_arrays(ids, width, height, files, rank, xywh, crowd, labels)
    counts = [["without 'iscrowd' (taken as 0)", int((~has_crowd).sum())],
              ["without 'area' (not used in training)", int((~has_area).sum())],
              ["boxes dropped without positive area inside the image (degenerate, outside, NaN/inf)", dropped]]
    meta = {"version": INDEX_VERSION, "source": os.path.realpath(ann), "digest": digest, "cat_ids": cat_ids,
            "names": names, "annotations": len(d.get("annotations") or []), "counts": counts, "eval_error": eval_error,
            "repeated_ids": sum(k > 1 for k in uses.values()) if dup is not None else 0}
    return meta, arrays


def _flat_arrays(ids, width, height, files, rank, xywh, crowd, labels):
    """The index's arrays from the checked fields (annotations in per-image order, rank = their image's position):
    non-crowd boxes in legacy xyxy clipped to the image, those without positive area dropped (their count is
    returned too), file names as one utf-8 buffer with offsets."""
    n = len(ids)
    sizes = np.stack([np.array(width, np.int64), np.array(height, np.int64)], 1).reshape(n, 2)
    boxes, keep = legacy_boxes(xywh[~crowd], sizes[rank[~crowd], 0], sizes[rank[~crowd], 1])
    box_off = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rank[~crowd][keep], minlength=n), out=box_off[1:])
    encoded = [f.encode("utf-8", "surrogatepass") for f in files]
    name_off = np.zeros(n + 1, np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, n), out=name_off[1:])
    arrays = {"ids": ids, "sizes": sizes, "name_off": name_off, "name_buf": np.frombuffer(b"".join(encoded), np.uint8),
              "box_off": box_off, "boxes": np.ascontiguousarray(boxes[keep]), "labels": labels[~crowd][keep]}
    return arrays, int((~keep).sum())

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


def per_image(arrays, rows):
    """(boxes, labels, sizes, files) of the images at rows: sequences over the flat arrays whose item i is image
    rows[i]'s (G, 4) float32 boxes and (G,) labels (writable copies), its (w, h) and its file name."""
    a, lo, hi = arrays, arrays["box_off"][rows], arrays["box_off"][rows + 1]
    return (_Cut(a["boxes"], lo, hi, _copy), _Cut(a["labels"], lo, hi, _copy), _Cut(a["sizes"], rows, rows + 1, _size),
            _Cut(a["name_buf"], a["name_off"][rows], a["name_off"][rows + 1], _file_name))
