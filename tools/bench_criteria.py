"""Accuracy vs MACs removed for every spa criterion, without fine-tuning.

Three parts (``--models``, default all):

``digits``
    A small CNN is trained on CPU (about a minute) on scikit-learn's digits, upsampled to 16x16,
    exported to ONNX, then pruned with ``spa.prune(ratio=r)`` (the same fraction of every group:
    equal MACs for every criterion) and ``spa.prune(target="macs=F")`` for each criterion and
    evaluated with onnxruntime on the held-out digits.  Calibrated criteria use 128 training
    images (``--calib`` as a .npz); gradient criteria (taylor, snip, fisher) use gradients of the
    cross-entropy over ``--grad-batches`` batches of 64 training images, made in eval mode by
    ``tools/grads_from_torch.py`` (fisher: the mean of per-batch squared gradients).
``ppocr_cls``
    The PP-OCR text-direction classifier shipped in rapidocr-onnxruntime (``spa.zoo``), evaluated
    on text lines rendered with PIL (random pseudo-words, the DejaVu fonts found on the machine and
    PIL's default font), each upright and rotated 180 degrees: accuracy = fraction of correct
    orientations.  Preprocessing is RapidOCR's (BGR, bilinear resize to height 48 keeping the
    aspect ratio, width <= 192 zero-padded, (x/255 - 0.5)/0.5).
``ppocr_det``
    The PP-OCRv4 text detector (DBNet) from the same wheel, on rendered 736x736 pages with known
    line boxes.  Preprocessing is RapidOCR 1.4.4's (``limit_type: min``, 736, multiples of 32,
    mean = std = 0.5 on BGR).  Scores: box F1 (RapidOCR's DB post-processing -- threshold 0.3,
    2x2 dilation, box score >= 0.5, unclip 1.6 -- matched one-to-one to the rendered line boxes
    at IoU >= 0.5), pixel F1 (precision of the map > 0.3 inside the line boxes, recall of the
    DB-shrunk line kernels, shrink ratio 0.4) and IoU of the map > 0.3 with the dense model's.

The PP-OCR parts prune both ways: ``ratio=r`` (the same fraction of every group, so every
criterion removes the same MACs and only the choice of channels inside a group differs) and
``target="macs=F"`` (one global threshold, so the criterion also decides how much each group
loses).  Calibration images (activation criteria) are rendered with other seeds than the
evaluation set.  Writes Markdown tables (``criteria_table.md``, one section per part), JSON
results and (with matplotlib) plots:

    python tools/bench_criteria.py --out docs                       # all three parts
    python tools/bench_criteria.py --out docs --models ppocr_cls,ppocr_det

Needs ``pip install -e '.[bench]'`` (scikit-learn, matplotlib, pillow, scipy) and torch for the
digits part (the ``test`` extra).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("digits", "ppocr_cls", "ppocr_det")
# the criteria of issue 3; others registered in spa.scoring.CRITERIA can be named with --criteria
DEFAULT_CRITERIA = ("l1", "l2", "random", "bn_scale", "fpgm", "lamp", "act_mean", "wanda", "flap",
                    "taylor", "snip", "fisher")   # the gradient criteria: digits only (PP-OCR has no PyTorch model)
FACTORS = (1.25, 1.5, 2.0, 3.0)
DIGITS_RATIOS = (0.1, 0.2, 0.3)
PPOCR_SWEEPS = {"ppocr_cls": {"ratios": (0.025, 0.05, 0.1, 0.2), "factors": (1.05, 1.1, 1.25, 1.5)},
                "ppocr_det": {"ratios": (0.05, 0.1, 0.2), "factors": (1.1, 1.25, 1.5)}}
# (ratio=0.3 and macs=2 leave a blank detector map for every criterion: not worth 3 minutes a run)


def load_digits(size=16, seed=0):
    from sklearn.datasets import load_digits as ld
    import torch
    import torch.nn.functional as F
    d = ld()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n = int(len(y) * 0.75)
    return x[:n], y[:n], x[n:], y[n:]


def make_cnn():
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                   nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            return (x + self.a(x)).relu()

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        Block(64),
        nn.Conv2d(64, 96, 3, padding=1, bias=False), nn.BatchNorm2d(96), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(96, 128, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def train(epochs=12, seed=0):
    import torch
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits(seed=seed)
    net = make_cnn()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(ytr)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xtr[idx]), ytr[idx]).backward()
            opt.step()
    net.eval()
    return net, xtr.numpy(), ytr.numpy(), xte.numpy(), yte.numpy()


def export(net, path):
    import torch
    torch.onnx.export(net, torch.zeros(1, 1, 16, 16), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)


def accuracy(model, x, y):
    from spa.runtime.probing import session
    sess = session(model)
    logits = np.concatenate([sess.run(None, {"x": x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    return float((logits.argmax(1) == y).mean())


def digit_gradients(net, path, xtr, ytr, n_batches, tmp, batch=64):
    """Gradient files of the exported digits CNN (``tools/grads_from_torch.py``) from the first
    ``n_batches`` batches of training images: mean gradients (taylor, snip) and mean per-batch
    squared gradients (fisher).  Returns ``({criterion kind: path}, match summary)``."""
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, str(ROOT / "tools"))
    from grads_from_torch import grads_for_onnx
    batches = [(torch.tensor(xtr[i:i + batch]), torch.tensor(ytr[i:i + batch]))
               for i in range(0, min(n_batches * batch, len(xtr)), batch)]

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    _, summary = grads_for_onnx(net, path, batches, loss, out=tmp / "grads.npz")
    grads_for_onnx(net, path, batches, loss, out=tmp / "grads_squared.npz", squared=True)
    return {"plain": tmp / "grads.npz", "squared": tmp / "grads_squared.npz"}, summary


def run_digits(args, criteria, tmp):
    import spa
    from spa.scoring import CRITERIA
    t0 = time.time()
    net, xtr, ytr, xte, yte = train(args.epochs)
    path = tmp / "digits_cnn.onnx"
    export(net, path)
    calib = tmp / "calib.npz"
    np.savez(calib, x=xtr[:128])
    grads = {}
    if any(CRITERIA[c].needs_grads for c in criteria):
        grads, summary = digit_gradients(net, path, xtr, ytr, args.grad_batches, tmp)
        print(f"gradients from {args.grad_batches} batches of 64 training images: {summary}", flush=True)
    an = spa.analyze(str(path))
    base = accuracy(an.full_model(), xte, yte)
    print(f"trained in {time.time() - t0:.0f}s: test accuracy {base:.4f}, {an.macs} MACs", flush=True)
    points = [("ratio", float(v)) for v in args.digits_ratios.split(",") if v] + \
             [("macs", float(v)) for v in args.factors.split(",") if v]
    rows = {}
    for crit in criteria:
        rows[crit] = []
        scorer = CRITERIA[crit]
        grad_file = grads.get("squared" if crit == "fisher" else "plain") if scorer.needs_grads else None
        for mode, v in points:
            kw = {"ratio": v} if mode == "ratio" else {"target": f"macs={v}"}
            r = spa.prune(str(path), criterion=crit, analysis=an, calib_batch_size=32,
                          calib=str(calib) if scorer.needs_calib else None,
                          grads=str(grad_file) if grad_file else None, **kw)
            removed = 1 - r.report["after"]["macs"] / r.report["before"]["macs"]
            acc = accuracy(r.model, xte, yte)
            rows[crit].append({"mode": mode, "value": v, **({"factor": v} if mode == "macs" else {}),
                               "macs_removed": removed, "accuracy": acc,
                               "fallbacks": len(r.report.get("fallbacks") or {})})
            print(f"{crit:>9} {mode}={v:<5g} removed {removed:6.1%}  accuracy {acc:.4f}", flush=True)
    res = {"baseline_accuracy": base, "macs": an.macs, "params": an.params, "grad_batches": args.grad_batches,
           "results": rows}
    head = []
    for i, (mode, v) in enumerate(points):
        if mode == "ratio":   # every criterion removes the same channels per group: the same MACs
            removed = sorted(rs[i]["macs_removed"] for rs in rows.values())
            head.append(f"ratio={v:g} ({removed[len(removed) // 2]:.0%})")
        else:
            head.append(f"macs={v:g}")
    lines = ["| criterion | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for crit, rs in rows.items():
        lines.append(f"| {crit} | " + " | ".join(
            f"{q['accuracy']:.3f}" if q["mode"] == "ratio" else f"{q['accuracy']:.3f} ({q['macs_removed']:.0%})"
            for q in rs) + " |")
    table = "\n".join(lines)

    def plot(plt):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
        for ax, mode, label in ((axes[0], "ratio", "ratio=r (the same fraction of every group)"),
                                (axes[1], "macs", "target macs=F (one global threshold)")):
            for k, (crit, rs) in enumerate(rows.items()):
                pts = [q for q in rs if q["mode"] == mode]
                ax.plot([0] + [q["macs_removed"] * 100 for q in pts], [base] + [q["accuracy"] for q in pts],
                        marker="os^vDPX*h<>"[k % 11], label=crit, alpha=0.85, markersize=5,
                        linestyle="--" if crit == "random" else "-")
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("MACs removed (%)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test accuracy (no fine-tuning)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 12), fontsize=8, frameon=False)
        fig.suptitle("digits CNN: accuracy vs MACs removed per criterion", fontsize=11)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        return fig

    return res, table, "criteria_results.json", {"criteria.png": plot}


# --------------------------------------------------------------------------------------------------
# PP-OCR: text rendered with PIL, RapidOCR's preprocessing and post-processing in numpy

FONT_NAMES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf",
              "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf")
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts",
             "/Library/Fonts", "/System/Library/Fonts", "C:/Windows/Fonts")


def find_fonts():
    """(label, path) of the DejaVu fonts found, plus PIL's built-in font (path None)."""
    from PIL import ImageFont
    found = {}
    for d in FONT_DIRS:
        d = pathlib.Path(d).expanduser()
        if d.is_dir():
            for p in sorted(d.rglob("*.ttf")):
                found.setdefault(p.name, str(p))
    fonts = [(pathlib.Path(found[n]).stem, found[n]) for n in FONT_NAMES if n in found]
    try:
        ImageFont.load_default(size=20)  # Pillow >= 10.1 with FreeType: a scalable font (Aileron)
        fonts.append(("PIL default", None))
    except (TypeError, AttributeError, OSError, ImportError):
        pass
    if not fonts:
        raise SystemExit("no TrueType font found (install fonts-dejavu, or Pillow >= 10.1 with FreeType)")
    return fonts


def load_font(path, size):
    from PIL import ImageFont
    return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size)


ONSETS = ("b c d f g h j k l m n p r s t v w y z b c d l m n p r s t br ch cl cr dr fl fr gl gr pl pr "
          "sh sp st th tr wh qu").split()
VOWELS = "a e i o u a e i o u y ai ea ee ie oa oo ou".split()
CODAS = ("", "", "", "b", "ck", "d", "ft", "g", "k", "l", "ll", "m", "n", "nd", "ng", "nt", "p", "r", "rd",
         "s", "sh", "ss", "st", "t", "th", "x")


def word(rng):
    """A pronounceable pseudo-word (sometimes capitalised, upper case, a number, with punctuation)."""
    u = rng.random()
    if u < 0.1:
        w = str(rng.integers(0, 10 ** rng.integers(1, 5)))
        if rng.random() < 0.3:
            w += str(rng.choice([".", ",", ":", "%"])) + str(rng.integers(0, 100))
        return w
    w = "".join(str(rng.choice(ONSETS)) + str(rng.choice(VOWELS)) + str(rng.choice(CODAS))
                for _ in range(rng.integers(1, 4)))
    if u < 0.3:
        w = w.capitalize()
    elif u < 0.36:
        w = w.upper()
    if rng.random() < 0.12:
        w += str(rng.choice([",", ".", ":", ";", "!", "?", ")"]))
    return w


def text_line(rng, lo=1, hi=5):
    return " ".join(word(rng) for _ in range(rng.integers(lo, hi + 1)))


def colours(rng):
    """Light background and dark ink; 15% the other way round."""
    bg, fg = rng.integers(170, 256, 3), rng.integers(0, 90, 3)
    if rng.random() < 0.15:
        bg, fg = 255 - bg, 255 - fg
    return tuple(int(v) for v in bg), tuple(int(v) for v in fg)


def noisy(rng, rgb):
    a = rgb.astype(np.float32) + rng.normal(0, rng.uniform(0, 8), rgb.shape)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def render_line(rng, fonts):
    """One cropped text line, BGR uint8 (as RapidOCR hands detector crops to the classifier)."""
    from PIL import Image, ImageDraw
    _, path = fonts[rng.integers(len(fonts))]
    size = int(rng.integers(16, 48))
    font = load_font(path, size)
    text = text_line(rng)
    mask = Image.new("L", (size * (len(text) + 4), size * 3), 0)
    ImageDraw.Draw(mask).text((size, size), text, font=font, fill=255)
    left, top, right, bottom = mask.getbbox()
    h = bottom - top
    px = int(rng.integers(2, max(3, h // 2)))
    pt, pb = (int(rng.integers(1, max(2, h // 3))) for _ in range(2))
    bg, fg = colours(rng)
    img = Image.new("RGB", (right - left + 2 * px, h + pt + pb), bg)
    ImageDraw.Draw(img).text((size - left + px, size - top + pt), text, font=font, fill=fg)
    return noisy(rng, np.asarray(img))[..., ::-1]


def render_page(rng, fonts, height=736, width=736, max_lines=14):
    """A page of non-overlapping text lines; returns (BGR uint8, line boxes [x0, y0, x1, y1) of the ink)."""
    from PIL import Image, ImageDraw
    bg, _ = colours(rng)
    if sum(bg) < 300:
        bg = tuple(255 - v for v in bg)
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    boxes = []
    for _ in range(60):
        if len(boxes) >= max_lines:
            break
        _, path = fonts[rng.integers(len(fonts))]
        size = int(rng.integers(14, 42))
        font = load_font(path, size)
        text = text_line(rng)
        x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height - size))
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).text((x, y), text, font=font, fill=255)
        bb = mask.getbbox()
        if bb is None or bb[0] < 4 or bb[1] < 4 or bb[2] > width - 4 or bb[3] > height - 4:
            continue
        gap = size // 2
        if any(bb[0] - gap < b[2] and b[0] < bb[2] + gap and bb[1] - gap < b[3] and b[1] < bb[3] + gap
               for b in boxes):
            continue
        draw.text((x, y), text, font=font, fill=tuple(int(v) for v in rng.integers(0, 100, 3)))
        boxes.append(bb)
    return noisy(rng, np.asarray(img))[..., ::-1], np.array(boxes, np.int64).reshape(-1, 4)


def resize_linear(img, w, h):
    """cv2.resize(img, (w, h)) with INTER_LINEAR: half-pixel centres, edge clamp, no antialiasing."""
    H, W = img.shape[:2]

    def coords(n_out, n_in):
        x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        x0 = np.floor(x).astype(np.int64)
        return x0, np.minimum(x0 + 1, n_in - 1), (x - x0).astype(np.float32)

    y0, y1, fy = coords(h, H)
    x0, x1, fx = coords(w, W)
    a = img.astype(np.float32)
    rows = a[y0] * (1 - fy)[:, None, None] + a[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def cls_input(img, shape=(3, 48, 192)):
    """RapidOCR TextClassifier.resize_norm_img."""
    c, ih, iw = shape
    h, w = img.shape[:2]
    rw = iw if math.ceil(ih * w / h) > iw else int(math.ceil(ih * w / h))
    r = resize_linear(img, rw, ih).astype(np.float32).transpose(2, 0, 1) / 255
    out = np.zeros(shape, np.float32)
    out[:, :, :rw] = (r - 0.5) / 0.5
    return out


def det_input(img, limit_side_len=736):
    """RapidOCR DetPreProcess (limit_type 'min', mean = std = 0.5), one image -> [1, 3, H, W]."""
    h, w = img.shape[:2]
    ratio = limit_side_len / min(h, w) if min(h, w) < limit_side_len else 1.0
    rh, rw = int(round(int(h * ratio) / 32) * 32), int(round(int(w * ratio) / 32) * 32)
    if (rh, rw) != (h, w):
        img = resize_linear(img, rw, rh)
    return ((img.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]


def cls_set(seed, n_lines, fonts):
    """``n_lines`` rendered lines, each upright (label 0) and rotated 180 degrees (label 1)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(n_lines):
        img = render_line(rng, fonts)
        xs += [cls_input(img), cls_input(np.ascontiguousarray(img[::-1, ::-1]))]
        ys += [0, 1]
    return np.stack(xs), np.array(ys)


def det_set(seed, n_pages, fonts, size=736):
    rng = np.random.default_rng(seed)
    pages = [render_page(rng, fonts, size, size) for _ in range(n_pages)]
    return np.concatenate([det_input(p, size) for p, _ in pages]), [b for _, b in pages]


def db_boxes(prob, thresh=0.3, box_thresh=0.5, unclip=1.6, min_size=3):
    """RapidOCR's DBPostProcess for axis-aligned text: components of the dilated map > thresh,
    mean score >= box_thresh, rectangle grown by area * unclip / perimeter; [x0, y0, x1, y1]."""
    from scipy import ndimage
    m = prob > thresh
    d = m.copy()  # cv2.dilate with a 2x2 kernel (anchor at its centre)
    d[1:] |= m[:-1]
    d[:, 1:] |= m[:, :-1]
    d[1:, 1:] |= m[:-1, :-1]
    lab, _ = ndimage.label(d, structure=np.ones((3, 3)))
    H, W = prob.shape
    out = []
    for sl in ndimage.find_objects(lab):
        y0, y1, x0, x1 = sl[0].start, sl[0].stop - 1, sl[1].start, sl[1].stop - 1
        w, h = x1 - x0, y1 - y0
        if min(w, h) < min_size or prob[y0:y1 + 1, x0:x1 + 1].mean() < box_thresh:
            continue
        off = w * h * unclip / (2 * (w + h))
        if min(w, h) + 2 * off < min_size + 2:
            continue
        bx = [min(max(round(v), 0), lim - 1) for v, lim in
              ((x0 - off, W), (y0 - off, H), (x1 + off, W), (y1 + off, H))]
        if bx[2] - bx[0] > 3 and bx[3] - bx[1] > 3:
            out.append(bx)
    return np.array(out, np.float64).reshape(-1, 4)


def box_matches(pred, gt, thr=0.5):
    """One-to-one matches at IoU >= thr, greedy by IoU."""
    if len(pred) == 0 or len(gt) == 0:
        return 0
    gt = gt.astype(np.float64)
    ix = np.clip(np.minimum(pred[:, None, 2], gt[None, :, 2]) - np.maximum(pred[:, None, 0], gt[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(pred[:, None, 3], gt[None, :, 3]) - np.maximum(pred[:, None, 1], gt[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    iou = inter / np.maximum(area(pred)[:, None] + area(gt)[None, :] - inter, 1e-9)
    used_p, used_g = set(), set()
    for k in np.argsort(-iou, axis=None):
        i, j = divmod(int(k), iou.shape[1])
        if iou[i, j] < thr:
            break
        if i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
    return len(used_p)


def line_masks(shape, boxes, shrink=0.4):
    """(full line boxes, DB-shrunk kernels: each side moved in by area * (1 - r^2) / perimeter)."""
    full, kernel = np.zeros(shape, bool), np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        full[y0:y1, x0:x1] = True
        w, h = x1 - x0, y1 - y0
        d = w * h * (1 - shrink ** 2) / (2 * (w + h))
        kernel[int(round(y0 + d)):int(round(y1 - d)), int(round(x0 + d)):int(round(x1 - d))] = True
    return full, kernel


def f1(p, r):
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def cls_eval(model, x, y, ref=None):
    from spa.runtime.probing import session
    sess = session(model, optimize=True)
    prob = np.concatenate([sess.run(None, {"x": x[i:i + 128]})[0] for i in range(0, len(x), 128)])
    pred = prob.argmax(1)
    res = {"accuracy": float((pred == y).mean()), "accuracy_upright": float((pred == y)[y == 0].mean()),
           "accuracy_rotated": float((pred == y)[y == 1].mean())}
    if ref is not None:
        res["agreement"] = float((pred == ref).mean())
    return res, pred


def det_eval(model, x, gts, ref=None):
    from spa.runtime.probing import session
    sess = session(model, optimize=True)
    tp = n_pred = n_gt = 0
    pix = np.zeros(4)  # predicted inside boxes, predicted, kernel covered, kernel
    inter = union = 0
    maps = []
    for i, gt in enumerate(gts):
        prob = sess.run(None, {"x": x[i:i + 1]})[0][0, 0]
        boxes = db_boxes(prob)
        tp += box_matches(boxes, gt)
        n_pred += len(boxes)
        n_gt += len(gt)
        m = prob > 0.3
        full, kernel = line_masks(m.shape, gt)
        pix += [(m & full).sum(), m.sum(), (m & kernel).sum(), kernel.sum()]
        if ref is not None:
            inter += int((m & ref[i]).sum())
            union += int((m | ref[i]).sum())
        maps.append(m)
    p, r = tp / max(n_pred, 1), tp / max(n_gt, 1)
    pp, pr = pix[0] / max(pix[1], 1), pix[2] / max(pix[3], 1)
    res = {"box_f1": f1(p, r), "box_precision": p, "box_recall": r, "boxes": n_pred, "lines": n_gt,
           "pixel_f1": f1(pp, pr), "pixel_precision": float(pp), "pixel_recall": float(pr)}
    if ref is not None:
        res["iou_dense"] = inter / union if union else 1.0
    return res, maps


def run_ppocr(part, args, criteria, tmp):
    import spa
    from spa import zoo
    from spa.scoring import CRITERIA
    t0 = time.time()
    skipped = [c for c in criteria if CRITERIA[c].needs_grads]
    if skipped:   # gradients need the training framework's model, which the zoo does not ship
        print(f"{part}: skipping {', '.join(skipped)} (gradient criteria need the framework's model)", flush=True)
        criteria = [c for c in criteria if c not in skipped]
    fonts = find_fonts()
    path = str(zoo.fetch(part))
    if part == "ppocr_cls":
        shape = [1, 3, 48, 192]
        x, y = cls_set(args.seed, args.cls_lines, fonts)
        xc, _ = cls_set(args.seed + 1000, args.calib_lines, fonts)
        evaluate = lambda m, ref=None: cls_eval(m, x, y, ref)  # noqa: E731
        key, batch = "accuracy", 32
    else:
        # spa analyses, validates and calibrates at a smaller size (the detector is fully
        # convolutional: the fraction of MACs removed does not depend on the size); calibration
        # samples are crops of preprocessed pages, so text keeps the scale RapidOCR feeds it
        a = min(args.det_analysis_size, args.det_size)
        shape = [1, 3, a, a]
        x, gts = det_set(args.seed, args.det_pages, fonts, args.det_size)
        pages, _ = det_set(args.seed + 1000, args.calib_pages, fonts, args.det_size)
        at = sorted({0, args.det_size - a})
        xc = np.stack([p[:, i:i + a, j:j + a] for p in pages for i in at for j in at])
        evaluate = lambda m, ref=None: det_eval(m, x, gts, ref)  # noqa: E731
        key, batch = "box_f1", 1
    calib = tmp / f"{part}_calib.npz"
    np.savez(calib, x=xc)
    an = spa.analyze(path, input_shapes={"x": shape})
    dense, ref = evaluate(an.full_model())
    print(f"{part}: rendered and analysed in {time.time() - t0:.0f}s; dense {key} {dense[key]:.4f}, "
          f"{an.macs} MACs at {shape}, {len(x)} evaluation / {len(xc)} calibration samples", flush=True)
    ratios = [float(v) for v in (args.cls_ratios if part == "ppocr_cls" else args.det_ratios).split(",") if v]
    factors = [float(v) for v in (args.cls_factors if part == "ppocr_cls" else args.det_factors).split(",") if v]
    points = [("ratio", r) for r in ratios] + [("macs", f) for f in factors]
    rows = {}
    for crit in criteria:
        rows[crit] = []
        for mode, v in points:
            t = time.time()
            kw = {"ratio": v} if mode == "ratio" else {"target": f"macs={v}"}
            r = spa.prune(path, criterion=crit, analysis=an, calib_batch_size=batch,
                          calib=str(calib) if CRITERIA[crit].needs_calib else None, **kw)
            removed = 1 - r.report["after"]["macs"] / r.report["before"]["macs"]
            got, _ = evaluate(r.model, ref)
            rows[crit].append({"mode": mode, "value": v, "macs_removed": removed, **got,
                               "fallbacks": len(r.report.get("fallbacks") or {}),
                               "seconds": round(time.time() - t, 1)})
            extra = f" iou_dense {got['iou_dense']:.3f}" if "iou_dense" in got else f" agreement {got['agreement']:.3f}"
            print(f"{part} {crit:>9} {mode}={v:<5g} removed {removed:6.1%}  {key} {got[key]:.4f}{extra}"
                  f"  ({time.time() - t:.0f}s)", flush=True)
    res = {"model": part, "file": pathlib.Path(path).name, "input_shape": shape, "macs": an.macs,
           "params": an.params, "fonts": [f for f, _ in fonts], "seed": args.seed,
           "prunable_groups": sum(g.prunable for g in an.groups), "dense": dense,
           "eval_size": len(x), "calib_size": len(xc), "results": rows,
           "seconds": round(time.time() - t0, 1)}
    table = ppocr_table(part, res, points, key, "agreement" if part == "ppocr_cls" else "iou_dense")
    return res, table, f"criteria_results_{part}.json", {f"criteria_{part}.png": lambda plt: ppocr_plot(plt, res)}


def ppocr_plot(plt, res):
    """Two panels (ratio=r, target macs=F) of a PP-OCR part's results (the JSON it writes)."""
    part, rows, dense = res["model"], res["results"], res["dense"]
    key = "accuracy" if part == "ppocr_cls" else "box_f1"
    title = {"ppocr_cls": "PP-OCR text-direction classifier: accuracy on rendered lines (0/180 deg)",
             "ppocr_det": "PP-OCRv4 detector: box F1 on rendered pages (IoU >= 0.5)"}[part]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, mode, label in ((axes[0], "ratio", "ratio=r (the same fraction of every group)"),
                            (axes[1], "macs", "target macs=F (one global threshold)")):
        for k, (crit, rs) in enumerate(rows.items()):
            pts = [q for q in rs if q["mode"] == mode]
            ax.plot([0] + [q["macs_removed"] * 100 for q in pts], [dense[key]] + [q[key] for q in pts],
                    marker="os^vDPX*h<>"[k % 11], label=crit, alpha=0.85, markersize=5,
                    linestyle="--" if crit == "random" else "-")
        ax.axhline(dense[key], color="grey", lw=0.8, ls=":")
        if part == "ppocr_cls":
            ax.axhline(0.5, color="grey", lw=0.8, ls="-.")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("MACs removed (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(key.replace("_", " ") + " (no fine-tuning)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig




def ppocr_table(part, res, points, key, second):
    """Markdown: a dense row, then one row per criterion; columns are the sweep points, headed by
    the median MACs removed (the same for every criterion with ratio=r)."""
    rows = res["results"]
    head, cols = [], []
    for i, (mode, v) in enumerate(points):
        removed = sorted(rs[i]["macs_removed"] for rs in rows.values())
        med = removed[len(removed) // 2]
        spread = removed[-1] - removed[0]
        head.append(f"{'ratio=' if mode == 'ratio' else 'macs='}{v:g} ({'~' if spread > 0.005 else ''}{med:.0%})")
        cols.append(i)
    d = res["dense"]
    fmt = (lambda q: f"{q[key]:.3f}") if part == "ppocr_cls" else (lambda q: f"{q[key]:.3f} / {q[second]:.2f}")
    dense_cell = f"{d[key]:.3f}" if part == "ppocr_cls" else f"{d[key]:.3f} / 1"
    lines = ["| criterion | " + " | ".join(head) + " |", "|---|" + "---|" * len(head),
             "| dense | " + " | ".join([dense_cell] * len(head)) + " |"]
    for crit, rs in rows.items():
        lines.append(f"| {crit} | " + " | ".join(fmt(rs[i]) for i in cols) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------

MARK = re.compile(r"^<!-- part: (\w+) -->$", re.M)


def write_tables(path, tables):
    """Replace the sections of the parts that ran in ``criteria_table.md`` and keep the others
    (a file without markers is the digits table of earlier versions)."""
    old = {}
    if path.exists():
        text = path.read_text()
        marks = list(MARK.finditer(text))
        if not marks and text.strip():
            old["digits"] = text.strip()
        for i, m in enumerate(marks):
            end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
            old[m.group(1)] = text[m.end():end].strip()
    old.update(tables)
    path.write_text("\n\n".join(f"<!-- part: {p} -->\n{old[p]}" for p in PARTS if p in old) + "\n")


def main(argv=None):
    from spa.scoring import CRITERIA
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--models", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    ap.add_argument("--criteria", default=",".join(DEFAULT_CRITERIA))
    ap.add_argument("--seed", type=int, default=0, help="rendering seed (calibration uses seed + 1000)")
    g = ap.add_argument_group("digits")
    g.add_argument("--epochs", type=int, default=12)
    g.add_argument("--factors", default=",".join(map(str, FACTORS)), help="macs=F targets")
    g.add_argument("--digits-ratios", default=",".join(map(str, DIGITS_RATIOS)),
                   help="ratio=r points (every criterion removes the same MACs); empty: none")
    g.add_argument("--grad-batches", type=int, default=16,
                   help="batches of 64 training images the gradient criteria's gradients come from")
    g = ap.add_argument_group("ppocr (an empty list skips that sweep)")
    g.add_argument("--cls-ratios", default=",".join(map(str, PPOCR_SWEEPS["ppocr_cls"]["ratios"])))
    g.add_argument("--cls-factors", default=",".join(map(str, PPOCR_SWEEPS["ppocr_cls"]["factors"])))
    g.add_argument("--det-ratios", default=",".join(map(str, PPOCR_SWEEPS["ppocr_det"]["ratios"])))
    g.add_argument("--det-factors", default=",".join(map(str, PPOCR_SWEEPS["ppocr_det"]["factors"])))
    g.add_argument("--cls-lines", type=int, default=300, help="evaluation lines (x2 orientations)")
    g.add_argument("--calib-lines", type=int, default=64, help="calibration lines (x2 orientations)")
    g.add_argument("--det-pages", type=int, default=12, help="evaluation pages")
    g.add_argument("--calib-pages", type=int, default=4, help="calibration pages")
    g.add_argument("--det-size", type=int, default=736, help="page side (RapidOCR scales the short side to 736)")
    g.add_argument("--det-analysis-size", type=int, default=320,
                   help="side of the detector input spa analyses, validates and calibrates with")
    args = ap.parse_args(argv)
    parts = [p for p in args.models.split(",") if p]
    criteria = [c for c in args.criteria.split(",") if c]
    bad = [p for p in parts if p not in PARTS] + [c for c in criteria if c not in CRITERIA]
    if bad:
        ap.error(f"unknown part or criterion: {', '.join(bad)}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp())
    tables, plots = {}, {}
    for part in parts:
        t0 = time.time()
        res, table, json_name, part_plots = (run_digits(args, criteria, tmp) if part == "digits"
                                            else run_ppocr(part, args, criteria, tmp))
        (out / json_name).write_text(json.dumps(res, indent=1))
        tables[part] = table
        plots.update(part_plots)
        print(table)
        print(f"{part}: {time.time() - t0:.0f}s", flush=True)
    write_tables(out / "criteria_table.md", tables)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return 0
    for name, make in plots.items():
        fig = make(plt)
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
