"""Convert Pascal VOC annotations (one xml per image) into the COCO layout that train.py and evaluate.py read:

    python tools/voc2coco.py VOCdevkit/VOC2007 datasets/voc07 --split trainval --split test
    # reads VOC2007/Annotations/*.xml, VOC2007/JPEGImages/, VOC2007/ImageSets/Main/{trainval,test}.txt; writes
    # datasets/voc07/annotations/instances_{trainval,test}.json and datasets/voc07/{trainval,test} linking to
    # VOC2007/JPEGImages; then: python train.py ... data_root=datasets/voc07 train_split=trainval val_split=test
    # num_classes=21
    python tools/voc2coco.py datasets/raccoon_src datasets/raccoon --images images --annotations annotations \\
        --split train --split val --val-fraction 0.2    # own folders, no split lists: 80 % train, 20 % val

A split's images are the ids (xml stems) of its list {sets}/{split}.txt. Without lists, one split takes every xml
file; two splits need --val-fraction (a seeded random split); the same image never lands in two splits unless
--allow-overlap says so. Every xml, list and image is checked before anything is written: a fault stops the run with
one paragraph naming the file, object and field (exit code 2) and leaves no output behind.
Boxes: VOC's corners are 1-based and inclusive; upstream subtracts 1 (maskrcnn_benchmark/data/datasets/voc.py,
TO_REMOVE), so COCO's [x, y, w, h] here is [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1] (the legacy +1
width), after clipping to the image's 1..width, 1..height pixels. Objects marked difficult become iscrowd=1: ignored
by training, as upstream's VOC reader drops them, and by the COCO metric. Classes are the object names found in all
xml files of the annotation folder, sorted (category ids 1..K), unless --classes gives them in order.
This file imports nothing from the repository: copy it anywhere.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import xml.etree.ElementTree as ET

from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LAYOUT = "the VOC layout: Annotations/*.xml, JPEGImages/ and optionally ImageSets/Main/{split}.txt"


class VocError(Exception):
    """A fault in the input or the options, the user's to fix: main prints its message as one paragraph and exits
    with code 2, without a traceback."""


def _count(n, what):
    """'1 box', '2 boxes', '3 images'."""
    return f"{n} {what}" if n == 1 else f"{n} {what}{'es' if what.endswith(('s', 'x')) else 's'}"


def _number(text, where, field):
    """float(text) of a coordinate, or VocError naming where it is."""
    if text is None or not text.strip():
        raise VocError(f"{where} has no <{field}> in its <bndbox>: a box needs xmin, ymin, xmax and ymax in "
                       f"pixels; add it or delete the object")
    try:
        value = float(text)
    except ValueError:
        raise VocError(f"{where}: <{field}> is {text.strip()!r}, not a number: write the pixel coordinate "
                       f"(1-based, like 48) or delete the object") from None
    if not math.isfinite(value):
        raise VocError(f"{where}: <{field}> is {text.strip()!r}, not a finite number: write the pixel coordinate "
                       f"or delete the object")
    return value


def read_xml(path):
    """One VOC annotation file -> (filename or None, (width, height) or None when <size> is absent or not
    positive, [(name, [xmin, ymin, xmax, ymax], difficult 0/1)]); VocError names the file, object and field at
    fault."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise VocError(f"{path} is not well-formed XML ({e}): the file is cut short or is not XML; export it "
                       f"again from the annotation tool, or delete it (and its id in the split lists)") from None
    except OSError as e:
        raise VocError(f"cannot read {path} ({e.strerror or e}): make it readable or delete it") from None
    if root.tag != "annotation":
        raise VocError(f"{path} is not a VOC annotation: its root element is <{root.tag}>, not <annotation>; "
                       f"export the file in Pascal VOC format, or move it out of the annotation folder")
    filename = (root.findtext("filename") or "").strip() or None
    try:
        w, h = (float(root.findtext(f"size/{k}")) for k in ("width", "height"))
        size = (int(w), int(h)) if math.isfinite(w + h) and w >= 1 and h >= 1 else None
    except (TypeError, ValueError):  # absent or not a number: the image file's header says it
        size = None
    objects = []
    for k, obj in enumerate(root.findall("object"), 1):
        name = (obj.findtext("name") or "").strip()
        where = f"{path}, object {k}" + (f" ({name})" if name else "")
        if not name:
            raise VocError(f"{where} has no <name>: every <object> needs its class name; add it or delete the "
                           f"object")
        box = obj.find("bndbox")
        if box is None:
            raise VocError(f"{where} has no <bndbox>: a box needs <bndbox> with xmin, ymin, xmax and ymax in "
                           f"pixels; add it or delete the object")
        x1, y1, x2, y2 = (_number(box.findtext(f), where, f) for f in ("xmin", "ymin", "xmax", "ymax"))
        for lo, hi, a, b in ((x1, x2, "xmin", "xmax"), (y1, y2, "ymin", "ymax")):
            if lo > hi:
                raise VocError(f"{where}: {a} {lo:g} > {b} {hi:g}, a box of negative size: the corners are "
                               f"swapped or mistyped; VOC wants {a} <= {b} (1-based pixels), fix them")
        difficult = (obj.findtext("difficult") or "").strip() or "0"
        if difficult not in ("0", "1"):
            raise VocError(f"{where}: <difficult> is {difficult!r}; it must be 0 or 1 (1: ignored by training "
                           f"and by the metric)")
        objects.append((name, [x1, y1, x2, y2], int(difficult)))
    return filename, size, objects


def _listing(folder, cache):
    """The file names in folder (cached; empty when it is not a folder)."""
    if folder not in cache:
        try:
            cache[folder] = sorted(os.listdir(folder))
        except OSError:
            cache[folder] = []
    return cache[folder]


def find_image(images, filename, xml, cache):
    """The image of one xml as a path relative to the images folder, and a note when <filename> did not name it
    exactly (absent, no or another extension: the file beside it with the same stem as <filename> or the xml)."""
    if filename and os.path.isfile(os.path.join(images, filename)):
        return filename, None
    sub = os.path.dirname(filename or "")
    base = os.path.basename(filename or "")  # "img_7" or "img_7.v2" (no extension) as well as "img_7.jpg"
    folder = os.path.join(images, sub) if sub else images
    pictures = [f for f in _listing(folder, cache) if os.path.splitext(f)[1].lower() in IMAGE_EXTS]
    found = []
    for stems in ({base, os.path.splitext(base)[0]} - {""}, {os.path.splitext(os.path.basename(xml))[0]}):
        found = found or [f for f in pictures if os.path.splitext(f)[0] in stems]  # <filename>'s name first
    said = f"<filename> {filename!r}" if filename else "no <filename>"
    if len(found) > 1:
        raise VocError(f"{xml} has {said}, and {folder} holds several images by that name ({', '.join(found)}): "
                       f"write the file's full name in <filename>")
    if not found:
        raise VocError(f"{xml} has {said}, and no image by that name (any of {', '.join(IMAGE_EXTS)}) is in "
                       f"{folder}: put the image there, correct <filename>, pass --images with the folder holding "
                       f"the images, or delete the xml")
    return os.path.join(sub, found[0]), f"{xml} has {said}: took {found[0]} (same name)"


def image_size(path, xml):
    """(width, height) from the image file's header, or VocError naming the file."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, Image.DecompressionBombError) as e:
        raise VocError(f"{xml}: its image {path} cannot be read ({e}): replace the file, or delete the xml (and "
                       f"its id in the split lists)") from None


def _layout_hint(voc):
    """The --annotations/--images options that would fit the folders under voc, as a phrase ('' if none)."""
    best = {}
    for sub in [".", *sorted(d for d in _listing(voc, {}) if os.path.isdir(os.path.join(voc, d)))]:
        files = _listing(os.path.join(voc, sub), {})
        for opt, exts in (("--annotations", (".xml",)), ("--images", IMAGE_EXTS)):
            n = sum(os.path.splitext(f)[1].lower() in exts for f in files)
            if n > best.get(opt, (0, ""))[0]:
                best[opt] = (n, sub)
    said = [f"{opt} {sub} ({n} {'xml' if opt == '--annotations' else 'image'} files there)"
            for opt, (n, sub) in best.items()]
    return f"; for {voc}, pass {' '.join(said)}" if said else ""


def check_folders(args):
    """(annotation folder, images folder, split lists folder), each checked to be a folder where one must be."""
    if not os.path.isdir(args.voc):
        raise VocError(f"{args.voc} is {'a file' if os.path.exists(args.voc) else 'missing'}: give the folder "
                       f"that holds the annotations and images ({LAYOUT})")
    ann, images, sets = (os.path.join(args.voc, d) for d in (args.annotations, args.images, args.sets))
    for folder, opt, what, default in ((ann, "--annotations", "annotation (xml)", "Annotations"),
                                       (images, "--images", "image", "JPEGImages")):
        if not os.path.isdir(folder):
            raise VocError(f"no {what} folder {folder}: voc2coco reads {LAYOUT} under {args.voc}; other folder "
                           f"names go in {opt} DIR (relative to {args.voc}; default {default})"
                           f"{_layout_hint(args.voc)}")
    if not any(f.lower().endswith(".xml") for f in _listing(ann, {})):
        raise VocError(f"the annotation folder {ann} holds no .xml file: pass --annotations with the folder of the "
                       f"VOC xml files{_layout_hint(args.voc)}")
    if os.path.exists(sets) and not os.path.isdir(sets):
        raise VocError(f"the split lists folder {sets} is a file: pass --sets with the folder of the {{split}}.txt "
                       f"lists")
    return ann, images, sets


def check_output(out, splits, images):
    """Refuse an output that cannot be written or would mix with other data, before anything is read."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise VocError(f"the output {out} is a file, not a folder: give a folder (it is made if missing)")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise VocError(f"the output {out} cannot be made: {parent} is a file; give another folder")
    for folder in (parent, os.path.join(out, "annotations")):
        if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
            raise VocError(f"the output folder {folder} is read-only: give a folder you can write in, or make it "
                           f"writable")
    if os.path.exists(os.path.join(out, "annotations")) and not os.path.isdir(os.path.join(out, "annotations")):
        raise VocError(f"{os.path.join(out, 'annotations')} is a file: the json files go into that folder; move the "
                       f"file or give another output folder")
    for split in splits:
        link, ann = os.path.join(out, split), os.path.join(out, "annotations", f"instances_{split}.json")
        if os.path.isdir(ann):
            raise VocError(f"{ann} is a folder: remove it, or give another output folder")
        reused = os.path.islink(link) and os.path.realpath(link) == os.path.realpath(images)  # an earlier run's
        if os.path.lexists(link) and not reused:
            raise VocError(f"{link} exists and is not a link to the images {images}: train.py would read the "
                           f"images of split {split} there; remove it or give another output folder")


def read_list(path):
    """[(line number, id)] of a split list, or VocError naming the file. Lists written on Windows read the same:
    a byte order mark (U+FEFF, anywhere) counts as whitespace, as do CR line ends, blank lines and trailing spaces."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = [(n, line.replace("\ufeff", " ").split()) for n, line in enumerate(f, 1)]
            rows = [(n, words[0]) for n, words in rows if words]
    except (OSError, UnicodeDecodeError) as e:
        raise VocError(f"cannot read the split list {path} ({getattr(e, 'strerror', None) or e}): it must be a "
                       f"text file with one image id (the xml's name without .xml) per line") from None
    if not rows:
        raise VocError(f"the split list {path} is empty: write one image id (the xml's name without .xml) per line")
    first = {}
    for n, i in rows:
        if i in first:
            raise VocError(f"the split list {path} names {i!r} twice (lines {first[i]} and {n}): the image would be "
                           f"listed twice; delete one line")
        first[i] = n
    return rows


def choose_splits(args, ann, sets, xmls):
    """{split: [xml stem]} and a line per split saying where its images come from."""
    lists = {s: os.path.join(sets, f"{s}.txt") for s in args.split}
    have = [s for s in args.split if os.path.isfile(lists[s])]
    n = len(xmls)
    if have and args.val_fraction is not None:
        raise VocError(f"--val-fraction makes a random split, but {lists[have[0]]} already lists the images of "
                       f"{have[0]}: drop --val-fraction to use the lists, or name splits without a list")
    if have and len(have) < len(args.split):
        missing = next(s for s in args.split if s not in have)
        raise VocError(f"no split list {lists[missing]}, while {lists[have[0]]} exists: name only splits that have "
                       f"a list, or write {lists[missing]} (one image id, the xml's name without .xml, per line)")
    if have:
        ids, said = {}, {}
        for s in args.split:
            rows = read_list(lists[s])
            gone = [(k, i) for k, i in rows if not os.path.isfile(os.path.join(ann, f"{i}.xml"))]
            if gone:
                k, i = gone[0]
                raise VocError(f"the split list {lists[s]} names {i!r} (line {k}), but {os.path.join(ann, i)}.xml "
                               f"is missing" + (f", as are the xml files of {len(gone) - 1} more of its ids"
                                                if len(gone) > 1 else "")
                               + f": restore the xml {'files' if len(gone) > 1 else 'file'}, or delete "
                               f"{'those lines' if len(gone) > 1 else 'the line'} from the list")
            ids[s], said[s] = [i for _, i in rows], f"the ids of {lists[s]}"
        for a in args.split:
            for b in args.split[args.split.index(a) + 1:]:
                common = sorted(set(ids[a]) & set(ids[b]))
                if common and not args.allow_overlap:
                    raise VocError(f"the split lists {lists[a]} and {lists[b]} share {_count(len(common), 'id')} "
                                   f"(e.g. {common[0]!r}): the same image would be in both splits, and a model "
                                   f"trained on one would be evaluated on images it has seen. VOC's train and "
                                   f"trainval overlap by design (trainval = train + val): convert trainval with "
                                   f"test, or train with val; pass --allow-overlap to convert overlapping lists "
                                   f"anyway (e.g. all of VOC's lists in one run)")
                if common:
                    said[b] += f" ({_count(len(common), 'image')} also in {a}: --allow-overlap)"
        return ids, said
    stems = [os.path.splitext(f)[0] for f in xmls]
    if args.val_fraction is None:
        if len(args.split) == 1:
            s = args.split[0]
            return {s: stems}, {s: f"all {_count(n, 'xml file')} of {ann} (no list {lists[s]})"}
        raise VocError(f"{len(args.split)} splits ({', '.join(args.split)}) but no split lists in {sets} (such as "
                       f"{lists[args.split[0]]}): each split would take every xml file, and the model would be "
                       f"evaluated on its own training images. Pass --val-fraction 0.2 to split the {n} xml files "
                       f"of {ann} at random into {args.split[0]} and {args.split[1]} (seeded by --seed), write the "
                       f"lists (one image id, the xml's name without .xml, per line), or convert one split")
    if len(args.split) != 2:
        raise VocError(f"--val-fraction splits the xml files into two: give two --split names (e.g. --split train "
                       f"--split val: the first gets the rest, the second the fraction), not {len(args.split)}")
    if n < 2:
        raise VocError(f"--val-fraction needs at least 2 xml files to split, and {ann} holds {n}")
    order = list(stems)
    random.Random(args.seed).shuffle(order)
    k = min(max(round(args.val_fraction * n), 1), n - 1)  # both splits keep an image
    a, b = args.split
    pick = f"of the {n} xml files of {ann}, drawn with --seed {args.seed} (--val-fraction {args.val_fraction:g})"
    return ({a: sorted(order[k:]), b: sorted(order[:k])},
            {a: f"{n - k} {pick}", b: f"{k} {pick}"})


def check_args(args):
    """Check the options that need no file; --classes becomes a list."""
    if args.split is None:
        args.split = ["train"]
    for s in args.split:
        if not s or s in (".", "..", "annotations") or "/" in s or os.sep in s:
            raise VocError(f"--split {s!r} cannot name a split: it becomes the file instances_{s}.json and the "
                           f"folder {s}/ of the output; use a plain name such as train, val or test")
    if len(set(args.split)) < len(args.split):
        raise VocError(f"--split names a split twice ({', '.join(args.split)}): name each once")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise VocError(f"--val-fraction {args.val_fraction:g} is not between 0 and 1: give the share of the images "
                       f"for the second split, such as 0.2")
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",")]
        if not all(classes) or len(set(classes)) < len(classes):
            raise VocError(f"--classes {args.classes!r} has an empty or repeated name: give the class names once "
                           f"each, comma-separated, in label order")
        args.classes = classes


def read_record(path, images, classes, cache, notes):
    """One xml of a split, checked against its image -> (image path relative to images, (width, height), [(name,
    [xmin, ymin, xmax, ymax] clipped to the image, difficult)]); what was taken or changed goes to notes."""
    filename, size, objects = read_xml(path)
    file, note = find_image(images, filename, path, cache)
    if note:
        notes.setdefault("filename", []).append(note)
    w, h = image_size(os.path.join(images, file), path)
    if size and size != (w, h):
        notes.setdefault("size", []).append(f"{path} says {size[0]}x{size[1]}, {file} is {w}x{h}")
    if not objects:
        notes.setdefault("empty", []).append(path)
    boxes = []
    for k, (name, (x1, y1, x2, y2), difficult) in enumerate(objects, 1):
        if classes is not None and name not in classes:
            raise VocError(f"{path}, object {k}: class {name!r} is not in --classes ({', '.join(classes)}): add it "
                           f"there or correct <name>")
        c = [max(x1, 1), max(y1, 1), min(x2, w), min(y2, h)]  # VOC pixels are 1..w, 1..h
        if c[0] > c[2] or c[1] > c[3]:
            raise VocError(f"{path}, object {k} ({name}): the box {x1:g},{y1:g},{x2:g},{y2:g} lies outside the "
                           f"{w}x{h} image {file} (VOC pixels 1..{w}, 1..{h}): the xml belongs to another image or "
                           f"its coordinates are wrong; fix them or delete the object")
        if c != [x1, y1, x2, y2]:
            notes.setdefault("clip", []).append(f"{path}, object {k}: {x1:g},{y1:g},{x2:g},{y2:g} -> "
                                                f"{c[0]:g},{c[1]:g},{c[2]:g},{c[3]:g}")
        if (c[0] == c[2] or c[1] == c[3]) and not difficult:
            notes.setdefault("zero", []).append(f"{path}, object {k} ({name}): {c[0]:g},{c[1]:g},{c[2]:g},{c[3]:g}")
        boxes.append((name, c, difficult))
    return file, (w, h), boxes


def read_all(paths, wanted, images, classes):
    """{id: read_record(...)} for the wanted ids, {id: (None, None, objects)} for the others (read for the class
    list only), and the notes; the faults of all files make one VocError, the first in full."""
    records, faults, notes, cache = {}, [], {}, {}
    for i, path in sorted(paths.items()):
        try:
            records[i] = (read_record(path, images, classes, cache, notes) if i in wanted
                          else (None, None, read_xml(path)[2]))
        except VocError as e:
            faults.append((path, str(e)))
    if faults:
        more = [p for p, _ in faults[1:]]
        raise VocError(faults[0][1] + (f". {_count(len(more), 'other file')} ha{'s' if len(more) == 1 else 've'} "
                                       f"faults too ({', '.join(more[:3])}{' ...' if len(more) > 3 else ''}): run "
                                       f"again after fixing this one to see theirs" if more else ""))
    return records, notes


def check_unique_images(args, ids, records, paths):
    """Refuse two xml files naming one image in a split, or in two splits unless --allow-overlap."""
    first = {}
    for s in args.split:
        for i in ids[s]:
            file = records[i][0]
            if (s, file) in first or (file in first and not args.allow_overlap):
                j, t = first.get((s, file)) or first[file]
                where = "in split " + s if t == s else f"in splits {t} and {s}"
                raise VocError(f"{paths[j]} and {paths[i]} both name the image {file} ({where}): it would be "
                               f"listed twice with different boxes; correct <filename> in the one copied from "
                               f"the other, or delete the duplicate")
            first[(s, file)] = (i, s)
            first.setdefault(file, (i, s))


def to_coco(split_ids, records, classes):
    """The COCO dict of one split: images numbered 1..N in the split's order, categories 1..K in classes' order."""
    cat_id = {name: k + 1 for k, name in enumerate(classes)}
    images, annotations = [], []
    for img_id, i in enumerate(split_ids, 1):
        file, (w, h), boxes = records[i]
        images.append({"id": img_id, "file_name": file, "width": w, "height": h})
        for name, (x1, y1, x2, y2), difficult in boxes:
            bw, bh = x2 - x1 + 1, y2 - y1 + 1
            annotations.append({"id": len(annotations) + 1, "image_id": img_id, "category_id": cat_id[name],
                                "bbox": [_num(x1 - 1), _num(y1 - 1), _num(bw), _num(bh)], "area": _num(bw * bh),
                                "iscrowd": difficult})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": k, "name": n} for n, k in cat_id.items()]}


NOTES = (("filename", "xml file", "with a <filename> that is not the image's name: the image with the same name was "
                                 "taken"),
         ("size", "image", "whose xml <size> differs from the file: the file's size is used, as train.py does"),
         ("clip", "box", "reaching outside the image, clipped to it"),
         ("zero", "box", "of zero size (xmin == xmax or ymin == ymax), written as 1 pixel wide or high as VOC counts "
                         "pixels: training drops it (no area after upstream's -1), the COCO metric keeps it as a "
                         "ground truth that only a box of its 1 pixel could match (a miss, lowering AP and "
                         "recall); fix or delete the object"),
         ("empty", "xml file", "without <object>, kept as an image without boxes (training skips such images, "
                               "evaluation counts detections on them)"))


def report(args, cocos, said, classes, notes, images):
    """What was written, from where, the class count to set, and each kind of note (the first three of each)."""
    for s, c in cocos.items():
        crowd = sum(a["iscrowd"] for a in c["annotations"])
        print(f"voc2coco: {s}: {_count(len(c['images']), 'image')}, {_count(len(c['annotations']), 'object')}"
              f"{f' ({crowd} difficult -> iscrowd)' if crowd else ''} from {said[s]} -> "
              f"{os.path.join(args.out, 'annotations', f'instances_{s}.json')}, images: {os.path.join(args.out, s)}"
              f" -> {images}")
    more = " ..." if len(classes) > 6 else ""
    print(f"voc2coco: {_count(len(classes), 'class')} ({', '.join(classes[:6])}{more}): set "
          f"num_classes={len(classes) + 1}")
    lower = {}
    for name in classes:
        lower.setdefault(name.lower(), []).append(name)
    for same in (v for v in lower.values() if len(v) > 1):
        print(f"voc2coco: note: classes {' and '.join(map(repr, same))} differ only in case and are separate "
              f"classes: correct <name> or pass --classes if they are one")
    for key, noun, what in NOTES:
        items = notes.get(key, [])
        if items:
            print(f"voc2coco: note: {_count(len(items), noun)} {what}: {'; '.join(items[:3])}"
                  f"{' ...' if len(items) > 3 else ''}")
    if len(args.split) > 1:
        print(f"voc2coco: then: python train.py --config demo data_root={args.out} train_split={args.split[0]} "
              f"val_split={args.split[1]} num_classes={len(classes) + 1} output_dir=output/"
              f"{os.path.basename(os.path.normpath(args.out))}")


def convert(args):
    """Check every option, path, list, xml and image, then write; returns {split: COCO dict}."""
    ann, images, sets = check_folders(args)
    check_output(args.out, args.split, images)
    # not the ._name.xml companions macOS leaves on copied folders
    xmls = sorted(f for f in _listing(ann, {}) if f.lower().endswith(".xml") and not f.startswith("."))
    ids, said = choose_splits(args, ann, sets, xmls)
    wanted = {i for s in args.split for i in ids[s]}
    found = {os.path.splitext(f)[0]: os.path.join(ann, f) for f in xmls}  # also r0.XML
    paths = {i: found.get(i, os.path.join(ann, f"{i}.xml")) for i in wanted}
    if args.classes is None:  # one class list for every split and every run: all files of the folder
        paths.update(found)
    records, notes = read_all(paths, wanted, images, args.classes)
    check_unique_images(args, ids, records, paths)
    classes = args.classes or sorted({name for _, _, objs in records.values() for name, _, _ in objs})
    if not classes:
        raise VocError(f"no <object> in any xml file of {ann}: there is nothing to detect; annotate the images "
                       f"first")
    cocos = {s: to_coco(ids[s], records, classes) for s in args.split}
    write(args.out, cocos, images)
    report(args, cocos, said, classes, notes, images)
    return cocos


def _num(v):
    """A coordinate for the json: an int when it is one (VOC writes integers), else the float."""
    return int(v) if float(v).is_integer() else v


def write(out, cocos, images):
    """out/annotations/instances_{split}.json for each split and the out/{split} links to the images; a failure
    removes what this call made (a json replaced by this run stays replaced only when all were written)."""
    made, temps, target = [], [], out
    top = os.path.abspath(os.path.join(out, "annotations"))
    while not os.path.exists(os.path.dirname(top)):
        top = os.path.dirname(top)
    try:
        if not os.path.exists(top):
            made.append(top)  # the first folder this call makes: everything under it is this call's
        os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
        for s, coco in cocos.items():  # temporary files first: a full disk fails here, before any rename
            target = os.path.join(out, "annotations", f".instances_{s}.json.{os.getpid()}.tmp")
            temps.append(target)
            with open(target, "w") as f:  # open, unlike mkstemp, gives the umask's permissions
                json.dump(coco, f, allow_nan=False)
        for s in cocos:
            target = os.path.join(out, s)
            if not os.path.lexists(target):
                os.symlink(os.path.relpath(images, out), target)
                made.append(target)
        for s, tmp in zip(cocos, temps):
            target = os.path.join(out, "annotations", f"instances_{s}.json")
            os.replace(tmp, target)
        temps = []
    except BaseException as e:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
        for path in reversed(made):
            if os.path.islink(path) or not os.path.isdir(path):
                os.remove(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
        if isinstance(e, OSError):
            raise VocError(f"cannot write {e.filename or target} ({e.strerror or e}): free space or give another "
                           f"output folder; nothing was left behind") from None
        raise


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("voc", help="the dataset folder (VOCdevkit/VOC2007, or one holding your own folders)")
    p.add_argument("out", help="the COCO-layout data_root to write (made if missing)")
    p.add_argument("--split", action="append", default=None,
                   help="split name, repeatable (default: train); its images are the ids of SETS/NAME.txt")
    p.add_argument("--images", default="JPEGImages", help="image folder, relative to voc (default: JPEGImages)")
    p.add_argument("--annotations", default="Annotations",
                   help="xml folder, relative to voc (default: Annotations)")
    p.add_argument("--sets", default=os.path.join("ImageSets", "Main"),
                   help="split lists folder, relative to voc (default: ImageSets/Main)")
    p.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="without lists: split the xml files at random, the second --split gets this share")
    p.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction split (default: 0)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="convert split lists that share images (such as VOC's train and trainval)")
    p.add_argument("--classes", default=None, help="comma-separated class names in label order (default: sorted)")
    args = p.parse_args(argv)
    try:
        check_args(args)
        return convert(args)
    except VocError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
