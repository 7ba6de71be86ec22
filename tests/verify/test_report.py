"""``spa report R.json -o report.html`` (``spa.verify.report``): one self-contained page from a prune report.

The page is checked as HTML (parsed: balanced tags, the group table with a row per group, one chart per
width, nothing fetched from elsewhere) and, where Debian's ``chromium`` is installed, in headless
Chromium: no console output at all (the page logs nothing, so any line is an error; a broken page is
the control that this is seen), the sorting script ran (it marks ``<body data-ready="1">``), and a
screenshot is not blank and shows the chart's "after" bars.
"""
import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

import spa
from spa.cli import cli
from spa.verify import report as rep
from graphs import residual_chain

VOID = {"meta", "br", "img", "input", "link", "hr", "rect", "line", "circle", "polyline"}


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.count, self.attrs = [], [], {}, []

    def handle_starttag(self, tag, attrs):
        self.count[tag] = self.count.get(tag, 0) + 1
        self.attrs += attrs
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.count[tag] = self.count.get(tag, 0) + 1
        self.attrs += attrs

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()


def parsed(text):
    t = Tags()
    t.feed(text)
    t.close()
    assert not t.errors and not t.stack, (t.errors, t.stack)
    return t


@pytest.fixture(scope="module")
def report_json(tmp_path_factory):
    import onnx
    d = tmp_path_factory.mktemp("report")
    onnx.save(residual_chain(), str(d / "m.onnx"))
    r = CliRunner().invoke(cli, ["prune", str(d / "m.onnx"), "-o", str(d / "p.onnx"), "--ratio", "0.5",
                                 "--report", str(d / "r.json"), "-q"])
    assert r.exit_code == 0, r.output
    return d / "r.json"


def test_page_structure(report_json, tmp_path):
    r = CliRunner().invoke(cli, ["report", str(report_json), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "r.html").read_text()
    t = parsed(text)
    doc = json.loads(report_json.read_text())
    assert t.count["tr"] == len(doc["groups"]) + 1 + 2          # the group table, and the fidelity table's
    assert t.count["svg"] == 1 and t.count["rect"] > 2          # channels per pruned group (no layers here)
    assert text.count("http") == text.count("http://www.w3.org/2000/svg")   # nothing fetched
    assert not [a for a in t.attrs if a[0] in ("src", "href")]
    assert "fidelity" in text and "MACs" in text


def test_layers_chart_and_measurements():
    layers = [{"layer": i, "num_attention_heads": [4, 2], "intermediate_size": [128, 64]} for i in range(3)]
    doc = {"before": {"params": 10, "macs": 100}, "after": {"params": 5, "macs": 40}, "groups": [],
           "layers": layers, "plan": {"rounds": [{"fidelity": 0.99, "macs_saved": 10}, {"fidelity": 0.9, "macs_saved": 30}]},
           "bench": {"results": [{"model": "a.onnx", "median_ms": 1.5, "speedup": 1.0}]}}
    t = parsed(rep.render(doc))
    assert t.count["svg"] == 3 and t.count["circle"] == 2       # heads, MLP width; the search's rounds
    assert t.count["table"] == 2                                 # groups, latency


def test_not_a_report(tmp_path):
    (tmp_path / "x.json").write_text("[1, 2]")
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "x.json"), "-o", str(tmp_path / "x.html")])
    assert r.exit_code == 2 and "not a prune report" in r.output and not (tmp_path / "x.html").exists()
    (tmp_path / "y.json").write_text("{")
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "y.json"), "-o", str(tmp_path / "x.html")])
    assert r.exit_code == 2 and "not a JSON file" in r.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def browse(page, *args):
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", *args, page.as_uri()], capture_output=True, text=True, timeout=120)
    return out.stdout, [line for line in out.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_renders_in_headless_chromium(report_json, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    assert browse(bad, "--dump-dom")[1]                          # the control: an error is seen
    page = tmp_path / "r.html"
    rep.write_report(report_json, page)
    dom, console = browse(page, "--dump-dom")
    assert console == [] and 'data-ready="1"' in dom
    shot = tmp_path / "shot.png"
    browse(page, f"--screenshot={shot}", "--window-size=1000,900")
    img = Image.open(shot).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    assert len(colours) > 20                                     # not blank
    blue = sum(n for n, c in colours if abs(c[0] - 0x1f) < 12 and abs(c[1] - 0x6f) < 12 and abs(c[2] - 0xeb) < 12)
    assert blue > 500                                            # the "after" bars of the chart
