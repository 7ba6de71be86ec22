"""The commands the docs show run as written: every command line in a code block of README.md and
docs/*.md is either run here or listed in ``NOT_RUN`` with the reason (an install, a benchmark that
takes minutes, a synopsis with placeholders, a GPU).  A command the docs drop leaves a stale entry
here, which fails too.

Commands run in the order of their file, in one folder per file, through the command line itself
(``spa.cli``, in this process); ``cmd > FILE`` writes the output to FILE.  The files they name are
stand-ins made here: ``resnet50.onnx``, ``model.onnx``, ``original.onnx`` and the rest are one small
dynamic CNN (inputs ``x`` or ``images``, as the commands name them), ``llama_kv.onnx`` and ``llama.onnx``
the tiny decoders of tools/export_transformers.py (skipped without torch), zoo names the real zoo
models; ``pruned.onnx``, ``small.onnx`` and the rest come from the commands before them.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from spa.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
START = re.compile(r"^(spa|python|pip|SPA_CACHE=\S+)\s")

#: command (as found: continuation lines joined, '$ ' and a trailing '# comment' removed) -> why it is not run
NOT_RUN = {
    "pip install .": "installs spa: .ci/run installs from the repository's files, and a fresh venv runs the README's "
                     "two commands before a release (README)",
    "pip install -e '.[test]'": "installs the test extra (see above)",
    "python -m pytest -q": "the test suite itself",
    "spa inspect MODEL": "a synopsis: MODEL is a placeholder",
    "spa prune MODEL -o OUT.onnx": "a synopsis: MODEL and OUT.onnx are placeholders",
    "spa check ORIGINAL OTHER": "a synopsis: ORIGINAL and OTHER are placeholders",
    "spa bench MODEL [MODEL...]": "a synopsis: MODEL is a placeholder",
    "python -m spa.scoring.obs CASE [MAX_STEPS|none] [float64|float32]": "a synopsis: CASE is a placeholder",
    "spa bench original.onnx pruned.onnx --provider cuda --json > bench.json": "needs a CUDA GPU and onnxruntime-gpu",
    "python tools/bench_latency.py --threads 1 --out docs/latency.md --json bench_latency.json":
        "the latency benchmark: four models, dozens of prunes and timings, about 15 minutes",
    "SPA_CACHE=/tmp/spacache python tools/bench_zoo.py --iters 30 --warmup 5 --threads 1 --round-to 1 8 "
    "--out docs/benchmarks.md --json bench_zoo.json": "the zoo benchmark: exports and times every model, tens of minutes",
    "spa prune resnet50_224_cal.onnx --ratio 0.3 [--round-to 8|16] -o r50_0.3[_rt8|_rt16].onnx":
        "a template for three commands ([...] are alternatives)",
    "spa bench resnet50_224_cal.onnx r50_0.5.onnx r50_0.3.onnx r50_0.3_rt8.onnx r50_0.3_rt16.onnx --threads 1 "
    "--iters 30": "reads the three models of the template above",
    "pip install 'spa-prune[olive]'": "installs Olive (and torch): tests/test_olive.py runs the workflow where it is",
    "python -m spa.olive package-config -o olive_spa.json": "needs olive-ai; tests/test_olive.py writes the same file",
    "spa sweep yolov8n --targets macs=1.5,2,3 --criteria l2,obspa -o sweep_yolo --jobs 2":
        "six prunes of YOLOv8n, obspa's among them: minutes; tests/test_sweep.py runs a sweep of a small CNN",
    "spa sweep yolov8n --targets macs=1.5,2,3 --criteria l2,obspa -o sweep_yolo --ray":
        "needs a running Ray cluster; tests/test_sweep.py compares Ray with the local run on a Ray it starts",
    "python -c \"import torch, torchvision; m = torchvision.models.resnet18(weights=None).eval(); "
    "torch.onnx.export(m, (torch.randn(1, 3, 224, 224),), dynamo=True, optimize=False).save('r18.onnx'); "
    "from safetensors.torch import save_file; save_file(m.state_dict(), 'r18.safetensors')\"":
        "a dynamo export of resnet18 at 224 (about a minute, and the safetensors package); the stand-in r18.onnx and "
        "r18.safetensors below are what it writes, and tests/mapping runs the export-prune-apply-map chain",
    "spa prune smollm2.onnx -o small.onnx --keep-tokens calib_python_docs_32x256.npz --report r.json":
        "the real SmolLM2-135M export (540 MB, tools/export_smollm2.py); tests/surgery/test_vocab.py runs --keep-tokens",
    "python tools/bench_vocab.py": "the SmolLM2 vocabulary measurement (the real export, a minute)",
    "python tools/bench_vocab.py --heldout heldout_licenses_16x256.npy": "the same on the other held-out text",
    "python tools/planted_moe.py planted": "writes the planted MoE and its task data: the stand-in is the same files "
                                           "(tools/planted_moe.write), made here",
}


def commands(path: Path) -> list[str]:
    """The command lines of ``path``'s code blocks (``a && b`` is two)."""
    out = []
    for block in re.finditer(r"^```[^\n]*\n(.*?)^```", path.read_text(), re.S | re.M):
        for line in block.group(1).replace("\\\n", " ").splitlines():
            line = line.strip()
            line = line[2:] if line.startswith("$ ") else line
            if not START.match(line):
                continue
            line = re.sub(r"\s+#.*$", "", line) if " #" in line else line
            out += [" ".join(part.split()) for part in line.split(" && ")]
    return out


def _cnn(name: str) -> onnx.ModelProto:
    """Conv-BN-Relu, Conv-Relu, a residual Add, pool, Gemm: input ``name`` [N, 3, H, W], dynamic."""
    rng = np.random.default_rng(0)
    w = {k: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, k) for k, s in {
        "conv1.weight": (8, 3, 3, 3), "conv1.bias": (8,), "bn.weight": (8,), "bn.bias": (8,), "bn.mean": (8,),
        "conv2.weight": (8, 8, 3, 3), "conv2.bias": (8,), "fc.weight": (5, 8), "fc.bias": (5,)}.items()}
    w["bn.var"] = numpy_helper.from_array(np.abs(rng.standard_normal(8)).astype(np.float32) + 0.5, "bn.var")
    nodes = [helper.make_node("Conv", [name, "conv1.weight", "conv1.bias"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "bn.weight", "bn.bias", "bn.mean", "bn.var"], ["b1"],
                              name="bn"),
             helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], pads=[1] * 4, name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Add", ["r1", "r2"], ["s"], name="add"),
             helper.make_node("GlobalAveragePool", ["s"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], list(w.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _stand_ins(folder: Path, text: str) -> None:
    """The input files the commands of one doc name (see the module docstring)."""
    for name, input_name in (("resnet50.onnx", "x"), ("original.onnx", "x"), ("model.onnx", "images"),
                             ("resnet50_224_cal.onnx", "x"), ("r18.onnx", "x")):
        onnx.save(_cnn(input_name), str(folder / name))
    rng = np.random.default_rng(1)
    for name in ("data.npz", "calib.npz"):
        np.savez(folder / name, images=rng.standard_normal((8, 3, 16, 16)).astype(np.float32))
    if "r18.safetensors" in text:   # the state_dict of r18.onnx, as the export in map.md saves it
        from spa.io import safetensors
        arrays = [numpy_helper.to_array(t) for t in _cnn("x").graph.initializer]
        safetensors.write(folder / "r18.safetensors", [(t.name, "F32", list(a.shape),
                                                        lambda a=a: a) for t, a in zip(_cnn("x").graph.initializer,
                                                                                      arrays)])
    if "pruned.onnx" in text and "-o pruned.onnx" not in text:
        assert CliRunner().invoke(cli, ["prune", str(folder / "original.onnx"), "-o", str(folder / "pruned.onnx"),
                                        "-q"]).exit_code == 0
    if "planted/" in text:   # docs/moe.md: the planted-routing MoE and its task data
        from planted_moe import write
        write(folder / "planted")
    if "llama_kv.onnx" in text or "llama.onnx" in text:
        from exported import transformers
        for name, export in (("llama_kv.onnx", "llama_gqa_kv"), ("llama.onnx", "llama_gqa")):
            (folder / name).write_bytes(Path(transformers(export)).read_bytes())
    if "llama_hf" in text:   # the Hugging Face folder of llama.onnx (save_pretrained of the exported model)
        import export_transformers as et
        et.build("llama_gqa").model.save_pretrained(folder / "llama_hf")


def _run(command: str, folder: Path) -> None:
    args = shlex.split(command)
    out = None
    if ">" in args:
        out, args = folder / args[args.index(">") + 1], args[:args.index(">")]
    assert args[0] == "spa", f"only spa commands are run here, add the others to NOT_RUN: {command}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        res = CliRunner().invoke(cli, args[1:])
    # spa check exits 1 when the models differ beyond its tolerance (a pruned model does): it ran
    assert res.exit_code in ((0, 1) if args[1] == "check" else (0,)), f"{command}\n{res.output}"
    if out is not None:
        out.write_text(res.stdout)


@pytest.mark.parametrize("doc", [p.relative_to(ROOT).as_posix() for p in DOCS if commands(p)])
def test_doc_commands_run_as_written(doc, tmp_path):
    path = ROOT / doc
    todo = [c for c in commands(path) if c not in NOT_RUN]
    if not todo:
        return
    _stand_ins(tmp_path, path.read_text())
    for command in todo:
        _run(command, tmp_path)


def test_every_command_not_run_is_still_in_the_docs():
    found = {c for p in DOCS for c in commands(p)}
    assert not set(NOT_RUN) - found, f"NOT_RUN entries the docs no longer show: {set(NOT_RUN) - found}"
