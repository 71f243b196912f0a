"""The COCO json of a split, read once per machine into flat arrays (maskrcnn_benchmark/data/datasets/coco.py's
filters, checked over all annotations at once): data.CocoDetection's storage.

    meta, arrays = coco_index(ann_file, train)   # built by the first process, memory-mapped by the others
    boxes, keep = legacy_boxes(xywh, width, height)

Every rank parsing COCO train's json (448 MB, mostly polygons) would cost each of them gigabytes, and per-image
Python objects get copied into every loader worker as their reference counts are written (README, "Your own
data", has the figures). So the first process of a machine checks the json and writes flat arrays to an index
file, with a checksum; the others wait on its lock and memory-map that file. Evaluation's metric still reads the
json with pycocotools (evaluate.py).
"""
import collections
import collections.abc
import contextlib
import glob
import hashlib
import itertools
import json
import math
import mmap
import os
import tempfile
import time

import numpy as np

import config
import launch


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


INDEX_VERSION = 2  # bump when the layout or the checks change: older index files are then rebuilt
_MAGIC = b"FRCNNIDX"
_HEAD = 36  # magic, header length (8 bytes), SHA-1 (20 bytes) of everything after these 36 bytes


def cache_dirs():
    """Folders an index file may go to, in order: $FRCNN_DATA_CACHE alone when set, else the user's cache folder
    ($XDG_CACHE_HOME or ~/.cache) then the temp folder. Never the data set's folder, often read-only or shared."""
    if os.environ.get("FRCNN_DATA_CACHE"):
        return [os.environ["FRCNN_DATA_CACHE"]]
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(user, "frcnn", "coco_index"), os.path.join(tempfile.gettempdir(), f"frcnn-{os.getuid()}")]


def coco_index(ann, train):
    """(meta, arrays) of the json `ann` (see _build_index). The index file is named after the json's real path and
    used only when it records the SHA-1 of the json's current bytes, so an edited json is never served stale, and
    when its own checksum holds, so a damaged file is rebuilt, never read. One process of the machine builds it
    (launch.build_once: the others wait on the folder's lock, then map its file); without a writable folder every
    process builds for itself."""
    digest = _sha1_of_file(ann)
    name = hashlib.sha1(os.path.realpath(ann).encode()).hexdigest()[:20] + ".idx"
    for folder in cache_dirs():
        path = os.path.join(folder, name)

        def build():
            t0 = time.perf_counter()
            meta, arrays = _build_index(ann, train)
            written = _write_index(path, meta, arrays)
            print(f"data: indexed {ann} in {time.perf_counter() - t0:.1f} s ({len(arrays['ids'])} images, "
                  f"{len(arrays['labels'])} boxes)" + (f"; cached for this machine's processes in {path}"
                                                       if written else ""), flush=True)
            return written and _read_index(path, digest) or (meta, arrays)
        try:  # one lock for the folder: no lock file per json to clean up
            return launch.build_once(os.path.join(folder, "lock"), lambda: _read_index(path, digest), build)
        except OSError:
            continue  # a folder that cannot be made or locked (read-only): the next one
    return _build_index(ann, train)


def _sha1_of_file(ann):
    sha1 = hashlib.sha1()
    try:
        with open(ann, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                sha1.update(block)
    except OSError as e:
        raise DataError(f"cannot read the annotation file {ann}: {e.strerror or e}") from None
    return sha1.hexdigest()


def _read_index(path, digest):
    """(meta, read-only arrays mapped from the file) when path is an intact index of the json whose SHA-1 is digest,
    else None: absent, another json's or version's (silently), or damaged: truncated, not an index, or a checksum
    that does not hold (said in one line; the caller rebuilds it)."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # pages shared by every process and worker
    except (OSError, ValueError):  # absent, or empty (mmap refuses 0 bytes)
        if os.path.isfile(path):
            print(f"data: warning: the index {path} is empty; rebuilding it", flush=True)
        return None
    try:
        size = int.from_bytes(buf[8:16], "little")
        if buf[:8] != _MAGIC or _HEAD + size > len(buf):
            raise ValueError("not an index file, or cut short")
        meta = json.loads(buf[_HEAD:_HEAD + size])
        if (meta["version"], meta["digest"]) != (INDEX_VERSION, digest):
            return None  # an older version, or the json changed since: stale, not damaged
        start = -(-(_HEAD + size) // 64) * 64
        if len(buf) != start + meta["data_bytes"] or hashlib.sha1(memoryview(buf)[_HEAD:]).digest() != buf[16:36]:
            raise ValueError("its checksum does not hold")
        arrays = {k: np.frombuffer(buf, np.dtype(dtype), math.prod(shape), start + offset).reshape(shape)
                  for k, (dtype, shape, offset) in meta.pop("arrays").items()}
    except (ValueError, KeyError, TypeError) as e:  # json's errors are ValueErrors
        print(f"data: warning: the index {path} is damaged ({e}); rebuilding it", flush=True)
        return None
    return meta, arrays


def _write_index(path, meta, arrays):
    """The index file: magic, header length, SHA-1 of the rest, json header, then each array at a 64-byte aligned
    offset, written to a temporary file renamed into place (launch.atomic_write). False, with a warning, if that
    fails (a full disk). Index files whose json is gone are deleted first, so the folder does not grow for ever."""
    for name in glob.glob(glob.escape(path) + ".*.tmp"):  # left by a process killed while writing
        with contextlib.suppress(OSError):
            os.remove(name)
    for name in glob.glob(os.path.join(glob.escape(os.path.dirname(path)), "*.idx")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError), open(name, "rb") as f:
            head, size = f.read(_HEAD), os.fstat(f.fileno()).st_size
            if head[:8] == _MAGIC and int.from_bytes(head[8:16], "little") <= size:
                source = json.loads(f.read(int.from_bytes(head[8:16], "little")))["source"]
                if not os.path.exists(source):  # a test's temp folder, a moved data set
                    os.remove(name)
    table, size = {}, 0
    for k, a in arrays.items():
        table[k], size = [a.dtype.str, list(a.shape), size], size + -(-a.nbytes // 64) * 64
    header = json.dumps({**meta, "arrays": table, "data_bytes": size}).encode()
    start = -(-(_HEAD + len(header)) // 64) * 64
    body = bytearray(start + size - _HEAD)
    body[:len(header)] = header
    for k, a in arrays.items():
        at = start - _HEAD + table[k][2]
        body[at:at + a.nbytes] = np.ascontiguousarray(a).tobytes()
    head = _MAGIC + len(header).to_bytes(8, "little") + hashlib.sha1(body).digest()
    try:
        launch.atomic_write(path, lambda f: f.write(head + body))
        return True
    except OSError as e:
        print(f"data: warning: cannot write the index {path} ({e}); each process parses the json itself", flush=True)
        return False


def _parse_json(ann):
    """(the json's object, SHA-1 of its bytes) without any 'segmentation', dropped as each object is parsed: COCO
    train's polygons never exist at once. UTF-8, with or without a byte-order mark; a file that is not UTF-8 json is
    named with where it breaks."""
    try:
        with open(ann, "rb") as f:
            raw = f.read()
        return json.loads(raw.decode("utf-8-sig"), object_hook=_drop_segmentation), hashlib.sha1(raw).hexdigest()
    except OSError as e:
        raise DataError(f"cannot read the annotation file {ann}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{ann} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 8]!r}), which json "
                        f"files must be: save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    except RecursionError:
        raise DataError(f"{ann}: the json nests too deep to read") from None
    except ValueError as e:  # json.JSONDecodeError: truncated, not json
        raise DataError(f"{ann} is not valid json ({e}): a file cut short by a download or a copy?") from None


def _drop_segmentation(obj):
    obj.pop("segmentation", None)
    return obj


def _records(ann, d, key, required):
    """d[key] as a list of json objects; a missing key is an empty list unless required."""
    records = d.get(key, None if required else [])
    odd = next((k for k, r in enumerate(records) if type(r) is not dict), None) if isinstance(records, list) else -1
    if odd is not None:
        kind = "absent" if records is None else f"a {type(records).__name__}" if odd < 0 else \
            f"a list holding {records[odd]!r}"
        raise DataError(f"{ann}: '{key}' is {kind}; COCO's format lists its {key} as json objects "
                        f"({{\"id\": ..., ...}})")
    return records


def _is_scalar_id(v):
    return type(v) is str or (type(v) is int and -2 ** 63 <= v < 2 ** 63)


def _categories(ann, cats):
    """(category ids in the file's order, names with "__background__" first): label = 1 + position (pycocotools'
    getCatIds order). Ids are all integers or all strings; results are written with them as given."""
    for k, c in enumerate(cats):
        if not _is_scalar_id(c.get("id")) or type(c.get("name")) is not str:
            raise DataError(f"{ann}: category #{k} {c!r} needs an 'id' (an integer or a string) and a 'name' (a "
                            f"string)")
    ids = [c["id"] for c in cats]
    if len(set(map(type, ids))) > 1:  # pycocotools' COCOeval sorts them
        raise DataError(f"{ann}: category ids mix integers and strings ({ids[:6]!r}); use one kind for all")
    repeated = next((i for i, n in collections.Counter(ids).items() if n > 1), None)
    if repeated is not None:
        raise DataError(f"{ann}: category id {repeated!r} is listed {ids.count(repeated)} times in 'categories'")
    return ids, ["__background__"] + [c["name"] for c in cats]


_IMAGE_FIELDS = (("id", lambda v: type(v) is int and -2 ** 63 <= v < 2 ** 63, "a 64-bit integer"),
                 ("width", lambda v: type(v) is int and v > 0, "a positive integer"),
                 ("height", lambda v: type(v) is int and v > 0, "a positive integer"),
                 ("file_name", lambda v: type(v) is str and v != "", "a file name"))


def _images(ann, images):
    """(ids sorted (N,) int64, width, height, file names in that order). Every entry needs a unique integer 'id',
    a positive integer 'width' and 'height' and a 'file_name'; the first that lacks one is named."""
    for k, img in enumerate(images):
        for field, usable, what in _IMAGE_FIELDS:
            if not usable(img.get(field)):
                got = f"{field} {img[field]!r}" if field in img else f"no '{field}'"
                raise DataError(f"{ann}: image #{k} of 'images' (id {img.get('id')!r}) has {got}; {what} is needed")
    ids = np.array([img["id"] for img in images], dtype=np.int64)
    order = np.argsort(ids, kind="stable")  # sorted ids, as maskrcnn_benchmark/data/datasets/coco.py
    ids = ids[order]
    repeated = np.flatnonzero(ids[1:] == ids[:-1])
    if len(repeated):
        i = int(ids[repeated[0]])
        files = [img["file_name"] for img in images if img["id"] == i]
        raise DataError(f"{ann}: image id {i} is listed {len(files)} times in 'images' ({', '.join(files[:4])}); "
                        f"each image needs its own id, or its boxes would land on another file")
    infos = [images[k] for k in order.tolist()]
    return ids, [img["width"] for img in infos], [img["height"] for img in infos], [img["file_name"] for img in infos]


def _annotation_fields(anns, cat_id_to_label):
    """Every annotation's fields in the file's order, as arrays of length A: xywh (A, 4) float32 with zeros where
    'bbox' is not 4 numbers, bad_bbox, bad_cat (a category_id not in 'categories'), labels (0 for those), has_area,
    has_crowd, crowd. The common case runs in C loops."""
    bbox = [a.get("bbox") for a in anns]
    if set(map(type, bbox)) <= {list} and set(map(len, bbox)) <= {4} and \
            set(map(type, itertools.chain.from_iterable(bbox))) <= {int, float}:
        xywh = np.fromiter(itertools.chain.from_iterable(bbox), np.float32, 4 * len(bbox)).reshape(-1, 4)
        bad_bbox = np.zeros(len(anns), bool)
    else:
        good = [isinstance(b, list) and len(b) == 4 and all(type(v) in (int, float) for v in b) for b in bbox]
        xywh = np.array([b if ok else (0, 0, 0, 0) for b, ok in zip(bbox, good)], np.float32).reshape(-1, 4)
        bad_bbox = ~np.array(good, bool).reshape(-1)
    labels = np.fromiter((cat_id_to_label.get(a.get("category_id"), 0) if _is_scalar_id(a.get("category_id")) else 0
                          for a in anns), np.int64, len(anns))
    has_area = np.fromiter(("area" in a for a in anns), bool, len(anns))
    has_crowd = np.fromiter(("iscrowd" in a for a in anns), bool, len(anns))
    crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, len(anns))
    return xywh, bad_bbox, labels == 0, labels, has_area, has_crowd, crowd


def _annotation(ann, anns, j):
    """How messages name annotation j."""
    return f"{ann}: annotation {anns[j].get('id')!r} (#{j} of 'annotations', image {anns[j].get('image_id')!r})"


def _first_bad_annotation(ann, anns, bad_bbox, bad_cat):
    """The message naming the first annotation, in the file's order, whose bbox or category_id is unusable."""
    j = int(np.flatnonzero(bad_bbox | bad_cat)[0])
    a, where = anns[j], _annotation(ann, anns, j)
    if bad_bbox[j]:
        return DataError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {a.get('bbox')!r}")
    return DataError(f"{where} has category_id {a.get('category_id')!r}, which 'categories' does not list")


def _build_index(ann, train):
    """The json checked and flattened, as (meta, arrays). Images sorted by id (upstream): "ids" (N,), "sizes"
    (N, 2) (w, h), file names as utf-8 in "name_buf" cut at "name_off" (N+1,), and the boxes training and evaluation
    use (non-crowd, legacy xyxy clipped to the image, positive area) in "boxes" (B, 4) float32 and "labels" (B,)
    int64, image i's at box_off[i]:box_off[i+1], each in the json's order (pycocotools' imgToAnns). The first
    record that cannot be used (images first, then annotations, each in the file's order) stops the build, named;
    what only evaluation needs ('area', unique annotation ids) is kept in meta["eval_error"], so one index serves
    training and evaluation."""
    d, digest = _parse_json(ann)
    if not isinstance(d, dict):
        raise DataError(f"{ann}: holds a json {type(d).__name__}, not COCO's object of images and annotations")
    images, anns = _records(ann, d, "images", True), _records(ann, d, "annotations", False)
    cat_ids, names = _categories(ann, _records(ann, d, "categories", True))
    ids, width, height, files = _images(ann, images)
    no_key = next((j for j, a in enumerate(anns) if not (_is_scalar_id(a.get("id")) and "image_id" in a)), None)
    if no_key is not None:
        raise DataError(f"{ann}: annotation #{no_key} of 'annotations' ({anns[no_key]!r:.120}) needs an 'id' (an "
                        f"integer or a string) and an 'image_id'")
    # annotations grouped by image in the file's order (pycocotools' imgToAnns); those of unlisted images unused
    rank_of = dict(zip(ids.tolist(), range(len(ids))))
    rank = np.fromiter((rank_of.get(a["image_id"], -1) if type(a["image_id"]) is int else -1 for a in anns),
                       np.int64, len(anns))
    xywh, bad_bbox, bad_cat, labels, has_area, has_crowd, crowd = _annotation_fields(
        anns, {c: i + 1 for i, c in enumerate(cat_ids)})
    if (bad_bbox | bad_cat).any():
        raise _first_bad_annotation(ann, anns, bad_bbox, bad_cat)
    uses = collections.Counter(a["id"] for a in anns)
    repeated = [i for i, n in uses.items() if n > 1]
    eval_error = ""
    if repeated:  # pycocotools' anns dict keeps the last: COCOeval would lose boxes
        eval_error = (f": annotation id {repeated[0]!r} is used {uses[repeated[0]]} times (images "
                      f"{sorted({a['image_id'] for a in anns if a['id'] == repeated[0]}, key=repr)}); evaluation "
                      f"needs unique annotation ids")
    elif not has_area.all():  # COCOeval reads it for its small/medium/large ranges
        eval_error = (_annotation("", anns, int(np.flatnonzero(~has_area)[0])) + " has no 'area', which COCOeval "
                      "needs: add it (w * h of the box will do)")
    order = np.argsort(rank, kind="stable")
    order = order[rank[order] >= 0]
    arrays, dropped = _flat_arrays(ids, width, height, files, *(x[order] for x in (rank, xywh, crowd, labels)))
    counts = [["without 'iscrowd' (taken as 0)", int((~has_crowd[order]).sum())],
              ["without 'area' (not used in training)", int((~has_area[order]).sum())],
              ["boxes dropped without positive area inside the image (degenerate, outside, NaN/inf)", dropped],
              ["annotations of image ids that 'images' does not list (unused)", int((rank < 0).sum())]]
    plain = (not len(ids) or ids[0] >= 0) and all(type(i) is int and i >= 0 for i in itertools.chain(cat_ids, uses))
    meta = {"version": INDEX_VERSION, "source": os.path.realpath(ann), "digest": digest, "cat_ids": cat_ids,
            "names": names, "annotations": len(anns), "counts": counts, "eval_error": eval_error,
            "repeated_ids": len(repeated), "plain_ids": plain}  # plain: every id a non-negative integer (hotcoco's)
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


class _SlicedArray(collections.abc.Sequence):
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
    return (_SlicedArray(a["boxes"], lo, hi, _copy), _SlicedArray(a["labels"], lo, hi, _copy),
            _SlicedArray(a["sizes"], rows, rows + 1, _size),
            _SlicedArray(a["name_buf"], a["name_off"][rows], a["name_off"][rows + 1], _file_name))
