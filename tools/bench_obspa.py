"""OBSPA benchmark: accuracy / fidelity vs MACs removed, no fine-tuning, per Hessian source.

``spa.prune(model, ratio, criterion=..., hessian=..., calib=...)`` at several per-group ratios for

* ``obspa`` with each Hessian source: ``identity`` (the control: L2 of the consumer columns, no
  compensation -- not the same ranking as ``l2``), ``synthetic`` (random inputs), ``bn`` (BatchNorm
  statistics, synthetic where there is none) and ``calib`` (``hessian="auto"`` with real calibration
  data, disjoint from the evaluation data);
* ``l2`` (data-free baseline) and the activation criteria ``wanda``, ``flap``, ``act_mean`` on the
  same calibration data.

Models and metrics:

* ``digits`` / ``digits_bn`` -- the CNN of tools/bench_criteria.py trained on CPU on scikit-learn's
  digits (one network per ``--seeds`` seed, own train/test split); ``digits`` is exported like the
  criteria benchmark (BatchNorm folded into the convolutions), ``digits_bn`` keeps the
  BatchNormalization nodes (what ``--hessian bn`` reads).  Metric: held-out test accuracy;
  calibration: 128 training images.
* ``ppocr_cls`` -- the PP-OCR text-direction classifier (0 / 180 degrees) on text lines rendered
  with PIL by tools/bench_criteria.py's ``cls_set`` when it is importable (else by
  :func:`render_lines`, with matplotlib's fonts), half of them rotated 180 degrees.  Metrics: accuracy against the rendering label and argmax agreement with the dense
  model; calibration: 64 other rendered lines (another seed).
* ``yolov8n`` -- NudeNet's YOLOv8n at 320x320 on real photos shipped with scikit-image,
  scikit-learn and matplotlib (letterboxed views: full, crops, flips).  Metric: detection F1 of the
  pruned model against the dense model's detections (score >= 0.2, class-wise NMS IoU 0.45, a match
  is the same class at IoU >= 0.5; pooled over images) and the mean cosine similarity of the class
  score maps; calibration: 32 views of *other* photos.

The data-free seeded variants (``synthetic``, ``bn``) run once per seed (``--seeds``) on the fixed
models; on digits every seed is another trained network.  Differences to ``l2`` come with a 95%
bootstrap interval over the evaluation samples (paired).  Writes ``docs/obspa_bench.md`` and
``docs/obspa_bench.png``:

    OPENBLAS_NUM_THREADS=1 python tools/bench_obspa.py --out docs   # ~10-12 min on 2 shared cores
    python tools/bench_obspa.py --quick --out /tmp/q      # 1 seed, 2 ratios per model, fewer samples
    python tools/bench_obspa.py --models yolov8n --ratios 0.02,0.1 --variants l2,obspa:synthetic

Ratios are per model (``RATIOS``: the slim PP-OCR classifier and YOLOv8n collapse beyond ~20% per
group without fine-tuning, the digits CNN only beyond ~50%).  The trained digits networks are cached
under ``$SPA_CACHE/bench_obspa`` (``--no-cache`` retrains).

Needs torch, scikit-learn, scikit-image, matplotlib, Pillow (dev-only: ``pip install -e '.[test,bench]'``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

MODELS = ("digits", "digits_bn", "ppocr_cls", "yolov8n")
#: per-group ratios per model: the PP-OCR classifier and YOLOv8n (slim, no fine-tuning) collapse
#: beyond ~20%, the over-parameterised digits CNN only beyond ~50%
RATIOS = {"digits": (0.1, 0.2, 0.3, 0.5, 0.7), "digits_bn": (0.1, 0.2, 0.3, 0.5, 0.7), "ppocr_cls": (0.02, 0.05, 0.1, 0.2),
          "yolov8n": (0.02, 0.05, 0.1, 0.2)}
# label -> (criterion, hessian, uses calibration data, seeded)
VARIANTS = {
    "l2": ("l2", "auto", False, False),
    "obspa:identity": ("obspa", "identity", False, False),
    "obspa:synthetic": ("obspa", "synthetic", False, True),
    "obspa:bn": ("obspa", "bn", False, True),
    "obspa:calib": ("obspa", "auto", True, False),
    "wanda": ("wanda", "auto", True, False),
    "flap": ("flap", "auto", True, False),
    "act_mean": ("act_mean", "auto", True, False),
}
DATA_FREE = ("l2", "obspa:identity", "obspa:synthetic", "obspa:bn")


def say(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------
# digits (the CNN of tools/bench_criteria.py)
# ------------------------------------------------------------------------------------------------

def _digits_net(seed, epochs, cache):
    """The trained network of ``seed`` and its split; the state is cached (training is ~1 min)."""
    import torch
    import bench_criteria as bc
    f = cache / f"digits_cnn_s{seed}_e{epochs}.pt" if cache else None
    if f is not None and f.exists():
        net = bc.make_cnn()
        net.load_state_dict(torch.load(f))
        net.eval()
        xtr, ytr, xte, yte = bc.load_digits(seed=seed)
        return net, xtr.numpy(), ytr.numpy(), xte.numpy(), yte.numpy(), True
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # on a shared 2-core box 2 threads train 4x slower than 1 (measured)
    try:
        net, xtr, ytr, xte, yte = bc.train(epochs, seed=seed)
    finally:
        torch.set_num_threads(threads)
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), f)
    return net, xtr, ytr, xte, yte, False


def _export_digits(net, path, keep_bn):
    import torch
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the legacy exporter folds BatchNormalization into the convs unless constant folding is off
        torch.onnx.export(net, torch.zeros(1, 1, 16, 16), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False,
                          do_constant_folding=not keep_bn)


def run_batched(model, input_name, x, batch):
    """The model's first output over ``x`` run ``batch`` samples at a time, concatenated."""
    from spa.runtime.probing import session
    sess = session(model)
    return np.concatenate([sess.run(None, {input_name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


class Classifier:
    """Per-sample correctness (and agreement with the dense model) of a classifier."""

    def __init__(self, x, y, input_name, batch=64):
        self.x, self.y, self.input, self.batch = x, y, input_name, batch
        self.dense = None

    def logits(self, model):
        return run_batched(model, self.input, self.x, self.batch)

    def set_dense(self, model):
        self.dense = self.logits(model).argmax(1)

    def samples(self, model):
        p = self.logits(model).argmax(1)
        return {"correct": (p == self.y).astype(np.float64), "agree": (p == self.dense).astype(np.float64)}

    @staticmethod
    def metrics(s, idx=None):
        idx = slice(None) if idx is None else idx
        return {"accuracy": float(s["correct"][idx].mean()), "agreement": float(s["agree"][idx].mean())}


# ------------------------------------------------------------------------------------------------
# ppocr_cls on rendered text
# ------------------------------------------------------------------------------------------------

def _fonts():
    import matplotlib
    d = pathlib.Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
             "DejaVuSans-Oblique.ttf", "DejaVuSerif-Bold.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf",
             "STIXGeneral.ttf", "STIXGeneralBol.ttf"]
    return [str(d / n) for n in names if (d / n).exists()]


def _words():
    import codecs
    import this  # noqa: F401  (prints the Zen of Python on first import)
    text = codecs.decode(this.s, "rot13")
    ws = sorted({w.strip(".,!*-'\"()") for w in text.split()} - {""})
    return ws + ["2024", "No.", "ID:", "Total", "$19.99", "A-113", "km/h", "Tel.", "OK", "PP-OCR", "spa"]


def text_sets(n_eval, n_calib, offset=0):
    """Evaluation lines, labels and calibration lines for ppocr_cls, and where they come from: the
    renderer of tools/bench_criteria.py (``cls_set``: every line upright and rotated) when it is
    importable, else :func:`render_lines`.  Seeds 1 + offset (evaluation) and 2 + offset
    (calibration) differ."""
    try:
        from bench_criteria import cls_set, find_fonts
        fonts = find_fonts()
        x, y = cls_set(1 + offset, n_eval // 2, fonts)
        xc, _ = cls_set(2 + offset, n_calib // 2, fonts)
        return x, y, xc, (f"tools/bench_criteria.py `cls_set` (pseudo-words, {len(fonts)} fonts, each line "
                          "upright and rotated 180°)")
    except (ImportError, AttributeError, SystemExit):
        x, y = render_lines(n_eval, seed=1 + offset)
        xc, _ = render_lines(n_calib, seed=2 + offset)
        return x, y, xc, "`render_lines` of this tool (Zen of Python words, matplotlib's fonts, half rotated 180°)"


def render_lines(n, seed, h=48, w=192):
    """``n`` text lines as the PP-OCR classifier sees them ([n, 3, 48, 192], (x/255-0.5)/0.5,
    right-padded with 0) and their labels (1 = rotated 180 degrees)."""
    import contextlib
    import io as _io
    from PIL import Image, ImageDraw, ImageFilter, ImageFont
    with contextlib.redirect_stdout(_io.StringIO()):
        words = _words()
    fonts = _fonts()
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3, h, w), np.float32)
    y = (np.arange(n) % 2).astype(np.int64)
    rng.shuffle(y)
    for i in range(n):
        line = " ".join(rng.choice(words, rng.integers(1, 5)))
        if rng.random() < 0.3:
            line = line.upper()
        font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(rng.integers(18, 42)))
        l, t, r, b = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), line, font=font)
        m = int(rng.integers(2, 10))
        bg, fg = int(rng.integers(170, 256)), int(rng.integers(0, 90))
        if rng.random() < 0.2:
            bg, fg = fg, bg
        im = Image.new("RGB", (r - l + 2 * m, b - t + 2 * m), (bg,) * 3)
        tint = rng.integers(-25, 26, 3)
        ImageDraw.Draw(im).text((m - l, m - t), line, font=font,
                                fill=tuple(int(np.clip(fg + k, 0, 255)) for k in tint))
        if rng.random() < 0.3:
            im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
        if y[i]:
            im = im.rotate(180)
        a = np.asarray(im, np.float32)
        a = np.clip(a + rng.normal(0, 4, a.shape), 0, 255)
        # rapidocr / PP-OCR cls preprocessing: height 48, width by aspect (at most 192), pad right
        nw = min(w, int(math.ceil(h * a.shape[1] / a.shape[0])))
        a = np.asarray(Image.fromarray(a.astype(np.uint8)).resize((nw, h), Image.BILINEAR), np.float32)
        x[i, :, :, :nw] = ((a / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return x, y


# ------------------------------------------------------------------------------------------------
# yolov8n on photos
# ------------------------------------------------------------------------------------------------

EVAL_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "china", "flower")
CALIB_PHOTOS = ("grace_hopper", "motorcycle_left", "motorcycle_right", "coins", "retina",
                "immunohistochemistry", "hubble_deep_field", "brick")


def _photo(name):
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        return load_sample_image(name + ".jpg")
    if name == "grace_hopper":
        import matplotlib.cbook as cbook
        from PIL import Image
        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return np.asarray(Image.open(f).convert("RGB"))
    import skimage.data as skd
    if name.startswith("motorcycle_"):
        left, right, _ = skd.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(skd, name)()


def _letterbox(im, size=320):
    from PIL import Image
    im = np.asarray(im)
    if im.ndim == 2:
        im = np.stack([im] * 3, -1)
    im = im[..., :3]
    if im.dtype != np.uint8:
        im = (np.clip(im, 0, 1) * 255).astype(np.uint8) if im.max() <= 1 else im.astype(np.uint8)
    h, w = im.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    r = np.asarray(Image.fromarray(im).resize((nw, nh), Image.BILINEAR))
    out = np.full((size, size, 3), 114, np.uint8)
    t, left = (size - nh) // 2, (size - nw) // 2
    out[t:t + nh, left:left + nw] = r
    return out.transpose(2, 0, 1).astype(np.float32) / 255.0


def photo_views(names, n_crops, seed, size=320):
    """Letterboxed views of each photo: the full image, ``n_crops`` random crops (50-90% of each
    side), and the horizontal flip of each."""
    rng = np.random.default_rng(seed)
    views = []
    for name in names:
        im = np.asarray(_photo(name))
        h, w = im.shape[:2]
        crops = [im]
        for _ in range(n_crops):
            ch, cw = int(h * rng.uniform(0.5, 0.9)), int(w * rng.uniform(0.5, 0.9))
            t, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crops.append(im[t:t + ch, left:left + cw])
        for c in crops:
            views.append(_letterbox(c, size))
            views.append(_letterbox(c[:, ::-1], size))
    return np.stack(views)


def _iou(a, b):
    """IoU of boxes a [n,4] and b [m,4] (x1, y1, x2, y2) -> [n, m]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda z: np.prod(np.clip(z[:, 2:] - z[:, :2], 0, None), -1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def decode_yolov8(out, score=0.2, iou=0.45):
    """YOLOv8 head output [4+C, N] (cx, cy, w, h, class scores) -> (boxes xyxy, scores, classes)
    after the score threshold and class-wise NMS."""
    cls = out[4:].argmax(0)
    sc = out[4:].max(0)
    keep = sc >= score
    cx, cy, w, h = out[:4, keep]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    sc, cls = sc[keep], cls[keep]
    order = np.argsort(-sc, kind="stable")
    boxes, sc, cls = boxes[order], sc[order], cls[order]
    alive = np.ones(len(sc), bool)
    for i in range(len(sc)):
        if alive[i]:
            same = (cls == cls[i]) & alive
            same[:i + 1] = False
            alive[same] &= _iou(boxes[i:i + 1], boxes[same])[0] <= iou
    return boxes[alive], sc[alive], cls[alive]


def match_tp(dense, pruned, thr=0.5):
    """True positives of ``pruned`` detections against ``dense`` (greedy by pruned score, same
    class, IoU >= thr)."""
    (bd, _, cd), (bp, _, cp) = dense, pruned
    if not len(bd) or not len(bp):
        return 0
    iou = _iou(bp, bd)
    iou[cp[:, None] != cd[None, :]] = 0
    used = np.zeros(len(bd), bool)
    tp = 0
    for i in range(len(bp)):             # pruned detections are in score order
        j = np.where(used, -1, iou[i]).argmax()
        if not used[j] and iou[i, j] >= thr:
            used[j] = True
            tp += 1
    return tp


class Detector:
    def __init__(self, x, input_name="images", batch=8):
        self.x, self.input, self.batch = x, input_name, batch
        self.dense = None

    def outputs(self, model):
        return run_batched(model, self.input, self.x, self.batch)

    def set_dense(self, model):
        self.dense_out = self.outputs(model)
        self.dense = [decode_yolov8(o) for o in self.dense_out]

    def samples(self, model):
        out = self.outputs(model)
        tp, nd, npr, cos = [], [], [], []
        for o, d0, dd in zip(out, self.dense_out, self.dense):
            dp = decode_yolov8(o)
            tp.append(match_tp(dd, dp))
            nd.append(len(dd[0]))
            npr.append(len(dp[0]))
            a, b = o[4:].ravel().astype(np.float64), d0[4:].ravel().astype(np.float64)
            cos.append(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
        return {"tp": np.array(tp, float), "n_dense": np.array(nd, float), "n_pruned": np.array(npr, float),
                "cos": np.array(cos)}

    @staticmethod
    def metrics(s, idx=None):
        idx = slice(None) if idx is None else idx
        den = s["n_dense"][idx].sum() + s["n_pruned"][idx].sum()
        return {"f1": float(2 * s["tp"][idx].sum() / den) if den else 1.0, "cos": float(s["cos"][idx].mean())}


# ------------------------------------------------------------------------------------------------
# the runs
# ------------------------------------------------------------------------------------------------

def bn_fraction(report):
    """Fraction of the modelled consumer Hessians of the pruned groups that came from BatchNorm."""
    srcs = [s for g in report["groups"] if g.get("removed") and "obspa" in g for s in g["obspa"]["hessian"]]
    return sum(s == "bn" for s in srcs) / len(srcs) if srcs else 0.0


def _one(spa, name, path, an, evaluator, label, ratio, seed, calib, log):
    """One spa.prune call and its evaluation (a row; ``error`` when spa raised)."""
    crit, hess, use_calib, _ = VARIANTS[label]
    t = time.perf_counter()
    try:
        r = spa.prune(str(path), ratio, criterion=crit, hessian=hess, analysis=an, seed=seed,
                      calib=str(calib[0]) if use_calib else None, calib_batch_size=calib[1] if use_calib else None)
    except Exception as exc:  # a bug in spa: record it and go on
        import traceback
        log(f"[{name}] {label} ratio={ratio} seed={seed}: FAILED {type(exc).__name__}: {exc}")
        log(traceback.format_exc())
        return {"model": name, "variant": label, "ratio": ratio, "seed": seed, "error": f"{type(exc).__name__}: {exc}"}
    secs = time.perf_counter() - t
    s = evaluator.samples(r.model)
    row = {"model": name, "variant": label, "ratio": ratio, "seed": seed,
           "macs_removed": 1 - r.report["after"]["macs"] / r.report["before"]["macs"],
           "seconds": secs, **evaluator.metrics(s), "_samples": s}
    if crit == "obspa":
        row["bn_fraction"] = bn_fraction(r.report)
        row["fallback_groups"] = len(r.report.get("fallbacks", {}))
    mtxt = " ".join(f"{k} {row[k]:.4f}" for k in evaluator.metrics(s))
    log(f"[{name}] {label:>16} r={ratio:<4g} seed={seed} MACs -{row['macs_removed']:.1%} {mtxt}  prune {secs:.1f}s"
        + (f" bn {row['bn_fraction']:.0%}" if "bn_fraction" in row else ""))
    return row


def run_model(name, path, evaluator, calib, ratios, variants, seeds, log, input_shapes=None):
    """Prune ``path`` with every variant / ratio (/ seed) and evaluate; returns result rows (with
    the per-sample arrays under ``_samples``)."""
    import spa
    t0 = time.perf_counter()
    an = spa.analyze(str(path), input_shapes=input_shapes)
    t_an = time.perf_counter() - t0
    evaluator.set_dense(an.model)
    dense = evaluator.metrics(evaluator.samples(an.model))
    log(f"[{name}] {an.macs / 1e6:.1f}M MACs, {an.params / 1e3:.1f}k params, analysis {t_an:.1f}s, dense {dense}")
    rows = []
    for label in variants:
        seeded = VARIANTS[label][3]
        # obspa:bn first at the largest ratio: where no BatchNorm feeds a pruned group it would
        # repeat obspa:synthetic exactly, and is dropped
        for ratio in (sorted(ratios, reverse=True) if label == "obspa:bn" else ratios):
            for seed in (seeds if seeded else seeds[:1]):
                rows.append(_one(spa, name, path, an, evaluator, label, ratio, seed, calib, log))
                if label == "obspa:bn" and ratio == max(ratios) and rows[-1].get("bn_fraction") == 0:
                    break
            if label == "obspa:bn" and ratio == max(ratios) and rows[-1].get("bn_fraction") == 0:
                rows = [x for x in rows if x["variant"] != "obspa:bn"]
                log(f"[{name}] obspa:bn: no BatchNormalization feeds a modelled consumer (= obspa:synthetic); dropped")
                break
    return {"model": name, "macs": an.macs, "params": an.params, "analysis_s": t_an, "dense": dense,
            "metric_names": list(dense), "rows": rows, "evaluator": evaluator}


# ------------------------------------------------------------------------------------------------
# summary, tables, plot
# ------------------------------------------------------------------------------------------------

PRIMARY = {"digits": "accuracy", "digits_bn": "accuracy", "ppocr_cls": "accuracy", "yolov8n": "f1"}
METRIC_TEXT = {"accuracy": "accuracy", "agreement": "argmax agreement with dense", "f1": "detection F1 vs dense",
               "cos": "cosine sim. of class scores vs dense"}


def _ok(rows):
    return [r for r in rows if "error" not in r]


def cell_stats(rows, variant, ratio, key):
    v = [r[key] for r in _ok(rows) if r["variant"] == variant and r["ratio"] == ratio]
    if not v:
        return None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None), len(v)


def delta_vs_l2(runs, variant, ratio, key, n_boot=1000):
    """Difference to l2 of the seed-averaged metric, with a 95% interval.

    ``runs`` are run_model results over which the rows are paired: for a fixed model one run (the
    seeds of a seeded variant are averaged; the interval is a paired bootstrap over evaluation
    samples), for digits one run per trained network (the interval is min..max over networks and
    the result carries the number of networks where the variant beats l2)."""
    if len(runs) > 1:     # one run per network
        d = []
        for run in runs:
            a = [r for r in _ok(run["rows"]) if r["variant"] == variant and r["ratio"] == ratio]
            b = [r for r in _ok(run["rows"]) if r["variant"] == "l2" and r["ratio"] == ratio]
            if a and b:
                d.append(np.mean([r[key] for r in a]) - b[0][key])
        if not d:
            return None
        return float(np.mean(d)), float(np.min(d)), float(np.max(d)), int(sum(x > 0 for x in d)), len(d)
    run = runs[0]
    ev = run["evaluator"]
    a = [r["_samples"] for r in _ok(run["rows"]) if r["variant"] == variant and r["ratio"] == ratio]
    b = [r["_samples"] for r in _ok(run["rows"]) if r["variant"] == "l2" and r["ratio"] == ratio]
    if not a or not b:
        return None
    m = len(next(iter(b[0].values())))
    rng = np.random.default_rng(0)

    def diff(idx):
        return np.mean([ev.metrics(s, idx)[key] for s in a]) - ev.metrics(b[0], idx)[key]
    boots = np.array([diff(rng.integers(0, m, m)) for _ in range(n_boot)])
    return float(diff(None)), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5)), None, None


def model_section(name, runs, ratios, variants):
    first = runs[0]
    rows = [r for run in runs for r in run["rows"]]
    lines = []
    metrics = first["metric_names"]
    ratios = [q for q in ratios if any(r["ratio"] == q for r in _ok(rows))]
    head_macs = {q: np.mean([r["macs_removed"] for r in _ok(rows) if r["ratio"] == q]) for q in ratios}
    cols = " | ".join(f"ratio {q:g} (−{head_macs[q]:.0%} MACs)" for q in ratios)
    present = [v for v in variants if any(r["variant"] == v for r in rows)]
    for key in metrics:
        dense = np.mean([run["dense"][key] for run in runs])
        lines += ["", f"**{METRIC_TEXT[key]}** (dense model: {dense:.3f})", "",
                  f"| variant | {cols} | prune s |", "|---|" + "---|" * (len(ratios) + 1)]
        for v in present:
            cells = []
            for q in ratios:
                st = cell_stats(rows, v, q, key)
                cells.append("failed" if st is None else f"{st[0]:.3f}" + (f" ± {st[1]:.3f}" if st[1] is not None else ""))
            secs = [r["seconds"] for r in _ok(rows) if r["variant"] == v]
            lines.append(f"| {v} | " + " | ".join(cells) + (f" | {np.mean(secs):.2f} |" if secs else " | – |"))
    what = ("mean over networks [min, max] and the number of networks where it beats l2" if len(runs) > 1
            else "seeded variants averaged over seeds; [95% paired bootstrap interval over the evaluation "
                 "samples], bold where it excludes 0")
    for key in metrics:
        lines += ["", f"**Δ {key} vs l2** ({what})", "", f"| variant | {cols} |", "|---|" + "---|" * len(ratios)]
        for v in present:
            if v == "l2":
                continue
            cells = []
            for q in ratios:
                d = delta_vs_l2(runs, v, q, key)
                if d is None:
                    cells.append("–")
                    continue
                c = f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"
                if d[3] is not None:
                    c += f" {d[3]}/{d[4]}"
                elif d[1] > 0 or d[2] < 0:
                    c = f"**{c}**"
                cells.append(c)
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


PANELS = (("digits", "accuracy"), ("digits_bn", "accuracy"), ("ppocr_cls", "accuracy"), ("yolov8n", "f1"),
          ("yolov8n", "cos"))
STYLE = {"l2": ("k", "-", "s"), "obspa:identity": ("0.5", ":", "x"), "obspa:synthetic": ("C0", "-", "o"),
         "obspa:bn": ("C9", "-", "^"), "obspa:calib": ("C3", "-", "D"), "wanda": ("C1", "--", "v"),
         "flap": ("C2", "--", "<"), "act_mean": ("C4", "--", ">")}


def plot(results, ratios_of, variants, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(n, k) for n, k in PANELS if n in results]
    ncol = min(3, len(panels) + 1)
    nrow = -(-(len(panels) + 1) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.3 * ncol, 3.6 * nrow), squeeze=False)
    axes = axes.ravel()
    for ax, (name, key) in zip(axes, panels):
        runs = results[name]
        rows = [r for run in runs for r in run["rows"]]
        dense = np.mean([run["dense"][key] for run in runs])
        for v in variants:
            pts = [(cell_stats(rows, v, q, key), cell_stats(rows, v, q, "macs_removed")) for q in ratios_of[name]]
            pts = [(st, m) for st, m in pts if st is not None]
            if not pts:
                continue
            c, ls, mk = STYLE.get(v, (None, "-", "o"))
            ax.errorbar([0] + [m[0] * 100 for _, m in pts], [dense] + [st[0] for st, _ in pts],
                        yerr=[0] + [st[1] or 0 for st, _ in pts], color=c, linestyle=ls, marker=mk,
                        markersize=4, capsize=2, label=v, linewidth=1.2)
        ax.set_title(f"{name}: {key}", fontsize=10)
        ax.set_xlabel("MACs removed (%)")
        ax.set_ylabel(METRIC_TEXT[key], fontsize=8)
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes[:len(panels)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    for ax in axes[len(panels):]:
        ax.axis("off")
    handles = {v: handles[v] for v in variants if v in handles}
    axes[len(panels)].legend(handles.values(), handles.keys(), loc="center", fontsize=9,
                             title="no fine-tuning; error bars:\nstd over seeds (digits: networks)",
                             title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs"), help="where obspa_bench.md / obspa_bench.png go")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--ratios", help="per-group ratios for every model (default: per model, see RATIOS)")
    ap.add_argument("--seeds", default="0,1,2", help="digits: one trained network each; fixed models: "
                    "seeds of the synthetic Hessian inputs")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--text-lines", type=int, default=600, help="ppocr_cls evaluation lines")
    ap.add_argument("--crops", type=int, default=3, help="yolov8n: random crops per evaluation photo")
    ap.add_argument("--eval-seed", type=int, default=0, help="other rendered lines / photo crops (a "
                    "held-out check of choices tuned on the default sets; digits: pass other --seeds)")
    ap.add_argument("--quick", action="store_true", help="seed 0, 2nd and 4th ratio only, 200 lines, 1 crop")
    ap.add_argument("--no-cache", action="store_true", help="retrain the digits networks")
    ap.add_argument("--json", help="also write the results (without per-sample arrays) here")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.text_lines, args.crops = "0", 200, 1
    models = args.models.split(",")
    variants = args.variants.split(",")
    ratios_of = {m: ([float(q) for q in args.ratios.split(",")] if args.ratios else list(RATIOS[m])) for m in MODELS}
    if args.quick and not args.ratios:
        ratios_of = {m: [r[1], r[3]] for m, r in ratios_of.items()}
    seeds = [int(s) for s in args.seeds.split(",")]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m}; choose from {', '.join(MODELS)}")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v}; choose from {', '.join(VARIANTS)}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = None if args.no_cache else \
        pathlib.Path(os.environ.get("SPA_CACHE", pathlib.Path.home() / ".cache" / "spa" / "models")) / "bench_obspa"
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_obspa_"))
    try:
        import subprocess
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "spa"], capture_output=True,
                               text=True).stdout.strip()
        rev = f"spa at commit {rev}" + (" with local changes to spa/" if dirty else "") if rev else ""
    except OSError:
        rev = ""
    t_start = time.perf_counter()
    results, notes, timing = {}, {}, {}
    log = say

    digits = [m for m in models if m.startswith("digits")]
    if digits:
        t0, n_trained = time.perf_counter(), 0
        for seed in seeds:
            t_net = time.perf_counter()
            net, xtr, ytr, xte, yte, cached = _digits_net(seed, args.epochs, cache)
            n_trained += not cached
            log(f"[digits] network seed {seed}: " + ("cached" if cached else f"trained in {time.perf_counter() - t_net:.0f}s"))
            calib = tmp / f"digits_calib_s{seed}.npz"
            np.savez(calib, x=xtr[:128])
            for m in digits:
                path = tmp / f"{m}_s{seed}.onnx"
                _export_digits(net, path, keep_bn=(m == "digits_bn"))
                run = run_model(m, path, Classifier(xte, yte, "x"), (calib, 32), ratios_of[m], variants, [seed], log)
                results.setdefault(m, []).append(run)
                notes[m] = (f"{len(yte)} held-out digits per network, {len(seeds)} network(s) (seeds "
                            f"{args.seeds}, {args.epochs} epochs, own train/test split each); calibration: "
                            f"128 training images")
        timing["+".join(digits) + f" ({len(seeds)} networks, {n_trained} trained)"] = time.perf_counter() - t0
    if "ppocr_cls" in models:
        from spa import zoo
        t0 = time.perf_counter()
        x, y, xc, how = text_sets(args.text_lines, 64, offset=10 * args.eval_seed)
        calib = tmp / "ppocr_cls_calib.npz"
        np.savez(calib, x=xc)
        run = run_model("ppocr_cls", zoo.fetch("ppocr_cls"), Classifier(x, y, "x", batch=32), (calib, 32),
                        ratios_of["ppocr_cls"], variants, seeds, log, input_shapes={"x": [1, 3, 48, 192]})
        results["ppocr_cls"] = [run]
        notes["ppocr_cls"] = (f"{len(y)} rendered text lines at 48x192 from {how}; calibration: {len(xc)} "
                              f"other rendered lines (another seed)")
        timing["ppocr_cls"] = time.perf_counter() - t0
    if "yolov8n" in models:
        from spa import zoo
        t0 = time.perf_counter()
        x = photo_views(EVAL_PHOTOS, args.crops, seed=10 * args.eval_seed)
        xc = photo_views(CALIB_PHOTOS, 1, seed=10 * args.eval_seed + 1)[:32]
        calib = tmp / "yolov8n_calib.npz"
        np.savez(calib, images=xc)
        ev = Detector(x)
        run = run_model("yolov8n", zoo.fetch("yolov8n"), ev, (calib, 4), ratios_of["yolov8n"], variants, seeds, log,
                        input_shapes={"images": [1, 3, 320, 320]})
        n_det = sum(len(d[0]) for d in ev.dense)
        results["yolov8n"] = [run]
        notes["yolov8n"] = (f"{len(x)} letterboxed 320x320 views (full, {args.crops} crops, and flips) of "
                            f"{', '.join(EVAL_PHOTOS)}; the dense model makes {n_det} detections on them "
                            f"(in {sum(len(d[0]) > 0 for d in ev.dense)} views); calibration: {len(xc)} views of "
                            f"{', '.join(CALIB_PHOTOS)}")
        timing["yolov8n"] = time.perf_counter() - t0
    total = time.perf_counter() - t_start

    cmd = "python tools/bench_obspa.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = ["# OBSPA benchmark: accuracy vs MACs removed (no fine-tuning)", "",
          "Generated by `tools/bench_obspa.py` (see its docstring and docs/obspa.md, \"Benchmark\"). Command:", "",
          f"    OPENBLAS_NUM_THREADS=1 {cmd.strip()}", "",
          *([f"Measured with {rev}.", ""] if rev else []),
          f"Total runtime {total / 60:.1f} min on this machine ({os.cpu_count()} CPU cores, shared; 1-min load "
          f"average at the end {os.getloadavg()[0]:.1f}): " +
          ", ".join(f"{k} {v:.0f}s" for k, v in timing.items()) + ". `prune s` is the wall time of the "
          "`spa.prune` call (the analysis is shared and not included; Hessians / calibration statistics "
          "are).", "",
          "Every variant prunes the same fraction `ratio` of every prunable group (`spa.prune(model, ratio, "
          "...)`), so MACs removed are equal across variants at a ratio (column header, from the report's "
          "before/after MACs).  Cells: mean ± std over seeds (digits: over independently trained "
          "networks; fixed models: over the seeds of the synthetic Hessian inputs, seeded variants only).",
          "",
          "Variants: `l2` is spa's `l2` criterion (L2 norm over every weight slice a channel owns: producer "
          "filter, BatchNorm, consumer columns). `obspa:identity` is `hessian=\"identity\"`: OBS with H = I "
          "ranks by the L2 norm of the *consumer* columns only and compensates nothing, so it is not the "
          "same ranking as `l2`. `obspa:synthetic` is `hessian=\"synthetic\"` (8 batches of standard-normal "
          "inputs, seeded by `seed`), `obspa:bn` is `hessian=\"bn\"` (BatchNorm statistics where a "
          "BatchNormalization, possibly through one activation, feeds the consumer; synthetic elsewhere), "
          "`obspa:calib` is `hessian=\"auto\"` with `calib=FILE.npz`; `wanda`, `flap` and `act_mean` use the "
          "same file. Calibration samples never overlap the evaluation samples.", "",
          "Dev-only dependencies (not needed by spa): torch, scikit-learn, scikit-image, matplotlib, Pillow.",
          ""]
    for name, runs in results.items():
        r0 = runs[0]
        md += [f"## {name}", "", f"{r0['macs'] / 1e6:.1f}M MACs, {r0['params'] / 1e3:.1f}k params. "
               f"Evaluation: {notes[name]}."]
        bnf = [r.get("bn_fraction") for run in runs for r in _ok(run["rows"]) if r["variant"] == "obspa:bn"]
        if "obspa:bn" in variants:
            if bnf:
                md.append(f"`obspa:bn`: {np.mean(bnf):.0%} of the consumer Hessians come from BatchNorm, the "
                          "rest fall back to synthetic.")
            else:
                md.append("`obspa:bn` omitted: no BatchNormalization feeds a modelled consumer here (it "
                          "would be `obspa:synthetic`).")
        errs = [r for run in runs for r in run["rows"] if "error" in r]
        for e in errs:
            md.append(f"FAILED: {e['variant']} ratio {e['ratio']} seed {e['seed']}: {e['error']}")
        md += model_section(name, runs, ratios_of[name], variants) + [""]
    if results:
        try:
            plot(results, ratios_of, variants, out / "obspa_bench.png")
            md += ["![accuracy vs MACs removed](obspa_bench.png)", ""]
        except ImportError:
            print("matplotlib not installed: no plot", file=sys.stderr)
    (out / "obspa_bench.md").write_text("\n".join(md))
    log("\n".join(md))
    if args.json:
        clean = {k: [{**{kk: vv for kk, vv in run.items() if kk not in ("evaluator", "rows")},
                      "rows": [{kk: vv for kk, vv in r.items() if kk != "_samples"} for r in run["rows"]]}
                     for run in v] for k, v in results.items()}
        pathlib.Path(args.json).write_text(json.dumps({"total_s": total, "timing": timing, "results": clean}, indent=1))
    log(f"total {total:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
