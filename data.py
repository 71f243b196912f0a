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
an uninterrupted one would have seen. The loaders generate the demo's data first (demo.py) when data_root is
cfg.demo_data.
"""
import functools
import gc
import math
import multiprocessing
import os
import random
import sys

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import coco_index
import config
import demo
from coco_index import DataError


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


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format split, root/annotations/instances_{split}.json with images in root/{split}/. Classes come
    from the json's categories: label = 1 + position in getCatIds(), 0 is background. Boxes are clipped to the
    image; training drops crowd boxes, boxes without positive area (degenerate, outside, NaN/inf) and the images
    left with none, and replaces an unreadable image by the next one that loads (target["skipped"] lists the
    files passed over). Evaluation keeps every image and refuses, before any work, missing or empty files,
    duplicate annotation ids and annotations without 'area'. self.notes: what was dropped, printed by the loaders.
    The json is parsed once per machine (coco_index); .boxes[i], .labels[i], .sizes[i] (w, h) and .files[i] are
    read from flat arrays shared by all processes, .ids is a list. It pickles as the index file's path (loader
    workers under forkserver and spawn map it again).
    Item: dataset[i] (test transform) or dataset[(i, rng_key)] (training augmentation drawn from rng_key)
    -> (image (3, H, W) float32, target dict, i)."""

    def __init__(self, root, split, cfg, train, ann_file=None, image_dir=None):
        ann = ann_file or os.path.join(root, "annotations", f"instances_{split}.json")
        self.image_dir = image_dir or os.path.join(root, split)
        if not os.path.isfile(ann):
            raise MissingData(f"no annotation file {ann}: set data_root to a folder in COCO's layout "
                              f"(annotations/instances_{split}.json and {split}/), or give the files with "
                              f"{'train' if train else 'val'}_ann= and {'train' if train else 'val'}_images=")
        if not os.path.isdir(self.image_dir):
            raise MissingData(f"no image folder {self.image_dir} for {ann}: set data_root, or "
                              f"{'train' if train else 'val'}_images= to the folder holding its file_name paths")
        meta, a = coco_index.coco_index(ann, train)
        if meta["eval_error"] and not train:
            raise DataError(ann + meta["eval_error"])
        self.root, self.split, self.cfg, self.train, self.ann_file = root, split, cfg, train, ann
        self.cat_ids, self.names = meta["cat_ids"], meta["names"]
        self.plain_ids = meta["plain_ids"]  # every id a non-negative integer: what hotcoco can read (evaluate.py)
        self.cat_id_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id = {i + 1: c for i, c in enumerate(self.cat_ids)}
        # (index file, json's SHA-1, the file's SHA-1): what a pickle carries instead of the arrays (__getstate__)
        self._index = meta.get("index") and (meta["index"][0], meta["digest"], meta["index"][1])
        self._attach(a)
        count = dict(meta["counts"])
        if train:  # upstream keeps images whose boxes are all crowd or degenerate, then crashes on them
            count["images dropped without a usable non-crowd box"] = len(a["ids"]) - len(self)
        count["annotation ids used more than once (all kept)"] = meta["repeated_ids"]
        self.notes = [f"data: {split}: {n} {what}" for what, n in count.items() if n]
        if train and not len(self):
            raise DataError(f"{ann}: no image has a usable box ({meta['annotations']} annotations): nothing to "
                             f"train on")
        if not train:  # skipping an image would change the metric: refuse now, before any work
            bad = [p for p in map(self.path, range(len(self))) if not os.path.isfile(p) or os.path.getsize(p) == 0]
            if bad:
                raise MissingData(f"evaluation needs every image of {split}; {len(bad)} missing or empty: "
                                        + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
        self.bad = set()  # training: indices found unreadable in this process
        self.ids, self.aspect_group = self.ids, self.aspect_group  # made now in this process (not in its workers)

    def _attach(self, a):
        """Per-image views of the index's arrays a: the rows are training's images with a box, or all."""
        self._arrays = a
        self._rows = np.flatnonzero(np.diff(a["box_off"]) > 0) if self.train else range(len(a["ids"]))
        self.boxes, self.labels, self.sizes, self.files = coco_index.per_image(a, self._rows)

    def __getstate__(self):
        """What a loader worker started by forkserver or spawn receives: the index file's path and checksum, which
        it maps again (coco_index.map_index), so no array and no per-image list crosses the pipe; the arrays only
        when there is no index file (no writable cache folder). Workers started by fork receive nothing."""
        drop = {"boxes", "labels", "sizes", "files", "_rows", "ids", "aspect_group", "_arrays" if self._index else ""}
        return {k: v for k, v in vars(self).items() if k not in drop}

    def __setstate__(self, state):
        vars(self).update(state)
        self._attach(coco_index.map_index(*self._index)[1] if self._index else self._arrays)

    @functools.cached_property
    def ids(self):
        """The json's image id of each item, a list of Python ints (evaluate.py writes them); in a worker made on
        first use, so never."""
        return self._arrays["ids"][self._rows].tolist()

    @functools.cached_property
    def aspect_group(self):
        sizes = self._arrays["sizes"][self._rows]
        return (sizes[:, 1] >= sizes[:, 0]).astype(np.int64)  # upstream: h/w < 1 -> 0

    def __len__(self):
        return len(self._rows)

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
            e = UnreadableImage(f"{e} (image id {self.ids[index]} of {self.ann_file})")
            if not self.train:
                raise e from None
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
    {}, i). .sizes holds each file's (w, h), read from its header here: a file that is not an image (empty, text,
    an unknown format) goes to .unreadable {path: reason} instead of .paths, before any inference, and one that
    fails to decode later (truncated) comes as a 32x32 stand-in with {"unreadable": reason}, so one bad file in a
    folder stops nothing."""

    def __init__(self, paths, cfg):
        self.paths, self.cfg, self.sizes, self.unreadable = [], cfg, [], {}
        for path in paths:
            try:
                if os.path.getsize(path) == 0:
                    self.unreadable[path] = "the file is empty (0 bytes)"
                    continue
                with Image.open(path) as img:
                    self.sizes.append(img.size)
                self.paths.append(path)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... for a file it cannot read
                self.unreadable[path] = _reason(e, path)
        self.aspect_group = np.array([int(h >= w) for w, h in self.sizes], dtype=np.int64)

    def __len__(self):
        return len(self.paths)

    def path(self, index):
        return self.paths[index]

    def __getitem__(self, index):
        try:
            img = load_image(self.paths[index])
        except UnreadableImage as e:
            return torch.zeros(3, 32, 32), {"unreadable": _reason(e.__cause__, self.paths[index])}, index
        img, _, _ = transform(img, np.zeros((0, 4), np.float32), self.cfg, None)
        return to_model_tensor(img, self.cfg.pixel_mean), {}, index


def _reason(e, path):
    """Why path is no image, in a few words: PIL's error without the path it repeats."""
    return f"{type(e).__name__}: {str(e).replace(repr(path), '').replace(path, '').strip()}"


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


def make_demo_data(cfg):
    """The demo's generated shapes, written once when data_root is the config's demo_data folder (the demo
    preset's) and they are absent or stale."""
    if cfg.demo_data and os.path.abspath(cfg.data_root) == os.path.abspath(cfg.demo_data):
        demo.make_demo_dataset(cfg.data_root)


class Loader(torch.utils.data.DataLoader):
    """torch's DataLoader whose forked workers leave the pages of the parent's Python objects shared: the objects
    are frozen (gc.freeze) while the workers start, so in each worker they sit in the permanent generation and its
    garbage collections never write to them; a full collection in a worker otherwise copies every page holding a
    tracked object of the parent (about 80 MiB per worker with torch loaded: tools/bench.py startup, fork). The
    parent unfreezes them at once. Under forkserver and spawn this changes nothing."""

    def __iter__(self):
        if not self.num_workers:
            return super().__iter__()
        gc.freeze()
        try:
            return super().__iter__()  # starts the workers (once, with persistent_workers)
        finally:
            gc.unfreeze()


def make_train_loader(cfg, rank=0, world_size=1, start_iter=0, sampler_state=None):
    """Endless training loader for this rank; loader.state(it) is the sampler position to checkpoint."""
    make_demo_data(cfg)
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
    loader = Loader(dataset, batch_sampler=sampler, persistent_workers=cfg.num_workers > 0, **_loader_options(cfg))
    loader.state = sampler.state
    return loader


def make_test_loader(cfg, split=None, rank=0, world_size=1, dataset=None):
    """Every image of the split (or of `dataset`, e.g. ImageFiles) once; rank r takes the r-th contiguous block of
    indices (upstream's shards), test_ims_per_batch // world_size images per forward, grouped by aspect when
    aspect_grouping."""
    if dataset is None:
        make_demo_data(cfg)
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
    return Loader(dataset, batch_sampler=batches, **_loader_options(cfg))


def _own_process_group(worker_id):
    """Each loader worker leaves the training process's group: SIGTERM or SIGINT sent to that group (Ctrl-C, a
    scheduler's preemption, torchrun's shutdown) reaches the main process only, which finishes the iteration and
    checkpoints (train.py) instead of dying of a killed worker mid-batch. A worker still exits with its parent."""
    os.setpgrp()


def start_method():
    """How loader workers start: the method set with multiprocessing.set_start_method if one was, else fork on
    Linux (the platform's default elsewhere). Fork starts a worker without importing torch again and keeps what the
    process set up: log.txt's copy of stdout (logger.py), so a worker's warnings reach the log. Python 3.14 makes
    forkserver the default, which would drop both; the dataset pickles small (CocoDetection.__getstate__), so any
    method the user sets works too."""
    return multiprocessing.get_start_method(allow_none=True) or ("fork" if sys.platform.startswith("linux") else None)


def _loader_options(cfg):
    """Worker processes, the padding collate, and pinned host memory for cuda, or mlu through torch_mlu."""
    options = dict(num_workers=cfg.num_workers, worker_init_fn=_own_process_group if cfg.num_workers else None,
                   collate_fn=functools.partial(collate, size_divisibility=cfg.size_divisibility))
    if cfg.num_workers:
        options.update(multiprocessing_context=start_method())
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
