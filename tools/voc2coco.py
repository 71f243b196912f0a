"""Convert a Pascal VOC folder (JPEGImages/, Annotations/*.xml, optionally ImageSets/Main/{split}.txt) into the
COCO layout that train.py and evaluate.py read:

    python voc2coco.py VOCdevkit/VOC2007 datasets/voc07 --split trainval --split test
    # -> datasets/voc07/annotations/instances_{trainval,test}.json, and datasets/voc07/{split} linking to
    #    VOC2007/JPEGImages; then: python train.py ... data_root=datasets/voc07 train_split=trainval
    #    val_split=test num_classes=21

Without ImageSets/Main/{split}.txt every xml file of Annotations/ is taken. Boxes: VOC's corners are 1-based and
inclusive; upstream subtracts 1 (maskrcnn_benchmark/data/datasets/voc.py, TO_REMOVE), so COCO's
[x, y, w, h] here is [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1] (the legacy +1 width). Objects marked
difficult become iscrowd=1: ignored by training, as upstream's VOC reader drops them, and by the COCO metric.
Classes are the object names found, sorted (category ids 1..K), unless --classes gives them in order.
"""
import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET

from PIL import Image


def read_xml(path):
    """(file name, width, height, [(name, [xmin, ymin, xmax, ymax], difficult)]) of one VOC annotation."""
    root = ET.parse(path).getroot()
    size = root.find("size")
    w, h = (int(float(size.findtext(k))) for k in ("width", "height")) if size is not None else (0, 0)
    objects = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        coords = [float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        objects.append((obj.findtext("name").strip(), coords, int(obj.findtext("difficult") or 0)))
    return root.findtext("filename"), w, h, objects


def convert(voc, out, split, classes):
    """Write out/annotations/instances_{split}.json (categories: classes, ids 1..K) and the out/{split} link;
    returns the json's dict."""
    ids_file = os.path.join(voc, "ImageSets", "Main", f"{split}.txt")
    if os.path.isfile(ids_file):
        ids = [line.split()[0] for line in open(ids_file) if line.strip()]
    else:
        ids = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(voc, "Annotations")) if f.endswith(".xml"))
    parsed = [read_xml(os.path.join(voc, "Annotations", f"{i}.xml")) for i in ids]
    cat_id = {name: k + 1 for k, name in enumerate(classes)}
    images, annotations = [], []
    for img_id, (i, (file_name, w, h, objects)) in enumerate(zip(ids, parsed), 1):
        file_name = file_name or f"{i}.jpg"
        if not (w and h):  # some tools leave <size> out or at 0: read the file's header
            w, h = Image.open(os.path.join(voc, "JPEGImages", file_name)).size
        images.append({"id": img_id, "file_name": file_name, "width": w, "height": h})
        for name, (x1, y1, x2, y2), difficult in objects:
            if name not in cat_id:
                sys.exit(f"voc2coco: {i}.xml has class {name!r}, which --classes does not list")
            bw, bh = x2 - x1 + 1, y2 - y1 + 1
            annotations.append({"id": len(annotations) + 1, "image_id": img_id, "category_id": cat_id[name],
                                "bbox": [x1 - 1, y1 - 1, bw, bh], "area": bw * bh, "iscrowd": difficult})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": k, "name": n} for n, k in cat_id.items()]}
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(coco, f)
    link = os.path.join(out, split)
    if not os.path.lexists(link):
        os.symlink(os.path.relpath(os.path.join(voc, "JPEGImages"), out), link)
    print(f"voc2coco: {split}: {len(images)} images, {len(annotations)} objects, {len(classes)} classes "
          f"({', '.join(classes[:6])}{' ...' if len(classes) > 6 else ''}) -> {out}; "
          f"set num_classes={len(classes) + 1}")
    return coco


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("voc", help="the VOC folder (holding JPEGImages/ and Annotations/)")
    p.add_argument("out", help="the COCO-layout data_root to write")
    p.add_argument("--split", action="append", default=None, help="split name (ImageSets/Main/NAME.txt), repeatable"
                   " (default: 'train', all annotations)")
    p.add_argument("--classes", default=None, help="comma-separated class names in label order (default: sorted)")
    args = p.parse_args(argv)
    xmls = sorted(f for f in os.listdir(os.path.join(args.voc, "Annotations")) if f.endswith(".xml"))
    classes = args.classes.split(",") if args.classes else sorted(  # one class list for every split
        {name for f in xmls for name, _, _ in read_xml(os.path.join(args.voc, "Annotations", f))[3]})
    for split in args.split or ["train"]:
        convert(args.voc, args.out, split, classes)

if __name__ == "__main__":
    main()
