"""Text a causal language model writes itself (spa.runtime.textgen): what counts as a causal LM,
the generation loop, and its use as spa's synthetic inputs and --calib synthetic."""
import numpy as np
import pytest

import spa
from exported import transformers as export
from graphs import residual_chain
from spa.runtime import synthetic, textgen

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2_dynamo", "llama_gqa_kv"])
def test_decoders_are_causal_lms_and_write_sequences_of_their_vocabulary(name):
    an = spa.analyze(export(name))
    lm = textgen.causal_lm(an)
    assert lm is not None and lm.ids == "input_ids" and lm.vocab == 256 and lm.logits == "logits"
    ids = textgen.generate(an, 3, 10, seed=1)
    assert ids.shape == (3, 10) and ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < 256
    assert textgen.generate(an, 3, 10, seed=1) is ids                 # written once per analysis
    assert not np.array_equal(textgen.generate(an, 3, 10, seed=2), ids)
    assert np.array_equal(textgen.generate(an, 2, 10, seed=1), ids[:2])
    desc, feeds = synthetic.feeds(an, 2, seed=0)
    assert "wrote itself" in desc and len(feeds) == 2
    runner = spa.runtime.probing.output_runner(an.model, an.probe.consts)
    out = runner.run(feeds[0])["logits"]
    assert out.shape == feeds[0]["input_ids"].shape + (256,) and np.isfinite(out).all()


def test_other_models_are_not_causal_lms():
    assert textgen.causal_lm(spa.analyze(residual_chain())) is None
    assert textgen.causal_lm(spa.analyze(export("bert"))) is None      # hidden states out, not logits
    with pytest.raises(spa.SpaError, match="not a causal language model"):
        textgen.generate(spa.analyze(residual_chain()), 2, 4)


def test_wanda_calibrated_on_text_the_model_wrote_compensated_by_obs():
    """--calib synthetic: the statistics come from generated text (the report says so), obs compensates
    wanda's choice, and the pruned decoder runs at other sizes."""
    path = export("llama_gqa")
    r = spa.prune(path, target="params=1.2", criterion="wanda", calib="synthetic", calib_batches=2,
                  allocate="uniform", compensate="obs")
    assert "wrote itself" in r.report["calibration"]["source"]
    assert r.report["compensation"]["selection"] == "criterion"
    assert "wrote itself" in r.report["fidelity"]["inputs"]
    runner = spa.runtime.probing.output_runner(r.proto, spa.io.initializer_arrays(r.proto, r.weights))
    for b, t in ((1, 5), (3, 17)):
        ids = np.random.default_rng(b).integers(0, 256, (b, t))
        assert runner.run({"input_ids": ids})["logits"].shape == (b, t, 256)


def test_the_guard_of_a_language_model_reports_next_token_agreement_and_perplexity():
    """A prune of a causal LM is judged by what its reader would see: next-token agreement with the
    original (the fidelity), perplexity over the original's on the guard's tokens (1 unchanged)."""
    path = export("llama_gqa")
    same = spa.prune(path, 0.0).report["fidelity"]
    assert same["metric"]["logits"] == "tokens" and same["min"] == 1.0
    assert same["details"]["logits"]["perplexity_ratio"] == pytest.approx(1.0, abs=1e-4)
    cut = spa.prune(path, 0.6, criterion="random").report["fidelity"]
    assert cut["min"] == cut["agreement"]["logits"] < 1.0 and cut["details"]["logits"]["tokens"] > 0
    assert cut["details"]["logits"]["perplexity_ratio"] != 1.0
    assert "details" not in spa.prune(residual_chain(), 0.3).report["fidelity"]


def test_a_kv_cache_export_writes_with_its_cache_and_the_text_is_the_same(monkeypatch):
    """With past/present tensors each step feeds one token and the cache; the sequences equal those
    written by rerunning the whole prefix (same seed, the same logits up to rounding)."""
    an = spa.analyze(export("llama_gqa_kv"))
    lm = textgen.causal_lm(an)
    assert textgen.cache_pairs(an, lm) == {f"past_key_values.{i}.{kv}": f"present.{i}.{kv}"
                                           for i in range(2) for kv in ("key", "value")}
    cached = textgen.generate(an, 3, 12, seed=5)
    monkeypatch.setattr(textgen, "cache_pairs", lambda an, lm: {})
    assert np.array_equal(textgen.generate(spa.analyze(export("llama_gqa_kv")), 3, 12, seed=5), cached)


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2_dynamo"])
def test_a_step_computes_the_last_positions_logits_only_and_they_are_the_models(name, monkeypatch):
    """The logits of a dynamo export are one MatMul of the last hidden state with a weight (or a tied
    embedding's Transpose): a step exposes the hidden state and computes the last position's logits
    itself, equal to the model's, and its session has neither the graph's logits nor the head that
    makes them; a sampled nucleus among the likeliest candidates equals the full sort's."""
    an = spa.analyze(export(name))
    sessions = []
    exposing = textgen.exposing_session
    monkeypatch.setattr(textgen, "exposing_session", lambda *a, **k: sessions.append(exposing(*a, **k)) or sessions[-1])
    textgen.generate(an, 2, 4, seed=5)
    (runner, fetch), = sessions
    assert "logits" not in runner.outputs and "logits" not in fetch
    lm = textgen.causal_lm(an)
    found = textgen.last_position_head(an, lm)
    assert found is not None, "the logits' MatMul was not recognised"
    hidden, head = found
    feed = textgen.text_feeds(an, 1)[0]
    got = spa.runtime.probing.output_runner(an.model, an.probe.consts, outputs=[hidden, lm.logits]).run(feed)
    np.testing.assert_allclose(head(got[hidden][:, -1]), got[lm.logits][:, -1], rtol=1e-4, atol=1e-4)
    logits = np.random.default_rng(1).standard_normal((5, 4 * textgen.CANDIDATES)) * 8
    u = np.random.default_rng(2).random(5)
    a = textgen._sample(logits, u)
    old = textgen.CANDIDATES
    try:
        textgen.CANDIDATES = 10 ** 9             # the full sort
        b = textgen._sample(logits, u)
    finally:
        textgen.CANDIDATES = old
    assert np.array_equal(a, b)


def test_criterion_auto_picks_what_works_on_a_causal_lm(tmp_path):
    """--criterion auto (the default): l2 for other models; for a causal LM wanda with an OBS compensation
    of ridge LM_DAMP when --calib data is given, obspa (diagonal selection) without data, wanda on text
    the model writes under --compensate none or with a --map; an explicit --damp stays the user's.  The
    report says why."""
    from spa.scoring import LM_DAMP
    assert spa.prune(residual_chain(), 0.3).report["criterion"] == "l2"
    path = export("llama_gqa")
    an = spa.analyze(path)
    ids = textgen.generate(an, 8, 12, seed=3)
    np.savez(tmp_path / "text.npz", input_ids=ids)
    calib = spa.prune(path, target="params=1.1", calib=str(tmp_path / "text.npz"), analysis=an).report
    assert calib["criterion"] == "wanda" and calib["compensation"]["damp"] == LM_DAMP
    assert calib["criterion_chosen"].startswith("auto: a causal language model with calibration data")
    damped = spa.prune(path, target="params=1.1", calib=str(tmp_path / "text.npz"), damp=0.5, analysis=an).report
    assert damped["compensation"]["damp"] == 0.5
    nodata = spa.prune(path, target="params=1.1", analysis=an).report
    assert nodata["criterion"] == "obspa" and nodata["obspa"]["selection"].startswith("diagonal")
    plain = spa.prune(path, target="params=1.1", compensate="none", analysis=an).report
    assert plain["criterion"] == "wanda" and "compensation" not in plain
    mapped = spa.prune(path, target="params=1.1", calib=str(tmp_path / "text.npz"), map_path=tmp_path / "m.json",
                       analysis=an).report                 # a map's rebuild cannot carry a compensation
    assert mapped["criterion"] == "wanda" and "compensation" not in mapped
    assert spa.prune(path, target="params=1.1", criterion="l2", analysis=an).report["criterion"] == "l2"


def test_a_sequence_is_the_same_however_many_are_asked_for_and_is_written_once(monkeypatch):
    """Row i of a seed's text depends on i and the seed only: the rows a shorter request wrote are the
    first rows of a longer one, which writes only the rows missing (one run of the model per step)."""
    path = export("llama_gqa")
    alone = textgen.generate(spa.analyze(path), 6, 9, seed=4)
    an = spa.analyze(path)
    first = textgen.generate(an, 2, 9, seed=4)
    written = []
    real = textgen._generate
    monkeypatch.setattr(textgen, "_generate", lambda an, start, stop, *a: written.append((start, stop))
                        or real(an, start, stop, *a))
    both = textgen.generate(an, 6, 9, seed=4)
    assert written == [(2, 6)] and np.array_equal(both[:2], first)
    assert np.array_equal(both, alone)                  # 2 then 4 rows: the 6 written at once
    assert textgen.generate(an, 3, 9, seed=4).shape == (3, 9) and written == [(2, 6)]


def test_the_guard_of_a_language_model_without_data_measures_the_first_batches_of_the_statistics_text(monkeypatch):
    """obspa without data writes its Hessians' text once, the guard's batches with it: the guard
    measures on the first two of the eight batches, and nothing is written twice."""
    path = export("llama_gqa")
    written = []
    real = textgen._generate
    monkeypatch.setattr(textgen, "_generate", lambda an, start, stop, *a: written.append((start, stop))
                        or real(an, start, stop, *a))
    r = spa.prune(path, target="params=1.1", criterion="obspa", calib_batches=3)
    assert written == [(0, 3 * textgen.PER_BATCH)]
    assert "the first 2 of them" in r.report["fidelity"]["inputs"] and "wrote itself" in r.report["fidelity"]["inputs"]
    written.clear()
    spa.prune(path, target="params=1.1", criterion="l2")
    assert written == [(0, 2 * textgen.PER_BATCH)]      # the guard's own two batches, nothing ahead
