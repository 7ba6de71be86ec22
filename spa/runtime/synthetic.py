"""What spa feeds a model when the user gives no data: obspa's Hessians, the fidelity guard, the
sensitivity table and the fidelity search all run on these inputs.

* **Integer inputs** take realistic ranges (token ids span the embedding, masks are ones:
  ``spa.runtime.shapes.integer_ranges``), other floats white noise (and the description says that spa
  cannot tell what they hold).
* **Images** (float, at least 8x8, channels first or last: ``spa.runtime.kinds.images`` reads the
  layout from the graph, a Keras model exported by tf2onnx takes ``[N, 224, 224, 3]``) are 1/f
  ("pink") noise, made channels first and laid out as the input is: a trained network's convolutions
  see spatially correlated inputs, and white noise gives their Hessians the wrong structure
  (docs/obspa.md).  A layout read from the shape alone is a guess, and the description says so.
  Where BatchNorms the images reach are left in the graph, the noise gets the scale and offset that
  match their running statistics (``spa.runtime.bnmatch``), and the description says so.
* **Text recognisers** that name their characters in their metadata (PaddleOCR's ``character``
  entry: a CTC model over that dictionary) get **rendered text lines** of their own characters,
  preprocessed the way PaddleOCR feeds its recognisers (height kept, width by aspect, ``(x/255 -
  0.5)/0.5``, zero padding on the right).  Noise is nothing like a text line: on the PP-OCRv4
  recogniser a 1.3x MACs prune measured on pink noise keeps 9% of the dense character accuracy on
  real lines, measured on these lines 98% (docs/fidelity_bench.md).  The lines use Pillow's
  built-in font (no system fonts needed) and the printable ASCII part of the dictionary; Pillow is a
  dependency of spa, and where it cannot render (a build without FreeType) the images fall back to
  pink noise and the description says so.  A dynamic batch carries
  several lines (:func:`lines_per_batch`: the images are small, more lines make steadier statistics).
* **Models that read text lines without saying so** are recognised from the graph
  (``spa.runtime.kinds.text_reader``) and get lines of Latin characters, as ``--synthetic text``
  gives them, and the description names what spa took the model for: a CTC head (a recogniser
  exported without its dictionary), a text direction classifier (a 2-class softmax over a
  line-shaped input; half of its lines are drawn upside down, so that both of its classes, 0 and
  180 degrees, appear).  ``--synthetic text`` asks for lines (of Latin characters) for any other
  image model; an input that is not line-shaped (less than twice as wide as high: a text
  detector's) gets pages of rendered words instead (:func:`text_pages`).  Without --input-shapes a
  recogniser (its characters listed, or a CTC head) is probed at PaddleOCR's line size, 48x320
  (32x320 if it refuses that; ``spa.runtime.kinds.recogniser_shapes``), not at the 224 (or
  fallback 64) that other images get.
"""
from __future__ import annotations

import numpy as np

from ..errors import SpaError
from ..io.weights import is_float
from . import bnmatch, calib, kinds, textgen
from .probing import dynamic_dims
from .shapes import recogniser_characters

#: pixels of text lines per synthetic batch when the batch axis is dynamic: 16 lines of a 48x192
#: direction classifier, 10 of a 48x320 recogniser (the sensitivity table measures 2 batches: a
#: 2-class output needs a dozen lines or more to say anything steady, and lines are cheap to run)
LINE_PIXELS_PER_BATCH = 160_000
MAX_LINES_PER_BATCH = 16


def lines_per_batch(h: int, w: int) -> int:
    return int(np.clip(LINE_PIXELS_PER_BATCH // max(h * w, 1), 1, MAX_LINES_PER_BATCH))


def pink(rng, shape):
    """Noise with natural images' second-order statistics: a 1/f amplitude spectrum (strong
    correlation between neighbouring pixels at every scale) and channels sharing most of their
    signal, standardised per image to zero mean and unit variance."""
    N, C, H, W = shape
    white = rng.standard_normal((N, 1, H, W)) + 0.5 * rng.standard_normal((N, C, H, W))
    f = np.sqrt(np.fft.fftfreq(H)[:, None] ** 2 + np.fft.rfftfreq(W)[None, :] ** 2)
    f[0, 0] = 1.0 / max(H, W)
    x = np.fft.irfft2(np.fft.rfft2(white) / f, s=(H, W))
    x -= x.mean(axis=(1, 2, 3), keepdims=True)
    x /= x.std(axis=(1, 2, 3), keepdims=True) + 1e-12
    return x


def _printable(characters) -> list:
    pool = [c for c in characters if len(c) == 1 and 32 < ord(c) < 127]
    return pool if len(pool) >= 10 else list("abcdefghijklmnopqrstuvwxyz0123456789")


def _as_input(img, rng, C):
    """An RGB image as a ``C``-channel input the way PaddleOCR normalises one: a little sensor noise,
    ``(x/255 - 0.5)/0.5``, channels first (grey copies beyond three)."""
    x = np.asarray(img, np.float32) / 255.0
    x = ((x + rng.normal(0.0, 0.02, x.shape) - 0.5) / 0.5).transpose(2, 0, 1)
    return x[:C] if C <= 3 else np.concatenate([x] + [x[:1]] * (C - 3))


def text_lines(rng, shape, characters, upside_down=False):
    """``shape`` = (N, C, H, W) float32 images of rendered text lines of ``characters`` (random
    words, sizes, ink and background, sometimes inverted), each resized to height H keeping its
    aspect, normalised to [-1, 1] and zero-padded on the right, as PaddleOCR feeds a recogniser.
    ``upside_down``: every second line is turned by 180 degrees before it is resized and padded (a
    text direction classifier's other class)."""
    from PIL import Image, ImageDraw, ImageFont
    N, C, H, W = shape
    pool = _printable(characters)
    out = np.zeros(shape, np.float32)
    for i in range(N):
        size = int(rng.integers(20, 44))
        font = ImageFont.load_default(size=size)
        words, n_chars = [], int(rng.integers(3, 25))
        while sum(len(w) for w in words) < n_chars:
            words.append("".join(rng.choice(pool, int(rng.integers(1, 9)))))
        text = " ".join(words)
        bg, ink = int(rng.integers(150, 256)), int(rng.integers(0, 110))
        if rng.random() < 0.15:
            bg, ink = ink, bg
        tint = rng.integers(-20, 21, 3)
        colour = lambda v: tuple(int(np.clip(v + t, 0, 255)) for t in tint)  # noqa: E731
        w0, h0 = int(font.getlength(text)) + int(rng.integers(4, 24)), int(size * rng.uniform(1.15, 1.6))
        img = Image.new("RGB", (w0, h0), colour(bg))
        ImageDraw.Draw(img).text((int(rng.integers(2, 12)), (h0 - size) // 2), text, fill=colour(ink), font=font)
        if upside_down and i % 2:
            img = img.rotate(180)
        nw = max(1, min(W, int(np.ceil(H * w0 / h0))))
        out[i, :, :, :nw] = _as_input(img.resize((nw, H), Image.BILINEAR), rng, C)
    return out


def text_pages(rng, shape, characters):
    """``shape`` = (N, C, H, W) float32 pages: rows of words of ``characters`` at random sizes and
    places on a light background (sometimes dark), normalised to [-1, 1], for an input that is not
    line-shaped (a text detector's page)."""
    from PIL import Image, ImageDraw, ImageFont
    N, C, H, W = shape
    pool = _printable(characters)
    out = np.zeros(shape, np.float32)
    for i in range(N):
        bg, ink = int(rng.integers(170, 256)), int(rng.integers(0, 110))
        if rng.random() < 0.15:
            bg, ink = ink, bg
        img = Image.new("RGB", (W, H), (bg,) * 3)
        draw = ImageDraw.Draw(img)
        y = int(rng.integers(0, max(H // 10, 1)))
        while y < H:
            size = int(rng.integers(max(H // 40, 10), max(H // 12, 12)))
            x = int(rng.integers(0, max(W // 4, 1)))
            text = " ".join("".join(rng.choice(pool, int(rng.integers(1, 9)))) for _ in range(int(rng.integers(1, 6))))
            draw.text((x, y), text, fill=tuple(int(np.clip(ink + t, 0, 255)) for t in rng.integers(-30, 31, 3)),
                      font=ImageFont.load_default(size=size))
            y += int(size * rng.uniform(1.3, 3.0))
        out[i] = _as_input(img, rng, C)
    return out


#: what ``--synthetic`` may ask for: ``auto`` (text lines for a recogniser that lists its
#: characters, 1/f noise for other images), ``noise`` (1/f noise for every image), ``text``
#: (rendered text lines for every 1- or 3-channel image: a direction classifier, a recogniser
#: without a character list)
KINDS = ("auto", "noise", "text")
#: the characters of text lines for a model that does not list its own
LATIN = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;-/()'")


def kind(an, wanted: str = "auto") -> str:
    """Which synthetic images ``an``'s model gets (``wanted``: one of ``KINDS``): 'text lines',
    '1/f noise' or 'none' (no image input)."""
    if wanted not in KINDS:
        raise SpaError(f"unknown synthetic input kind {wanted!r}; choose one of {', '.join(KINDS)}")
    images = kinds.images(an.model, an.probe)
    if not images:
        return "none"
    text = wanted == "text" or (wanted == "auto" and kinds.text_reader(an.model, an.probe))
    if text and images[0].nchw(an.probe.inputs[images[0].name].shape)[1] in (1, 3):
        return "text lines" if _pillow() else NO_PILLOW
    return "1/f noise"


#: a Pillow that cannot render (a dependency of spa, so only a broken or FreeType-less build)
NO_PILLOW = "1/f noise (Pillow could not render text lines: reinstall it, pip install --force-reinstall 'pillow>=10.1')"


def _pillow() -> bool:
    try:
        from PIL import ImageFont
        ImageFont.load_default(size=20)
    except Exception:   # no Pillow, or one built without FreeType
        return False
    return True


def _dynamic_batch(an, name) -> bool:
    return (name, 0) in set(dynamic_dims(an.model))


def _line_rows(an, name, nchw) -> int:
    """Rendered lines in a batch of image input ``name`` (``nchw``: its probed shape, channels first)."""
    return lines_per_batch(*nchw[2:]) if _dynamic_batch(an, name) else nchw[0]


def rows_per_batch(an, wanted: str = "auto") -> int:
    """The batch dim of :func:`feeds`' batches for a model that is not a language model, known
    before any is made: rendered lines of a dynamic batch fill ``lines_per_batch``, else the probe's."""
    if kind(an, wanted) == "text lines":
        for image in kinds.images(an.model, an.probe):
            shape = an.probe.inputs[image.name].shape
            if kinds.is_line(image, shape):
                return int(_line_rows(an, image.name, image.nchw(shape)))
    first = next((v for v in an.probe.inputs.values() if np.ndim(v)), None)
    return int(np.shape(first)[0]) if first is not None else 1


def feeds(an, n_batches, seed=0, wanted: str = "auto", progress=None):
    """``(description, feeds)``: ``n_batches`` synthetic batches at the probed shapes (see the module
    doc for what each kind of input gets; ``wanted``: ``--synthetic``, one of ``KINDS``); a causal
    language model gets text it writes itself (``spa.runtime.textgen``)."""
    if textgen.causal_lm(an) is not None:
        out = textgen.text_feeds(an, n_batches, seed, progress)
        b, t = next(iter(out[0].values())).shape
        return f"synthetic ({n_batches} batches of {b} x {t} tokens of text the model wrote itself)", out
    _, out = calib.batches(an, "random", n_batches=n_batches, seed=seed)
    rng = np.random.default_rng(seed + 2)
    images = {im.name: im for im in kinds.images(an.model, an.probe)}
    what = kind(an, wanted)
    reader = kinds.text_reader(an.model, an.probe) if wanted != "noise" else None
    characters = (recogniser_characters(an.model) or LATIN) if what == "text lines" else None
    upside_down = what == "text lines" and reader is not None and reader[0] == "orientation"
    lines, noise = 0, []
    for feed in out:
        for name, v in list(feed.items()):
            image = images.get(name)
            if image is None:
                continue
            shape = image.nchw(v.shape)
            if characters is not None and not kinds.is_line(image, v.shape):
                x = text_pages(rng, shape, characters)
            elif characters is not None:
                n = _line_rows(an, name, shape)
                x = text_lines(rng, (n,) + shape[1:], characters, upside_down)
                lines = n
                if n != v.shape[0]:   # the other inputs follow the batch
                    for other, u in feed.items():
                        if other != name and u.shape[:1] == v.shape[:1] and _dynamic_batch(an, other):
                            feed[other] = np.repeat(u, n // max(v.shape[0], 1), axis=0)
            else:
                x = pink(rng, shape)
                noise.append((feed, name, image, x))
            feed[name] = image.from_nchw(x).astype(v.dtype)
    matched = bnmatch.match(an, noise, progress=progress)
    desc = describe(an, what, reader, images.values(), lines, upside_down, matched)
    return f"synthetic ({n_batches} batches, {desc})", out


def describe(an, what, reader, images, lines=0, upside_down=False, matched=None) -> str:
    """What the synthetic inputs of ``an`` are, in words: the images (``what``: :func:`kind`), what
    spa took the model for (``reader``: ``kinds.text_reader``), whether the noise was matched to its
    BatchNorm statistics (``matched``: ``bnmatch.match``), their layout when it is not channels first
    or was guessed, and the other inputs."""
    whose = "the model's characters" if recogniser_characters(an.model) else "Latin characters"
    parts = []
    if what == "text lines":
        parts.append(f"rendered text lines of {whose}, {lines} per batch" if lines else f"rendered pages of text in {whose}")
        if upside_down:
            parts[-1] += ", every second one upside down"
        if reader is not None and reader[0] != "characters":
            parts[-1] += f" (taken for {reader[1]})"
    elif what != "none":
        parts.append(f"{what} for images" + (f" {matched.describe()}" if matched is not None else ""))
    for image in images:
        if not image.sure:
            parts.append(f"'{image.name}' taken for an {image.layout} image, {image.why}: spa is not sure what it "
                         f"holds, give real inputs with --calib")
        elif image.layout != kinds.NCHW:
            parts.append(f"'{image.name}' {image.layout} ({image.why})")
    names = {im.name for im in images}
    others = [v for k, v in an.probe.inputs.items() if k not in names]
    if any(is_float(v.dtype) for v in others):
        parts.append("white noise for the other float inputs (spa cannot tell what they hold: give real ones with --calib)")
    if any(not is_float(v.dtype) for v in others) or not parts:
        parts.append("realistic integer ranges")
    return "; ".join(parts)


def calibration(an, spec, *, n_batches: int = 8, batch_size=None, seed: int = 0, wanted: str = "auto", progress=None):
    """``(description, feeds)`` that a ``--calib`` value stands for: ``synthetic`` is spa's own inputs
    (:func:`feeds`: text the model writes itself for a language model, rendered text or 1/f noise for
    images), anything else goes to ``calib.batches`` (a file, or ``random``)."""
    if str(spec) == "synthetic":
        return feeds(an, n_batches, seed, wanted, progress)
    return calib.batches(an, spec, n_batches=n_batches, batch_size=batch_size, seed=seed)
