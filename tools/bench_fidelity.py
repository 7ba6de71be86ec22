#!/usr/bin/env python
"""Fidelity benchmark: sensitivity-aware allocation (``--target fidelity=C``, ``--allocate sensitivity``)
against uniform ratios and the global threshold, measured on held-out inputs that spa never saw.

    python tools/bench_fidelity.py --out docs/fidelity_bench.md [--models ppocr_rec ppocr_cls yolov8n ppocr_det]
    python tools/bench_fidelity.py --curves docs/fidelity_curves.png --json docs/fidelity_curves.json
    python tools/bench_fidelity.py --models ppocr_rec --score rec.onnx   # a model `spa prune` wrote

``--curves``: held-out fidelity against MACs removed, uniform ratios against fidelity targets (and, for
the recogniser, fidelity targets with obspa), one panel per model (docs/criteria.md shows them).

Held-out inputs are rendered text (PIL, DejaVu fonts, seeded): text lines for the PP-OCRv4 recogniser
and direction classifier, pages of text for the detector and YOLOv8n (not what YOLO was trained on,
but real edges and strokes rather than noise).  For the recogniser the character accuracy of CTC
greedy decoding (the model's own dictionary, from its metadata) against the rendered strings is
reported too, absolute and relative to the dense model's.  Configurations without ``--calib`` give spa
no data (its synthetic inputs); those with it get rendered inputs of the same kind from other seeds.
Every configuration prunes the same analysis (l2 scores unless named).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import string
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FONTS = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
         "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"]
ALPHABET = string.ascii_letters + string.digits


def _font(i, size):
    from PIL import ImageFont
    for path in FONTS[i % len(FONTS):] + FONTS:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default()


def text_lines(n, seed=0):
    """``n`` rendered lines: (image uint8 HxWx3, text)."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        text = "".join(rng.choice(list(ALPHABET), int(rng.integers(4, 11))))
        font = _font(i, int(rng.integers(26, 36)))
        w = int(font.getlength(text)) + 16
        img = Image.new("RGB", (w, 48), (255, 255, 255))
        ImageDraw.Draw(img).text((8, 6), text, fill=tuple(int(c) for c in rng.integers(0, 80, 3)), font=font)
        out.append((np.asarray(img), text))
    return out


def rec_input(img, h=48, w=320):
    """PP-OCR recogniser preprocessing: height 48, width by aspect (<= 320), (x/255 - 0.5)/0.5, right pad."""
    from PIL import Image
    ih, iw = img.shape[:2]
    nw = min(w, int(np.ceil(h * iw / ih)))
    x = np.asarray(Image.fromarray(img).resize((nw, h)), np.float32) / 255.0
    x = (x - 0.5) / 0.5
    out = np.zeros((3, h, w), np.float32)
    out[:, :, :nw] = x.transpose(2, 0, 1)
    return out[None]


def page(seed, size):
    """A square page of rendered words, normalised like PP-OCR's detector (ImageNet mean/std)."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for k in range(int(size / 40)):
        text = "".join(rng.choice(list(ALPHABET), int(rng.integers(3, 9))))
        d.text((int(rng.integers(0, size // 2)), int(rng.integers(0, size - 30))), text,
               fill=tuple(int(c) for c in rng.integers(0, 120, 3)), font=_font(k, int(rng.integers(18, 34))))
    x = np.asarray(img, np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def ctc_decode(probs, chars):
    idx = probs.argmax(-1)
    out, prev = [], -1
    for i in idx:
        if i != prev and i != 0 and i - 1 < len(chars):
            out.append(chars[i - 1])
        prev = i
    return "".join(out)


def char_accuracy(pred, truth):
    """1 - edit distance / len(truth), at least 0."""
    d = np.arange(len(truth) + 1)
    for i, c in enumerate(pred, 1):
        prev, d[0] = d[0], i
        for j, t in enumerate(truth, 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (c != t))
            prev, d[j] = d[j], cur
    return max(0.0, 1.0 - d[len(truth)] / max(len(truth), 1))


def _analysis(name, args):
    import spa
    if args.page_size and name in ("ppocr_det", "yolov8n"):
        inp = {"ppocr_det": "x", "yolov8n": "images"}[name]
        return spa.analyze(name, input_shapes={inp: [1, 3, args.page_size, args.page_size]})
    return spa.analyze(name)


def held_out(name, an, n):
    """Held-out feeds for model ``name`` at the analysis's input size, and the rendered texts."""
    inp = next(iter(an.probe.inputs))
    shape = an.probe.inputs[inp].shape
    if name in ("ppocr_rec", "ppocr_cls"):
        lines = text_lines(n, seed=1234)
        return [{inp: rec_input(img, shape[2], shape[3])} for img, _ in lines], [t for _, t in lines]
    return [{inp: page(5000 + i, shape[2])} for i in range(n)], None


def held_out_calib(name, an, n=8):
    """Calibration inputs of the same kind as the held-out ones, rendered from other seeds."""
    inp = next(iter(an.probe.inputs))
    shape = an.probe.inputs[inp].shape
    if name in ("ppocr_rec", "ppocr_cls"):
        return [{inp: rec_input(img, shape[2], shape[3])} for img, _ in text_lines(n, seed=99)]
    return [{inp: page(9000 + i, shape[2])} for i in range(min(n, 4))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=ap_default())
    ap.add_argument("--held-out", type=int, default=24, help="held-out inputs per model")
    ap.add_argument("--out", type=pathlib.Path)
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--curves", type=pathlib.Path, help="sweep ratios and fidelity targets, plot to this PNG")
    ap.add_argument("--targets", type=float, nargs="*", default=list(CURVE_TARGETS),
                    help="with --curves: the fidelity targets swept")
    ap.add_argument("--page-size", type=int, default=None,
                    help="analyse page models (ppocr_det, yolov8n) and render their held-out pages at NxN")
    ap.add_argument("--configs", nargs="*", default=None, help="run only the configurations with these labels")
    ap.add_argument("--keep", type=pathlib.Path,
                    help="with --curves: an earlier --json whose rows of models not swept now are kept and plotted")
    ap.add_argument("--score", type=pathlib.Path, metavar="FILE",
                    help="measure FILE, a model of the first of --models pruned by `spa prune`, on the held-out inputs")
    args = ap.parse_args(argv)
    if args.score:
        return score(args)
    if args.curves:
        return curves(args)
    configs = [("ratio 0.05", dict(ratio=0.05)), ("ratio 0.1", dict(ratio=0.1)), ("ratio 0.2", dict(ratio=0.2)), ("ratio 0.3", dict(ratio=0.3)),
               ("macs=1.3 global", dict(target="macs=1.3")),
               ("macs=1.3 sensitivity", dict(target="macs=1.3", allocate="sensitivity")),
               ("macs=1.3 sensitivity, obspa", dict(target="macs=1.3", allocate="sensitivity", criterion="obspa")),
               ("fidelity=0.99", dict(target="fidelity=0.99")), ("fidelity=0.95", dict(target="fidelity=0.95")),
               ("fidelity=0.95, obspa", dict(target="fidelity=0.95", criterion="obspa"))]
    rows = []
    import tempfile
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="spa-fid-"))
    for name in args.models:
        an = _analysis(name, args)
        feeds, texts = held_out(name, an, args.held_out if name in ("ppocr_rec", "ppocr_cls") else 4)
        calib = tmp / f"{name}_calib.npz"   # other rendered inputs than the held-out ones
        calib_feeds = held_out_calib(name, an)
        np.savez(calib, **{k: np.concatenate([f[k] for f in calib_feeds]) for k in calib_feeds[0]})
        model_configs = configs + [
            ("macs=1.3 sensitivity, --calib", dict(target="macs=1.3", allocate="sensitivity", calib=str(calib))),
            ("fidelity=0.99, --calib", dict(target="fidelity=0.99", calib=str(calib))),
            ("fidelity=0.95, --calib", dict(target="fidelity=0.95", calib=str(calib)))]
        if name in ("ppocr_cls", "ppocr_det"):   # read text, but do not say so: told with --synthetic text
            model_configs += [("macs=1.3 sensitivity, --synthetic text",
                               dict(target="macs=1.3", allocate="sensitivity", synthetic="text")),
                              ("fidelity=0.99, --synthetic text", dict(target="fidelity=0.99", synthetic="text")),
                              ("fidelity=0.95, --synthetic text", dict(target="fidelity=0.95", synthetic="text"))]
        ref = _reference(an, feeds, texts)
        for label, kw in model_configs:
            if args.configs and label not in args.configs:
                continue
            if args.page_size:   # validate at the analysis's size, not the zoo's default
                kw = {**kw, "input_shapes": {k: list(v.shape) for k, v in an.probe.inputs.items()}}
            row = {"config": label, **_measure(name, an, kw, feeds, ref)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    if args.out:
        args.out.write_text(markdown(rows, args))
    return 0


CURVE_RATIOS = (0.05, 0.1, 0.2, 0.3, 0.4)
CURVE_TARGETS = (0.999, 0.995, 0.99, 0.98, 0.95)


def _reference(an, feeds, texts) -> dict:
    """The dense model's outputs on the held-out ``feeds``, and for a recogniser (the model's own
    dictionary in its metadata) the rendered ``texts`` and its character accuracy on them."""
    import onnxruntime as ort
    dense = ort.InferenceSession(an.full_model().SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [dense.run(None, f)[0] for f in feeds]
    meta = {p.key: p.value for p in an.model.metadata_props}
    chars = meta["character"].split("\n") + [" "] if texts and "character" in meta else None
    acc = float(np.mean([char_accuracy(ctc_decode(r[0], chars), t) for r, t in zip(outputs, texts)])) \
        if chars else None
    return {"outputs": outputs, "texts": texts, "chars": chars, "dense_acc": acc}


def _measure(name, an, kw, feeds, ref) -> dict:
    """Prune ``name`` with options ``kw`` and measure the result on the held-out ``feeds`` against
    ``ref`` (``_reference``): MACs, fidelity (spa's own and held out), character accuracy."""
    import spa
    t0 = time.perf_counter()
    res = spa.prune(name, analysis=an, **kw)
    before, after = res.report["before"]["macs"], res.report["after"]["macs"]
    row = {"model": name, "kw": kw, "seconds": round(time.perf_counter() - t0, 1),
           "macs_factor": round(before / max(after, 1), 3), "macs_removed": round(1 - after / before, 4),
           "fidelity_synthetic": res.report["fidelity"]["min"]}
    if "target_reached" in res.report and "fidelity" in kw.get("target", ""):
        row["target_measured"] = res.report["target_reached"]
    return {**row, **_held_out_scores(res.model.SerializeToString(), feeds, ref)}


def _held_out_scores(model, feeds, ref) -> dict:
    """A pruned ``model`` (bytes or a path) on the held-out ``feeds`` against ``ref``: the output
    cosine over all the inputs at once and, for a recogniser, the character accuracy."""
    import onnxruntime as ort
    from spa.planning.fidelity import cosine
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    got = [sess.run(None, f)[0] for f in feeds]
    row = {"fidelity_held_out": round(cosine(np.concatenate([a.ravel() for a in ref["outputs"]]),
                                             np.concatenate([b.ravel() for b in got])), 4)}
    if ref["dense_acc"] is not None:
        acc = float(np.mean([char_accuracy(ctc_decode(g[0], ref["chars"]), t) for g, t in zip(got, ref["texts"])]))
        row.update(dense_char_acc=round(ref["dense_acc"], 4), char_acc=round(acc, 4),
                   char_acc_rel=round(acc / max(ref["dense_acc"], 1e-9), 4))
    return row


def score(args) -> int:
    """``--score FILE``: a model pruned elsewhere (``spa prune NAME -o FILE ...``) of the first of
    ``--models``, measured on the same held-out inputs as the table's rows."""
    name = args.models[0]
    an = _analysis(name, args)
    feeds, texts = held_out(name, an, args.held_out if name in ("ppocr_rec", "ppocr_cls") else 4)
    row = {"model": name, "scored": str(args.score), **_held_out_scores(str(args.score), feeds, _reference(an, feeds, texts))}
    print(json.dumps(row), flush=True)
    return 0


def curves(args) -> int:
    """Held-out fidelity against MACs removed: uniform ratios vs fidelity targets, per model."""
    import spa
    models = [m for m in args.models if m != "ppocr_det"] if args.models == ap_default() else args.models
    rows = [r for r in json.loads(args.keep.read_text()) if r["model"] not in models] if args.keep else []
    for name in models:
        an = spa.analyze(name)
        feeds, texts = held_out(name, an, args.held_out if name in ("ppocr_rec", "ppocr_cls") else 4)
        ref = _reference(an, feeds, texts)
        sweeps = [("uniform ratio", [dict(ratio=r) for r in CURVE_RATIOS]),
                  ("fidelity target", [dict(target=f"fidelity={c}") for c in args.targets])]
        if name == "ppocr_rec":
            sweeps.append(("fidelity target, obspa",
                           [dict(target=f"fidelity={c}", criterion="obspa") for c in args.targets]))
        if name == "ppocr_cls":   # reads text lines without saying so
            sweeps.append(("fidelity target, --synthetic text",
                           [dict(target=f"fidelity={c}", synthetic="text") for c in args.targets]))
        for label, kws in sweeps:
            for kw in kws:
                row = {"sweep": label, **_measure(name, an, kw, feeds, ref)}
                print(json.dumps(row), flush=True)
                rows.append(row)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    _plot(rows, args.curves)
    return 0


def replot(json_path, png_path):
    """Plot an earlier ``--curves --json`` run again."""
    _plot(json.loads(pathlib.Path(json_path).read_text()), png_path)


def ap_default():
    return ["ppocr_rec", "ppocr_cls", "yolov8n", "ppocr_det"]


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    floor = 0.7   # points below it are drawn on it as downward triangles
    for ax, m in zip(axes[0], models):
        for sweep in dict.fromkeys(r["sweep"] for r in rows if r["model"] == m):
            pts = sorted((r["macs_removed"], r["fidelity_held_out"]) for r in rows if r["model"] == m and r["sweep"] == sweep)
            xs, ys = [100 * x for x, _ in pts], [max(y, floor) for _, y in pts]
            line, = ax.plot(xs, ys, "-", label=sweep)
            for x, (_, y) in zip(xs, pts):
                ax.plot(x, max(y, floor), "v" if y < floor else "o", color=line.get_color())
        ax.set_title(m)
        ax.set_xlabel("MACs removed (%)")
        ax.set_ylabel(f"held-out output cosine (below {floor}: on the axis)")
        ax.set_ylim(floor - 0.01, 1.005)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows, args) -> str:
    out = ["# Fidelity: sensitivity-aware allocation, measured on held-out inputs", "",
           "Measured by `python tools/bench_fidelity.py --out docs/fidelity_bench.md` (2-core dev box). Every prune "
           "uses spa's synthetic inputs unless it says `--calib` (then rendered inputs of the same kind as the "
           "held-out ones, other seeds); held-out inputs are rendered text (lines for the PP-OCRv4 recogniser "
           "and classifier, pages for the detector and YOLOv8n). `fidelity` = the output cosine, over all the inputs at once, to the "
           "dense model; `char acc` = character accuracy of CTC greedy decoding against the rendered strings "
           "(recogniser), `rel` = relative to the dense model's.", "",
           "| model | config | MACs | fidelity (synthetic) | fidelity (held-out) | char acc (rel) | s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['char_acc']:.3f} ({r['char_acc_rel']:.3f})" if "char_acc" in r else ""
        out.append(f"| {r['model']} | {r['config']} | {r['macs_factor']:.2f}x | {r['fidelity_synthetic']:.4f} | "
                   f"{r['fidelity_held_out']:.4f} | {acc} | {r['seconds']:.0f} |")
    dense = {r["model"]: r["dense_char_acc"] for r in rows if "dense_char_acc" in r}
    if dense:
        out += ["", "Dense character accuracy on the rendered lines: " +
                ", ".join(f"{k} {v:.3f}" for k, v in dense.items()) + "."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
