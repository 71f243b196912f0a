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
import codecs
import collections
import collections.abc
import contextlib
import glob
import hashlib
import itertools
import json
import math
import mmap
import operator
import os
import re
import tempfile
import time
from typing import Annotated, List, Tuple, Union

import msgspec
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


def _read_index(path, digest, checksum=None):
    """(meta, read-only arrays mapped from the file) when path is an intact index of the json whose SHA-1 is digest,
    else None: absent, another json's or version's (silently), or damaged: truncated, not an index, or a checksum
    that does not hold (said in one line; the caller rebuilds it). With `checksum`, the SHA-1 its header records, the
    file is taken as the one a process already checked (a loader worker re-mapping its parent's): the header must
    record it, the data is not hashed again. meta["index"] = [path, that SHA-1 in hex], what map_index takes."""
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
        if len(buf) != start + meta["data_bytes"] or (buf[16:36].hex() != checksum if checksum else
                                                       hashlib.sha1(memoryview(buf)[_HEAD:]).digest() != buf[16:36]):
            raise ValueError("its checksum does not hold")
        arrays = {k: np.frombuffer(buf, np.dtype(dtype), math.prod(shape), start + offset).reshape(shape)
                  for k, (dtype, shape, offset) in meta.pop("arrays").items()}
    except (ValueError, KeyError, TypeError) as e:  # json's errors are ValueErrors
        print(f"data: warning: the index {path} is damaged ({e}); rebuilding it", flush=True)
        return None
    meta["index"] = [path, buf[16:36].hex()]
    return meta, arrays


def map_index(path, digest, checksum):
    """(meta, arrays) of the index file that another process of this machine checked and mapped (meta["index"] is
    [path, checksum]): how a loader worker started by forkserver or spawn gets its parent's data without a copy."""
    found = _read_index(path, digest, checksum)
    if found is None:
        raise DataError(f"the index {path} changed after this process's parent mapped it (its json edited, or the "
                        f"cache folder emptied, during the run?): restart the run")
    return found


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

    def write(f):  # array by array, with the checksum written last over its placeholder: no copy of the arrays
        sha1 = hashlib.sha1()
        f.write(_MAGIC + len(header).to_bytes(8, "little") + bytes(20))
        for part in (header + bytes(start - _HEAD - len(header)),
                     *(p for a in arrays.values() for p in (np.ascontiguousarray(a).reshape(-1).view(np.uint8),
                                                            bytes(-(-a.nbytes // 64) * 64 - a.nbytes)))):
            sha1.update(part)
            f.write(part)
        f.seek(16)
        f.write(sha1.digest())
    try:
        launch.atomic_write(path, write)
        return True
    except OSError as e:
        print(f"data: warning: cannot write the index {path} ({e}); each process parses the json itself", flush=True)
        return False


_Int64 = Annotated[int, msgspec.Meta(ge=-2 ** 63, le=2 ** 63 - 1)]
_Positive = Annotated[int, msgspec.Meta(gt=0)]


class _Image(msgspec.Struct, gc=False):
    """An image entry in the types _IMAGE_FIELDS accepts; a run holding any other is read by json instead, and the
    per-record checks name it."""
    id: _Int64
    width: _Positive
    height: _Positive
    file_name: Annotated[str, msgspec.Meta(min_length=1)]


class _Annotation(msgspec.Struct, gc=False):
    """An annotation in the types the checks accept; 'segmentation' and unknown fields are skipped in C, unbuilt."""
    id: Union[_Int64, str]
    image_id: _Int64
    bbox: Tuple[float, float, float, float]
    category_id: Union[_Int64, str]
    area: Union[float, msgspec.UnsetType] = msgspec.UNSET
    iscrowd: Union[int, msgspec.UnsetType] = msgspec.UNSET


_DECODERS = {"images": msgspec.json.Decoder(List[_Image]), "annotations": msgspec.json.Decoder(List[_Annotation]),
             "categories": None}
_BOUNDARY = re.compile(rb"\}[ \t\n\r]*,[ \t\n\r]*\{")  # between two objects of an array: a candidate place to cut it
CHUNK_BYTES = 1 << 22  # a run of whole records decoded at once: ~25,000 annotations of Python objects at most


def _utf8_sha1(ann, buf):
    """SHA-1 of the file's bytes, checking on the way that they are UTF-8 (a byte-order mark allowed)."""
    sha1, pending, step = hashlib.sha1(), b"", 1 << 24
    for at in range(0, len(buf), step):
        block = buf[at:at + step]
        _drop_pages(buf, at, at + step)
        sha1.update(block)
        block = pending + block if pending else block
        try:
            pending = block[codecs.utf_8_decode(block, "strict", at + step >= len(buf))[1]:]
        except UnicodeDecodeError as e:
            k = min(at + step, len(buf)) - len(block) + e.start  # block: the bytes from k - e.start on
            raise DataError(f"{ann} is not UTF-8 text (byte {k}: {buf[k:k + 8]!r}), which json files must be: save "
                            f"it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    return sha1.hexdigest()


def _parse_json(ann, text):
    """The json's whole object without any 'segmentation', dropped as each object is parsed (the path for files
    that are not strict json, such as NaN written by Python's json, or not an object); named where it breaks."""
    try:
        return json.loads(bytes(text), object_hook=_drop_segmentation)
    except RecursionError:
        raise DataError(f"{ann}: the json nests too deep to read") from None
    except ValueError as e:  # json.JSONDecodeError: truncated, not json
        raise DataError(f"{ann} is not valid json ({e}): a file cut short by a download or a copy?") from None


def _drop_segmentation(obj):
    obj.pop("segmentation", None)
    return obj


class _Skip(msgspec.Struct):
    """Any json object, its fields skipped: what locating an array's end decodes."""


_SKIP = msgspec.json.Decoder(List[_Skip])
_WS = re.compile(rb"[ \t\n\r]*")
_KEY = re.compile(rb'"(?:[^"\\]|\\.)*"[ \t\n\r]*:[ \t\n\r]*', re.S)
_ARRAY_END = re.compile(rb"\}[ \t\n\r]*\]")  # after the last object of an array: a candidate end
_VALUE_END = re.compile(rb"[ \t\n\r]*[,}]")  # after a member's value: a candidate end


class _NotStreamable(Exception):
    """The top-level object cannot be walked member by member (not an object, a repeated key, an array of other
    than objects, a syntax error): json reads the whole file, and names where it breaks."""


def _drop_pages(buf, done, upto):
    """Hand back the memory map's pages in [done, upto) (read, not needed again): the file's pages stay in the
    page cache but leave this process's resident set. Returns the new `done`."""
    upto = min(upto, len(buf)) - min(upto, len(buf)) % mmap.PAGESIZE
    if isinstance(buf, mmap.mmap) and upto > done:
        buf.madvise(mmap.MADV_DONTNEED, done, upto - done)
    return max(done, upto)


def _chunks(buf, at, decoder, end):
    """The json array at buf[at] ('[') as runs of whole objects of about CHUNK_BYTES: (position of the run's first
    record, its records, typed), decoded by `decoder` (typed) or, where that refuses a value, by json into dicts
    without 'segmentation'; end[0] is then where the array ends. A run is cut after a "}, {" past CHUNK_BYTES, or
    else ends the array at a "}]": one inside a string or a nested value, or past the array, leaves a run that
    cannot parse (json reads a prefix the same way wherever it is cut), so another is tried."""
    start = _WS.match(buf, at + 1).end()
    k, want, done = 0, CHUNK_BYTES, at - at % mmap.PAGESIZE
    while buf[start:start + 1] != b"]":
        cut = _BOUNDARY.search(buf, start + want)
        hi = cut.start() + 1 if cut else len(buf)
        for stop in itertools.chain([hi] if cut else [], (m.start() + 1 for m in _ARRAY_END.finditer(buf, start, hi))):
            text = b"[" + buf[start:stop] + b"]"
            try:
                if decoder is None:  # the categories: json's dicts
                    raise msgspec.DecodeError
                records, typed = decoder.decode(text), True
            except msgspec.DecodeError:
                try:
                    records, typed = json.loads(text, object_hook=_drop_segmentation), False
                except ValueError:
                    continue
            except RecursionError:
                raise _NotStreamable from None
            break
        else:
            if cut is None:
                raise _NotStreamable
            want *= 2
            continue
        yield k, records, typed
        k, want, done = k + len(records), CHUNK_BYTES, _drop_pages(buf, done, start)
        start = cut.end() - 1 if cut and stop == hi else _WS.match(buf, stop).end()  # the next object, or ']'
    end[:] = [start + 1]


def _members(buf, at):
    """{key: (start, end)} of the values of the top-level object at buf[at], arrays walked run by run (_chunks)
    without building their objects, other values parsed. Raises _NotStreamable."""
    pos, spans = _WS.match(buf, at).end(), {}
    if buf[pos:pos + 1] != b"{":
        raise _NotStreamable
    pos = _WS.match(buf, pos + 1).end()
    while buf[pos:pos + 1] != b"}" or spans:
        key = _KEY.match(buf, pos)
        if not key:
            raise _NotStreamable
        name, pos = json.loads(buf[key.start():key.end()].rstrip(b" \t\n\r:")), key.end()
        if buf[pos:pos + 1] == b"[":
            end = []
            for _ in _chunks(buf, pos, _SKIP, end):
                pass
            end = end[0]
        else:
            end = next((m.start() for m in _VALUE_END.finditer(buf, pos) if _parses(buf[pos:m.start()])), None)
        if end is None or name in spans:
            raise _NotStreamable
        spans[name], pos = (pos, end), _WS.match(buf, end).end()
        if buf[pos:pos + 1] == b"}":
            break
        if buf[pos:pos + 1] != b",":
            raise _NotStreamable
        pos = _WS.match(buf, pos + 1).end()
    if _WS.match(buf, pos + 1).end() != len(buf):
        raise _NotStreamable
    return spans


def _parses(text):
    try:
        json.loads(text)
        return True
    except (ValueError, RecursionError):
        return False


def _runs(ann, key, value, errors, priority):
    """(k, records, typed) runs of the json's `key`, its records k, k+1, ... (see _chunks); none, with the error
    noted, where they are not a list of json objects. value: (buf, start), or the parsed value, or _ABSENT."""
    if type(value) is tuple:  # (buf, position of the array)
        for k, records, typed in _chunks(*value, _DECODERS[key], []):
            if not typed:
                try:
                    _records(ann, {key: records}, key, True)
                except DataError as e:
                    errors.setdefault(priority, e)
                    return
            yield k, records, typed
        return
    try:
        yield 0, _records(ann, {} if value is _ABSENT else {key: value}, key, key != "annotations"), False
    except DataError as e:
        errors.setdefault(priority, e)


_ABSENT = object()


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


def _images(ann, runs, errors):
    """(ids sorted (N,) int64, (N, 2) int64 (width, height), file names in that order) of the images' runs. Every
    entry needs a unique integer 'id', a positive integer 'width' and 'height' and a 'file_name'; the first that
    lacks one is named."""
    ids, sizes, files = [], [], []
    for k, images, typed in runs:
        if not typed:
            bad = next(((j, f, u, w) for j, img in enumerate(images) for f, u, w in _IMAGE_FIELDS
                        if not u(img.get(f))), None)
            if bad:
                (j, field, _, what), img = bad, images[bad[0]]
                got = f"{field} {img[field]!r}" if field in img else f"no '{field}'"
                errors.setdefault(5, DataError(f"{ann}: image #{k + j} of 'images' (id {img.get('id')!r}) has {got}; "
                                               f"{what} is needed"))
                continue
            images = [msgspec.convert(img, _Image, from_attributes=False) for img in images]
        ids.append(np.fromiter(map(operator.attrgetter("id"), images), np.int64, len(images)))
        sizes.append(np.array([(img.width, img.height) for img in images], np.int64).reshape(-1, 2))
        files += [img.file_name for img in images]
    ids, sizes = np.concatenate(ids or [np.zeros(0, np.int64)]), np.concatenate(sizes or [np.zeros((0, 2), np.int64)])
    order = np.argsort(ids, kind="stable")  # sorted ids, as maskrcnn_benchmark/data/datasets/coco.py
    repeated = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(repeated) and 5 not in errors:
        i = int(ids[order][repeated[0]])
        same = [files[j] for j in np.flatnonzero(ids == i).tolist()]
        errors.setdefault(6, DataError(f"{ann}: image id {i} is listed {len(same)} times in 'images' ("
                                       f"{', '.join(same[:4])}); each image needs its own id, or its boxes would "
                                       f"land on another file"))
    return ids[order], sizes[order], [files[j] for j in order.tolist()]


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


def _typed_fields(anns, cat_id_to_label):
    """_annotation_fields of decoded _Annotation records, in C loops."""
    n, get = len(anns), operator.attrgetter
    xywh = np.fromiter(itertools.chain.from_iterable(map(get("bbox"), anns)), np.float32, 4 * n).reshape(-1, 4)
    labels = np.fromiter(map(cat_id_to_label.get, map(get("category_id"), anns), itertools.repeat(0)), np.int64, n)
    area, crowd = list(map(get("area"), anns)), list(map(get("iscrowd"), anns))
    has_area, has_crowd = (np.fromiter((v is not msgspec.UNSET for v in x), bool, n) if x.count(msgspec.UNSET) else
                           np.ones(n, bool) for x in (area, crowd))
    return xywh, np.zeros(n, bool), labels == 0, labels, has_area, has_crowd, np.fromiter(map(bool, crowd), bool, n)


def _annotation(ann, a, j):
    """How messages name annotation a, #j of the file's."""
    return f"{ann}: annotation {a.get('id')!r} (#{j} of 'annotations', image {a.get('image_id')!r})"


def _first_bad_annotation(ann, anns, bad_bbox, bad_cat, k):
    """The message naming the first annotation, in the file's order, whose bbox or category_id is unusable."""
    j = int(np.flatnonzero(bad_bbox | bad_cat)[0])
    a, where = anns[j], _annotation(ann, anns[j], k + j)
    if bad_bbox[j]:
        return DataError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {a.get('bbox')!r}")
    return DataError(f"{where} has category_id {a.get('category_id')!r}, which 'categories' does not list")


def _ranks(ids, values):
    """Position in the sorted image ids of each value, -1 for a value that is not one of them (or not an int)."""
    if values.dtype != np.int64:
        ok = np.fromiter((type(v) is int and -2 ** 63 <= v < 2 ** 63 for v in values), bool, len(values))
        values = np.where(ok, values, 0).astype(np.int64)
    else:
        ok = np.ones(len(values), bool)
    at = np.minimum(np.searchsorted(ids, values), max(len(ids) - 1, 0))
    return np.where(ok & (ids[at] == values) if len(ids) else False, at, -1)


def _build_index(ann, train):
    """The json checked and flattened, as (meta, arrays). Images sorted by id (upstream): "ids" (N,), "sizes"
    (N, 2) (w, h), file names as utf-8 in "name_buf" cut at "name_off" (N+1,), and the boxes training and evaluation
    use (non-crowd, legacy xyxy clipped to the image, positive area) in "boxes" (B, 4) float32 and "labels" (B,)
    int64, image i's at box_off[i]:box_off[i+1], each in the json's order (pycocotools' imgToAnns). The first
    record that cannot be used (images first, then annotations, each in the file's order) stops the build, named;
    what only evaluation needs ('area', unique annotation ids) is kept in meta["eval_error"], so one index serves
    training and evaluation. The file is read in one pass of runs of records (_chunks) from a memory map, so its
    size bounds no Python object: COCO train's polygons, or 25M annotations, never exist at once."""
    try:
        with open(ann, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    except OSError as e:
        raise DataError(f"cannot read the annotation file {ann}: {e.strerror or e}") from None
    digest = _utf8_sha1(ann, buf)
    at = 3 if buf[:3] == codecs.BOM_UTF8 else 0
    try:  # the members located, arrays walked in runs without building them; the pages read handed back
        spans = _members(buf, at)
        sections = {k: _ABSENT if k not in spans else (buf, spans[k][0]) if buf[spans[k][0]:spans[k][0] + 1] == b"["
                    else json.loads(buf[slice(*spans[k])]) for k in _DECODERS}
    except _NotStreamable:  # not an object, a repeated key, not json: json reads the whole file and says why
        d = _parse_json(ann, memoryview(buf)[at:])
        if not isinstance(d, dict):
            raise DataError(f"{ann}: holds a json {type(d).__name__}, not COCO's object of images and annotations")
        sections = {k: d.get(k, _ABSENT) for k in _DECODERS}
    errors = {}  # priority -> the first error of that kind: raised after the pass, in the order of the checks
    cats = [c for _, run, _ in _runs(ann, "categories", sections["categories"], errors, 3) for c in run]
    try:
        cat_ids, names = _categories(ann, cats)
    except DataError as e:
        errors.setdefault(4, e)
        cat_ids, names = [], []
    images = _runs(ann, "images", sections["images"], errors, 1)
    ids, sizes, files = _images(ann, images, errors)
    cat_id_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
    kept, used, counts, no_area, total = [], [], np.zeros(4, np.int64), None, 0
    for k, anns, typed in _runs(ann, "annotations", sections["annotations"], errors, 2):
        total = k + len(anns)
        if typed:
            fields, ann_ids = _typed_fields(anns, cat_id_to_label), list(map(operator.attrgetter("id"), anns))
            image_ids = np.fromiter(map(operator.attrgetter("image_id"), anns), np.int64, len(anns))
        else:
            no_key = next((j for j, a in enumerate(anns) if not (_is_scalar_id(a.get("id")) and "image_id" in a)), None)
            if no_key is not None:
                errors.setdefault(7, DataError(f"{ann}: annotation #{k + no_key} of 'annotations' ("
                                               f"{anns[no_key]!r:.120}) needs an 'id' (an integer or a string) and "
                                               f"an 'image_id'"))
                continue
            fields, ann_ids = _annotation_fields(anns, cat_id_to_label), [a["id"] for a in anns]
            image_ids = np.array([a["image_id"] for a in anns] + [None], object)[:-1]  # 1-D, whatever they hold
        xywh, bad_bbox, bad_cat, labels, has_area, has_crowd, crowd = fields
        if 8 not in errors and (bad_bbox | bad_cat).any():
            errors.setdefault(8, _first_bad_annotation(ann, anns if not typed else list(map(
                msgspec.structs.asdict, anns)), bad_bbox, bad_cat, k))
        if errors:
            continue  # the build stops; the rest of the pass only looks for an earlier kind of error
        if no_area is None and not has_area.all():
            j = int(np.flatnonzero(~has_area)[0])
            no_area = _annotation("", anns[j] if not typed else msgspec.structs.asdict(anns[j]), k + j)
        rank = _ranks(ids, image_ids)
        listed, noncrowd = rank >= 0, (rank >= 0) & ~crowd
        boxes, keep = legacy_boxes(xywh[noncrowd], *sizes[rank[noncrowd]].T)
        counts += [(listed & ~has_crowd).sum(), (listed & ~has_area).sum(), (~keep).sum(), (~listed).sum()]
        kept.append((rank[noncrowd][keep], boxes[keep], labels[noncrowd][keep].astype(np.int32)))
        used.append((np.array(ann_ids, np.int64) if set(map(type, ann_ids)) <= {int} else
                     np.array(ann_ids + [None], object)[:-1], image_ids))
    if errors:
        raise errors[min(errors)]
    repeated, eval_error, plain = _repeated_ids(used)
    if repeated:  # pycocotools' anns dict keeps the last: COCOeval would lose boxes
        eval_error = (f": annotation id {repeated[0]!r} is used {repeated[1]} times (images "
                      f"{sorted(set(repeated[2]), key=repr)}); evaluation needs unique annotation ids")
    elif no_area:  # COCOeval reads it for its small/medium/large ranges
        eval_error = no_area + " has no 'area', which COCOeval needs: add it (w * h of the box will do)"
    del used
    arrays = _flat_arrays(ids, sizes, files, kept)
    counts = [["without 'iscrowd' (taken as 0)", int(counts[0])], ["without 'area' (not used in training)",
              int(counts[1])], ["boxes dropped without positive area inside the image (degenerate, outside, NaN/inf)",
                                int(counts[2])], ["annotations of image ids that 'images' does not list (unused)",
                                                  int(counts[3])]]
    plain = plain and (not len(ids) or ids[0] >= 0) and all(type(i) is int and i >= 0 for i in cat_ids)
    meta = {"version": INDEX_VERSION, "source": os.path.realpath(ann), "digest": digest, "cat_ids": cat_ids,
            "names": names, "annotations": total, "counts": counts, "eval_error": eval_error,
            "repeated_ids": repeated[3] if repeated else 0, "plain_ids": plain}  # plain: ids >= 0 (hotcoco's)
    return meta, arrays


def _repeated_ids(used):
    """(None, or (the first repeated annotation id in the file's order, its uses, their image ids, how many ids
    repeat), "", every id a non-negative integer) of the runs' (annotation ids, image ids)."""
    if all(a.dtype == np.int64 for a, _ in used):
        every = np.concatenate([a for a, _ in used] or [np.zeros(0, np.int64)])
        s = np.sort(every)
        twice = np.unique(s[1:][s[1:] == s[:-1]])
        plain = bool((s[:1] >= 0).all())
        del s
        if not len(twice):
            return None, "", plain
        first = int(every[np.flatnonzero(np.isin(every, twice))[0]])
        n = len(twice)
    else:  # string ids somewhere: Python's own counting
        uses = collections.Counter(itertools.chain.from_iterable(a.tolist() for a, _ in used))
        twice = [i for i, c in uses.items() if c > 1]
        plain = all(type(i) is int and i >= 0 for i in uses)
        if not twice:
            return None, "", plain
        first, n = twice[0], len(twice)
    images = [i for a, img in used for i, same in zip(img.tolist(), (a == first) if a.dtype == np.int64 and type(
        first) is int else [type(x) is type(first) and x == first for x in a.tolist()]) if same]
    return (first, len(images), images, n), "", plain


def _flat_arrays(ids, sizes, files, kept):
    """The index's arrays from the images and each run's kept boxes (their image's position, legacy xyxy, label):
    boxes grouped by image in the json's order, file names as one utf-8 buffer with offsets."""
    n = len(ids)
    rank = np.concatenate([r for r, _, _ in kept] or [np.zeros(0, np.int64)])
    order = np.argsort(rank, kind="stable")
    box_off = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rank, minlength=n), out=box_off[1:])
    del rank
    boxes = np.concatenate([b for _, b, _ in kept] or [np.zeros((0, 4), np.float32)])[order]
    labels = np.concatenate([lab for _, _, lab in kept] or [np.zeros(0, np.int32)])[order].astype(np.int64)
    kept.clear()
    encoded = [f.encode("utf-8", "surrogatepass") for f in files]
    name_off = np.zeros(n + 1, np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, n), out=name_off[1:])
    return {"ids": ids, "sizes": sizes, "name_off": name_off, "name_buf": np.frombuffer(b"".join(encoded), np.uint8),
            "box_off": box_off, "boxes": boxes, "labels": labels}


def _copy(values):
    return np.array(values)


def _size(values):
    return tuple(values[0].tolist())


def _file_name(values):
    return values.tobytes().decode("utf-8", "surrogatepass")


class _SlicedArray(collections.abc.Sequence):
    """Item i of a flat array cut at offsets, for row r = rows[i]: convert(values[off[r]:off[r + 1]]), or
    convert(values[r:r + 1]) without offsets. It holds no per-item Python object and no per-item array of its own,
    so loader workers have no reference count to write and nothing to copy or compute."""

    def __init__(self, values, off, rows, convert):
        self.values, self.off, self.rows, self.convert = values, off, rows, convert

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = int(self.rows[i])
        return self.convert(self.values[r:r + 1] if self.off is None else self.values[self.off[r]:self.off[r + 1]])


def per_image(arrays, rows):
    """(boxes, labels, sizes, files) of the images at rows (an array or a range): sequences over the flat arrays
    whose item i is image rows[i]'s (G, 4) float32 boxes and (G,) labels (writable copies), its (w, h) and its file
    name."""
    a, box_off = arrays, arrays["box_off"]
    return (_SlicedArray(a["boxes"], box_off, rows, _copy), _SlicedArray(a["labels"], box_off, rows, _copy),
            _SlicedArray(a["sizes"], None, rows, _size), _SlicedArray(a["name_buf"], a["name_off"], rows, _file_name))
