"""tools/voc2coco.py: VOC folders (VOC's own layout and a newcomer's images/ + annotations/) convert to the COCO
layout that data.py and pycocotools read, boxes as worked out by hand; every fault in an xml, a list, an image, a
path or an option stops the run with one paragraph naming the file and field, exit code 2, no traceback and no
output left behind."""
import json
import os
import re
import sys

import pytest
from PIL import Image
from pycocotools.coco import COCO

import config
import data
import voc2coco
from conftest import run, script, unwritable

W, H = 40, 30
BOX = (5, 7, 14, 20)  # VOC corners: COCO [4, 6, 10, 14]


def voc_xml(filename, objects=(("raccoon", BOX, 0),), size=(W, H)):
    """A VOC annotation's text; objects: [(name, (xmin, ymin, xmax, ymax), difficult)]."""
    parts = ["<annotation>\n  <folder>images</folder>\n"]
    if filename is not None:
        parts.append(f"  <filename>{filename}</filename>\n")
    if size:
        parts.append(f"  <size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>\n")
    for name, box, difficult in objects:
        corners = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        parts.append(f"  <object><name>{name}</name><pose>Unspecified</pose><difficult>{difficult}</difficult>"
                     f"<bndbox>{corners}</bndbox></object>\n")
    return "".join(parts) + "</annotation>\n"


def make_set(root, n=4, images="JPEGImages", annotations="Annotations", lists=None):
    """root/{images}/r{i}.jpg (W x H) and root/{annotations}/r{i}.xml with one box BOX; lists: {split: [ids]}
    written to root/ImageSets/Main/{split}.txt. Returns root as a string."""
    os.makedirs(os.path.join(root, images), exist_ok=True)
    os.makedirs(os.path.join(root, annotations), exist_ok=True)
    for i in range(n):
        Image.new("RGB", (W, H), (20 * i, 90, 0)).save(os.path.join(root, images, f"r{i}.jpg"))
        write(os.path.join(root, annotations, f"r{i}.xml"), voc_xml(f"r{i}.jpg"))
    for split, ids in (lists or {}).items():
        write(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "".join(f"{i}\n" for i in ids))
    return str(root)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def convert(capsys, *argv):
    """voc2coco.main(argv) -> (exit code, stdout, stderr)."""
    try:
        voc2coco.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(capsys, out, *argv):
    """Run a conversion that must fail: exit code 2, one 'error:' paragraph on stderr, nothing written to out;
    returns the paragraph."""
    code, printed, err = convert(capsys, *argv, out)
    assert code == 2, (printed, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and not printed
    assert not os.path.lexists(out), os.listdir(out)
    return err


def load(out, split):
    with open(os.path.join(out, "annotations", f"instances_{split}.json")) as f:
        return json.load(f)


def test_newcomer_layout_val_fraction_splits_disjoint_and_complete(tmp_path, capsys):
    src = make_set(tmp_path / "raccoon_src", n=10, images="images", annotations="annotations")
    write(os.path.join(src, "annotations", "._r0.xml"), "\x00\x05\x16\x07")  # macOS's companion file: skipped
    out = str(tmp_path / "raccoon")
    code, printed, err = convert(capsys, src, out, "--images", "images", "--annotations", "annotations",
                                 "--split", "train", "--split", "val", "--val-fraction", "0.2")
    assert code == 0 and not err, err
    train, val = ({img["file_name"] for img in load(out, s)["images"]} for s in ("train", "val"))
    assert not train & val and train | val == {f"r{i}.jpg" for i in range(10)}
    assert (len(train), len(val)) == (8, 2)
    assert "train: 8 images" in printed and "val: 2 images" in printed and "--seed 0" in printed
    assert "num_classes=2" in printed
    for split in ("train", "val"):  # each split's folder shows the images its json names
        assert os.path.islink(os.path.join(out, split))
        assert all(os.path.isfile(os.path.join(out, split, f)) for f in (train if split == "train" else val))
    again = str(tmp_path / "again")
    convert(capsys, src, again, "--images", "images", "--annotations", "annotations", "--split", "train",
            "--split", "val", "--val-fraction", "0.2")
    assert load(again, "val") == load(out, "val")  # the same seed draws the same split


def test_boxes_classes_and_difficult_as_worked_out_by_hand(tmp_path, capsys):
    src = make_set(tmp_path / "voc", n=1)
    write(os.path.join(src, "Annotations", "r0.xml"),
          voc_xml("r0.jpg", [("zebra", BOX, 0), ("ant", (1, 1, 40, 30), 1), ("zebra", (3, 4, 3, 4), 0)]))
    out = str(tmp_path / "out")
    code, printed, err = convert(capsys, src, out)
    assert code == 0 and not err, err
    coco = load(out, "train")
    assert coco["categories"] == [{"id": 1, "name": "ant"}, {"id": 2, "name": "zebra"}]
    assert coco["images"] == [{"id": 1, "file_name": "r0.jpg", "width": W, "height": H}]
    # [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]: 5-1, 7-1, 14-5+1, 20-7+1; a 1-pixel box is 1 x 1
    assert [(a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in coco["annotations"]] == [
        (2, [4, 6, 10, 14], 140, 0), (1, [0, 0, 40, 30], 1200, 1), (2, [2, 3, 1, 1], 1, 0)]
    assert "1 difficult -> iscrowd" in printed and "set num_classes=3" in printed
    cocoapi = COCO(os.path.join(out, "annotations", "instances_train.json"))  # pycocotools reads it
    assert len(cocoapi.getAnnIds(imgIds=[1], iscrowd=False)) == 2


def test_product_reads_the_output(tmp_path, capsys):
    src = make_set(tmp_path / "voc", n=4, lists={"trainval": ["r0", "r2", "r3"], "test": ["r1"]})
    out = str(tmp_path / "out")
    code, printed, err = convert(capsys, src, out, "--split", "trainval", "--split", "test")
    assert code == 0 and not err, err
    assert "trainval: 3 images" in printed and "ImageSets/Main/trainval.txt" in printed
    assert [img["file_name"] for img in load(out, "trainval")["images"]] == ["r0.jpg", "r2.jpg", "r3.jpg"]
    cfg = config.get("demo", [f"data_root={out}", "num_classes=2", "min_size_train=(30,)", "max_size_train=64",
                              "num_workers=0"], verbose=False)
    ds = data.CocoDetection(out, "trainval", cfg, train=True)
    image, target, _ = ds[0]
    assert len(ds) == 3 and ds.names == ["__background__", "raccoon"] and image.shape[0] == 3
    assert target["labels"].tolist() == [1]
    assert data.CocoDetection(out, "test", cfg, train=False).files[0] == "r1.jpg"


def test_rerun_reuses_the_links(tmp_path, capsys):
    src, out = make_set(tmp_path / "voc", n=2), str(tmp_path / "out")
    assert convert(capsys, src, out)[0] == 0
    write(os.path.join(src, "Annotations", "r1.xml"), voc_xml("r1.jpg", [("raccoon", BOX, 0)] * 2))
    assert convert(capsys, src, out)[0] == 0
    assert len(load(out, "train")["annotations"]) == 3


def test_filename_in_subfolder_uppercase_wrong_or_no_extension(tmp_path, capsys):
    src = make_set(tmp_path / "voc", n=4)
    os.makedirs(os.path.join(src, "JPEGImages", "cam"))
    os.rename(os.path.join(src, "JPEGImages", "r0.jpg"), os.path.join(src, "JPEGImages", "cam", "R0.JPG"))
    write(os.path.join(src, "Annotations", "r0.xml"), voc_xml("cam/R0.JPG"))
    write(os.path.join(src, "Annotations", "r1.xml"), voc_xml("r1"))  # no extension
    write(os.path.join(src, "Annotations", "r2.xml"), voc_xml("r2.png"))  # the wrong one
    write(os.path.join(src, "Annotations", "r3.xml"), voc_xml(None, size=None))  # neither <filename> nor <size>
    out = str(tmp_path / "out")
    code, printed, err = convert(capsys, src, out)
    assert code == 0 and not err, err
    images = load(out, "train")["images"]
    assert [(i["file_name"], i["width"], i["height"]) for i in images] == [
        ("cam/R0.JPG", W, H), ("r1.jpg", W, H), ("r2.jpg", W, H), ("r3.jpg", W, H)]
    note = next(line for line in printed.splitlines() if "<filename>" in line)
    assert note.startswith("voc2coco: note: 3 xml files") and "r2.png" in note and "took r2.jpg" in note


def test_filename_without_extension_matching_two_images_is_refused(tmp_path, capsys):
    src = make_set(tmp_path / "voc", n=2)
    Image.new("RGB", (W, H)).save(os.path.join(src, "JPEGImages", "r1.png"))
    write(os.path.join(src, "Annotations", "r1.xml"), voc_xml("r1"))
    err = refused(capsys, str(tmp_path / "out"), src)
    assert "r1.xml has <filename> 'r1'" in err and "several images by that name (r1.jpg, r1.png)" in err


def test_box_reaching_outside_is_clipped_and_said(tmp_path, capsys):
    src = make_set(tmp_path / "voc", n=1)
    write(os.path.join(src, "Annotations", "r0.xml"), voc_xml("r0.jpg", [("raccoon", (0, 2, 45, 30), 0)]))
    out = str(tmp_path / "out")
    code, printed, err = convert(capsys, src, out)
    assert code == 0 and not err
    assert load(out, "train")["annotations"][0]["bbox"] == [0, 1, 40, 29]  # corners 1..40, 2..30
    assert "1 box reaching outside the image, clipped to it" in printed and "0,2,45,30 -> 1,2,40,30" in printed


def test_zero_size_boxes_are_named(tmp_path, capsys):
    src = make_set(tmp_path / "voc", n=2)
    write(os.path.join(src, "Annotations", "r1.xml"), voc_xml("r1.jpg", [
        ("raccoon", BOX, 0), ("cell", (9, 9, 9, 9), 0), ("cell", (3, 4, 8, 4), 0), ("cell", (6, 6, 6, 6), 1)]))
    out = str(tmp_path / "out")
    code, printed, err = convert(capsys, src, out)
    assert code == 0 and not err
    assert [a["bbox"] for a in load(out, "train")["annotations"]][2:4] == [[8, 8, 1, 1], [2, 3, 6, 1]]
    xml = os.path.join(src, "Annotations", "r1.xml")
    assert re.search(r"note: 2 boxes of zero size \(xmin == xmax or ymin == ymax\).*training drops it", printed)
    assert f"{xml}, object 2 (cell): 9,9,9,9; {xml}, object 3 (cell): 3,4,8,4\n" in printed  # not the difficult one
    ds = data.CocoDetection(out, "train", config.get("demo", [f"data_root={out}", "train_split=train"],
                                                     verbose=False), True)
    assert len(ds.boxes[ds.ids.index(2)]) == 1 and any("without positive area" in n for n in ds.notes), ds.notes


def test_lists_and_xml_written_on_windows(tmp_path, capsys):
    """UTF-8 byte order marks, CRLF line ends, blank lines and trailing spaces read as on Linux."""
    src = make_set(tmp_path / "voc", n=3)
    for split, ids in (("train", ["r0", "r1"]), ("val", ["r2"])):
        path = os.path.join(src, "ImageSets", "Main", f"{split}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:  # as Notepad saves it
            f.write(b"\xef\xbb\xbf" + b"".join(i.encode() + b" \t \r\n\r\n" for i in ids))
    with open(os.path.join(src, "Annotations", "r1.xml"), "wb") as f:
        f.write(b"\xef\xbb\xbf" + voc_xml("r1.jpg ").replace("\n", "\r\n").encode())
    out = str(tmp_path / "out")
    code, printed, err = convert(capsys, src, out, "--split", "train", "--split", "val")
    assert code == 0, err
    assert [i["file_name"] for i in load(out, "train")["images"]] == ["r0.jpg", "r1.jpg"]
    assert [i["file_name"] for i in load(out, "val")["images"]] == ["r2.jpg"]
    assert load(out, "train")["annotations"][1]["bbox"] == [4, 6, 10, 14] and "note" not in printed


def test_xml_without_objects_is_kept_and_said(tmp_path, capsys):
    src = make_set(tmp_path / "voc", n=2)
    write(os.path.join(src, "Annotations", "r1.xml"), voc_xml("r1.jpg", objects=()))
    out = str(tmp_path / "out")
    code, printed, _ = convert(capsys, src, out)
    assert code == 0 and len(load(out, "train")["images"]) == 2
    assert "1 xml file without <object>" in printed and "r1.xml" in printed


def test_overlapping_lists_pass_with_allow_overlap(tmp_path, capsys):
    src = make_set(tmp_path / "voc", n=3, lists={"train": ["r0"], "trainval": ["r0", "r1"]})
    out = str(tmp_path / "out")
    code, printed, _ = convert(capsys, src, out, "--split", "train", "--split", "trainval", "--allow-overlap")
    assert code == 0 and "1 image also in train" in printed
    assert len(load(out, "trainval")["images"]) == 2


def good_xml():
    return voc_xml("r1.jpg", [("raccoon", BOX, 0), ("raccoon", (2, 3, 30, 25), 0)])


# (fault, text of r1.xml, words the paragraph must hold besides r1.xml's path)
XML_FAULTS = [
    ("cut short", good_xml()[:150], ["not well-formed XML", "line"]),
    ("empty file", "", ["not well-formed XML"]),
    ("not VOC", "<coco><images/></coco>", ["not a VOC annotation", "<coco>"]),
    ("no name", good_xml().replace("<name>raccoon</name>", "", 1), ["object 1", "no <name>"]),
    ("no bndbox", re.sub(r"<bndbox>.*?</bndbox>", "", good_xml(), count=1), ["object 1 (raccoon)", "no <bndbox>"]),
    ("no ymax", good_xml().replace("<ymax>25</ymax>", ""), ["object 2 (raccoon)", "no <ymax>"]),
    ("not a number", good_xml().replace("<xmin>2</xmin>", "<xmin>2px</xmin>"), ["object 2", "<xmin>", "'2px'"]),
    ("nan", good_xml().replace("<ymin>3</ymin>", "<ymin>nan</ymin>"), ["object 2", "<ymin>", "not a finite"]),
    ("inf", good_xml().replace("<xmax>30</xmax>", "<xmax>inf</xmax>"), ["object 2", "<xmax>", "not a finite"]),
    ("xmin > xmax", voc_xml("r1.jpg", [("raccoon", (30, 3, 10, 25), 0)]), ["object 1", "xmin 30 > xmax 10"]),
    ("ymin > ymax", voc_xml("r1.jpg", [("raccoon", (2, 25, 10, 3), 0)]), ["object 1", "ymin 25 > ymax 3"]),
    ("box outside", voc_xml("r1.jpg", [("raccoon", (50, 3, 60, 25), 0)]), ["object 1", "outside the 40x30 image"]),
    ("difficult", voc_xml("r1.jpg", [("raccoon", BOX, "yes")]), ["object 1", "<difficult> is 'yes'", "0 or 1"]),
    ("image missing", voc_xml("gone.jpg"), ["'gone.jpg'", "no image by that name", "--images"]),
]


@pytest.mark.parametrize("fault,text,words", XML_FAULTS, ids=[f[0] for f in XML_FAULTS])
def test_every_xml_fault_is_one_paragraph(tmp_path, capsys, fault, text, words):
    src = make_set(tmp_path / "voc", n=3)
    write(os.path.join(src, "Annotations", "r1.xml"), text)
    if fault == "image missing":  # else r1.jpg, by the xml's name, would be taken
        os.remove(os.path.join(src, "JPEGImages", "r1.jpg"))
    err = refused(capsys, str(tmp_path / "out"), src)
    for word in [os.path.join(src, "Annotations", "r1.xml"), *words]:
        assert word in err, (word, err)


@pytest.mark.parametrize("size", [None, (0, 0)], ids=["no size", "size 0"])
def test_unreadable_image_is_named(tmp_path, capsys, size):
    src = make_set(tmp_path / "voc", n=2)
    write(os.path.join(src, "Annotations", "r1.xml"), voc_xml("r1.jpg", size=size))
    write(os.path.join(src, "JPEGImages", "r1.jpg"), "not a jpeg")
    err = refused(capsys, str(tmp_path / "out"), src)
    assert "r1.xml: its image" in err and os.path.join(src, "JPEGImages", "r1.jpg") in err and "cannot be read" in err


def test_faults_in_several_files_name_the_first_and_count_the_rest(tmp_path, capsys):
    src = make_set(tmp_path / "voc", n=4)
    for i in (1, 2, 3):
        write(os.path.join(src, "Annotations", f"r{i}.xml"), voc_xml(f"r{i}.jpg", [("raccoon", (9, 1, 2, 5), 0)]))
    err = refused(capsys, str(tmp_path / "out"), src)
    assert "r1.xml, object 1" in err and "2 other files have faults too" in err and "r3.xml" in err


def test_class_outside_classes_and_two_xml_for_one_image(tmp_path, capsys):
    src = make_set(tmp_path / "voc", n=3)
    out = str(tmp_path / "out")
    err = refused(capsys, out, src, "--classes", "dog,cat")
    assert "r0.xml, object 1: class 'raccoon' is not in --classes (dog, cat)" in err
    write(os.path.join(src, "Annotations", "r2.xml"), voc_xml("r1.jpg"))  # copied, <filename> left as it was
    err = refused(capsys, out, src)
    assert "r1.xml and" in err and "r2.xml both name the image r1.jpg" in err


def test_path_faults(tmp_path, capsys):
    src, out = make_set(tmp_path / "voc", n=2), str(tmp_path / "out")
    assert "is missing" in refused(capsys, out, tmp_path / "nowhere")
    write(str(tmp_path / "file"), "x")
    assert f"{tmp_path / 'file'} is a file" in refused(capsys, out, tmp_path / "file")
    err = refused(capsys, out, src, "--images", "photos")
    assert f"no image folder {os.path.join(src, 'photos')}" in err and "--images JPEGImages" in err
    os.makedirs(os.path.join(src, "empty"))
    assert "holds no .xml file" in refused(capsys, out, src, "--annotations", "empty")
    assert "cannot be made" in refused(capsys, tmp_path / "file" / "out", src)
    write(os.path.join(src, "lists"), "r0\n")
    assert f"the split lists folder {os.path.join(src, 'lists')} is a file" in refused(capsys, out, src, "--sets",
                                                                                        "lists")


def test_output_that_is_a_file_or_read_only_or_taken(tmp_path, capsys, monkeypatch):
    src = make_set(tmp_path / "voc", n=2)
    write(str(tmp_path / "file"), "mine")
    code, printed, err = convert(capsys, src, tmp_path / "file")
    assert code == 2 and "the output" in err and "is a file" in err and (tmp_path / "file").read_text() == "mine"
    taken = tmp_path / "taken"
    os.makedirs(taken / "train")
    code, _, err = convert(capsys, src, taken)
    assert code == 2 and f"{taken / 'train'} exists and is not a link to the images" in err
    assert os.listdir(taken) == ["train"] and not os.listdir(taken / "train")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a non-root user on a read-only folder
    err = refused(capsys, str(tmp_path / "out"), src)
    assert f"the output folder {tmp_path} is read-only" in err


def test_read_only_output_folder(tmp_path, capsys):
    src, locked = make_set(tmp_path / "voc", n=2), tmp_path / "locked"
    os.makedirs(locked)
    with unwritable(locked):
        assert "is read-only" in refused(capsys, str(locked / "out"), src)


def test_write_failure_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    src = make_set(tmp_path / "voc", n=4, lists={"train": ["r0", "r1"], "val": ["r2"]})
    dumped, real_dump = [], json.dump

    def full_disk(obj, f, **kw):
        """json.dump that fails on the second file, as on a full disk."""
        dumped.append(obj)
        if len(dumped) == 2:
            raise OSError(28, "No space left on device", f.name)
        real_dump(obj, f, **kw)

    monkeypatch.setattr(voc2coco.json, "dump", full_disk)
    err = refused(capsys, str(tmp_path / "new" / "out"), src, "--split", "train", "--split", "val")
    assert "No space left on device" in err and "nothing was left behind" in err
    assert not os.path.exists(tmp_path / "new")
    os.makedirs(tmp_path / "kept" / "annotations")
    write(str(tmp_path / "kept" / "notes.txt"), "mine")
    dumped.clear()
    code, _, err = convert(capsys, src, tmp_path / "kept", "--split", "train", "--split", "val")
    assert code == 2 and sorted(os.listdir(tmp_path / "kept")) == ["annotations", "notes.txt"]
    assert not os.listdir(tmp_path / "kept" / "annotations")


def test_split_list_faults(tmp_path, capsys):
    src, out = make_set(tmp_path / "voc", n=3, lists={"train": ["r0", "r7", "r1", "r8"]}), str(tmp_path / "out")
    lst = os.path.join(src, "ImageSets", "Main", "train.txt")
    err = refused(capsys, out, src, "--split", "train")
    assert f"the split list {lst} names 'r7' (line 2)" in err and os.path.join(src, "Annotations", "r7.xml") in err
    assert "1 more of its ids" in err
    write(lst, "r0\nr1\nr0\n")
    assert "names 'r0' twice (lines 1 and 3)" in refused(capsys, out, src, "--split", "train")
    write(lst, "\n\n")
    assert f"the split list {lst} is empty" in refused(capsys, out, src, "--split", "train")
    with open(lst, "wb") as f:
        f.write(b"\xff\xfe\x00r0")
    assert f"cannot read the split list {lst}" in refused(capsys, out, src, "--split", "train")


def test_split_choice_faults(tmp_path, capsys):
    src = make_set(tmp_path / "voc", n=3, lists={"train": ["r0"], "trainval": ["r0", "r1"]})
    out = str(tmp_path / "out")
    err = refused(capsys, out, src, "--split", "train", "--split", "trainval")
    assert "share 1 id (e.g. 'r0')" in err and "trainval = train + val" in err and "--allow-overlap" in err
    err = refused(capsys, out, src, "--split", "train", "--split", "test")
    assert f"no split list {os.path.join(src, 'ImageSets', 'Main', 'test.txt')}" in err
    err = refused(capsys, out, src, "--split", "train", "--split", "val", "--val-fraction", "0.5")
    assert "--val-fraction makes a random split, but" in err and "train.txt already lists" in err
    bare = make_set(tmp_path / "bare", n=3)
    err = refused(capsys, out, bare, "--split", "train", "--split", "val", "--val-fraction", "0.5", "--split", "x")
    assert "give two --split names" in err
    assert "give two --split names" in refused(capsys, out, bare, "--val-fraction", "0.5")
    assert "not between 0 and 1" in refused(capsys, out, bare, "--split", "a", "--split", "b", "--val-fraction", "1")
    assert "name each once" in refused(capsys, out, bare, "--split", "a", "--split", "a")
    assert "cannot name a split" in refused(capsys, out, bare, "--split", "annotations")
    assert "empty or repeated name" in refused(capsys, out, bare, "--classes", "a,,b")


# The rows of the issue and the newcomer's run, as a user runs them: a process, its exit code and stderr.
ISSUE_ROWS = [
    ("cut short", lambda src: write(os.path.join(src, "Annotations", "r1.xml"), good_xml()[:120]), [],
     ["r1.xml is not well-formed XML"]),
    ("no bndbox", lambda src: write(os.path.join(src, "Annotations", "r1.xml"),
                                    re.sub(r"<bndbox>.*?</bndbox>", "", good_xml())), [], ["has no <bndbox>"]),
    ("xmin > xmax", lambda src: write(os.path.join(src, "Annotations", "r1.xml"),
                                      voc_xml("r1.jpg", [("raccoon", (20, 3, 10, 9), 0)])), [], ["xmin 20 > xmax 10"]),
    ("list id without xml", lambda src: write(os.path.join(src, "ImageSets", "Main", "train.txt"), "r0\nr9\n"),
     [], ["names 'r9' (line 2)", "r9.xml is missing"]),
    ("newcomer folders", lambda src: os.rename(os.path.join(src, "Annotations"), os.path.join(src, "annotations")),
     ["--split", "train", "--split", "val"], ["no annotation (xml) folder", "--annotations annotations"]),
    ("no lists, two splits", lambda src: None, ["--split", "train", "--split", "val"],
     ["no split lists", "--val-fraction 0.2"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("row,spoil,options,words", ISSUE_ROWS, ids=[r[0] for r in ISSUE_ROWS])
def test_issue_rows_in_a_process(tmp_path, row, spoil, options, words):
    src, out = make_set(tmp_path / "voc", n=3), str(tmp_path / "out")
    spoil(src)
    done = run(script(os.path.join("tools", "voc2coco.py"), src, out, *options), timeout=120)
    assert done.returncode == 2 and not done.stdout, (done.stdout, done.stderr)
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert all(word in done.stderr for word in words), done.stderr
    assert not os.path.lexists(out)


def test_tool_imports_nothing_of_the_repository():
    with open(voc2coco.__file__) as f:
        imported = {m for line in f for m in re.findall(r"^(?:from|import) (\w+)", line)}
    assert imported <= set(sys.stdlib_module_names) | {"PIL"}, imported
