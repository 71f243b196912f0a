"""Data: COCO-format datasets, upstream's transforms (maskrcnn-benchmark, ../shared/spec section 3.1 and 5),
batching, samplers, and the built-in demo data set.

Test-time preprocessing, used by evaluate.py and by anyone feeding the model:
    img = load_image(path)                                   # PIL RGB, raw pixel grid
    w, h = resize_size(*img.size, cfg.min_size_test, cfg.max_size_test)
    x = to_model_tensor(img.resize((w, h), Image.BILINEAR), cfg.pixel_mean)   # (3, h, w) BGR 0..255 - mean
    batch, image_sizes = pad_batch([x], cfg.size_divisibility)                 # (1, 3, Hp, Wp), [(h, w)]
"""
import numpy as np
import torch
from PIL import Image


def load_image(path):
    """PIL RGB image on the file's raw pixel grid. EXIF orientation is deliberately NOT applied: upstream
    doesn't, and COCO's boxes, width and height are annotated on the stored (unrotated) pixels."""
    img = Image.open(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit / 32-bit grayscale: convert("RGB") would clip every value above 255 to white; rescale.
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    return img.convert("RGB")  # grayscale, palette, CMYK, RGBA (alpha dropped, as upstream) -> RGB


def resize_size(w, h, min_size, max_size):
    """(new_w, new_h) by upstream's get_size: short side to min_size unless the long side would pass
    max_size. Python round (half to even) then int() truncation, both upstream quirks: the long side can
    exceed max_size by a pixel or two (1000x200 -> 1335x267)."""
    size = min_size
    lo, hi = float(min(w, h)), float(max(w, h))
    if max_size is not None and hi / lo * size > max_size:
        size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return w, h
    if w < h:
        return size, int(size * h / w)
    return int(size * w / h), size


def to_model_tensor(img, pixel_mean):
    """(3, H, W) float32: BGR on the 0..255 scale minus the BGR mean. Same float32 operation order as
    upstream (ToTensor's /255, then [2,1,0] and *255, then - mean), so values match it bit for bit."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)  # (3, H, W) RGB uint8
    x = x.to(torch.float32).div(255)
    x = x[[2, 1, 0]] * 255
    return x - torch.as_tensor(pixel_mean, dtype=torch.float32)[:, None, None]


def pad_batch(tensors, size_divisibility=32):
    """Zero-filled (N, 3, Hp, Wp) batch, each image top-left, Hp and Wp rounded up to size_divisibility
    (also for a single image), and the unpadded [(h, w)]. Zero is after mean subtraction: the mean colour."""
    assert len(tensors) > 0, "pad_batch needs at least one image"
    hs, ws = [t.shape[1] for t in tensors], [t.shape[2] for t in tensors]
    hp, wp = max(hs), max(ws)
    if size_divisibility > 0:
        hp = -(-hp // size_divisibility) * size_divisibility
        wp = -(-wp // size_divisibility) * size_divisibility
    batch = tensors[0].new_zeros((len(tensors), tensors[0].shape[0], hp, wp))
    for b, t in zip(batch, tensors):
        b[:, : t.shape[1], : t.shape[2]].copy_(t)
    return batch, list(zip(hs, ws))
