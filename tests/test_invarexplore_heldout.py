"""InvarExplore's test curve and best-on-holdout selection (issue 31): they watch, never decide; selection returns the
best state seen on the holdout windows, deterministically and resumably."""

import pytest
import torch

import lowbit
from lowbit.arch import arch_for
from lowbit.config import build_config
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import perplexity
from lowbit.methods.invarexplore.search import InvarSearch
from lowbit.methods.invarexplore.stage import InvarExplore
from test_invarexplore import IDS, SCHEME, make, options

OTHER = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(7))
HOLDOUT = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(11))


def searched(family="llama", heldout=None, holdout=None, resume=None, start=0, **overrides):
    model = make(family)
    if holdout is not None:
        overrides["holdout"] = holdout.shape[0]
    search = InvarSearch(model, arch_for(model), SCHEME, IDS, options(**overrides), 0, "cpu", heldout, holdout)
    if resume is not None:
        states, start, accepts = search.load_record(resume)
        search.prepare(states)
        search.counters.accepts = accepts
    else:
        search.prepare()
    search.reason = search.run(start)
    return search


def same_states(a, b):
    return all(
        torch.equal(x.perm, y.perm) and torch.equal(x.scale, y.scale) and torch.equal(x.angle, y.angle)
        for x, y in zip(a.states, b.states, strict=True)
    )


def without_times(rows):
    return [{k: v for k, v in row.items() if k not in ("seconds", "steps_per_s")} for row in rows]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_test_curve_takes_the_same_decisions_and_records_train_next_to_test(family):
    plain = searched(family, max_steps=10)
    watched = searched(family, heldout={"a": OTHER, "b": IDS[:, :16]}, max_steps=10, heldout_every=4)
    assert watched.counters.accepts_per_layer == plain.counters.accepts_per_layer and watched.best == plain.best
    assert same_states(watched, plain) and without_times(watched.counters.log) == without_times(plain.counters.log)
    rows = watched.watch.curve.rows
    assert [row["step"] for row in rows] == [0, 4, 8, 10]
    assert rows[0]["objective"] == pytest.approx(1.1) and rows[-1]["objective"] == pytest.approx(watched.best)
    assert all(row["a_ppl"] > 1 and row["b_ppl"] > 1 for row in rows)
    assert "test_curve" in watched.watch.metrics() and "holdout" not in watched.watch.metrics()


def test_test_curve_perplexity_is_the_perplexity_of_the_student_in_the_model():
    search = searched(heldout={"a": OTHER}, max_steps=6, heldout_every=100)
    expected = perplexity(search.model, OTHER.reshape(1, -1), seqlen=24, progress=False, bos=False).ppl
    assert search.watch.curve.rows[-1]["a_ppl"] == pytest.approx(expected, rel=1e-5)


KNOBS = {"holdout_every": 2, "sigma_scale": 0.2, "sigma_rot": 0.05}  # big steps: the holdout objective turns up


def test_holdout_returns_the_best_state_on_the_holdout_windows():
    search = searched(holdout=HOLDOUT, max_steps=12, **KNOBS)
    selector = search.watch.selector
    values = [row["holdout_objective"] for row in selector.rows]
    assert [row["step"] for row in selector.rows] == list(range(0, 13, 2))
    assert selector.best_value == pytest.approx(min(values)) and selector.restored
    assert 0 < selector.best_step < 12 and values[-1] > min(values)  # the last state is worse held out: it matters
    assert selector.objective(selector.evaluator.full()) == pytest.approx(min(values), rel=1e-6)
    # the returned state is the straight search's state at the best step, and the search batch scores it so
    stopped = searched(max_steps=selector.best_step, sigma_scale=0.2, sigma_rot=0.05)
    assert same_states(search, stopped) and search.best == pytest.approx(stopped.best, rel=1e-6)
    assert search.fold() == 0
    again = searched(holdout=HOLDOUT, max_steps=12, **KNOBS)
    assert same_states(search, again) and again.watch.selector.rows == selector.rows


def test_holdout_patience_stops_and_the_test_curve_marks_the_selected_state():
    search = searched(
        holdout=HOLDOUT, heldout={"a": OTHER}, max_steps=100, holdout_patience=2, heldout_every=6, **KNOBS
    )
    assert search.reason == "holdout_patience" and search.counters.steps < 100
    selector = search.watch.selector
    assert selector.stale == 2 and search.counters.steps == selector.best_step + 4
    last = search.watch.curve.rows[-1]
    assert last["selected_step"] == selector.best_step and last["objective"] == pytest.approx(search.best)


def test_holdout_resumes_to_the_straight_run(tmp_path):
    straight = searched(holdout=HOLDOUT, max_steps=12, **KNOBS)
    path = tmp_path / "record.safetensors"
    searched(holdout=HOLDOUT, max_steps=7, checkpoint=str(path), **KNOBS)
    resumed = searched(holdout=HOLDOUT, max_steps=12, resume=path, **KNOBS)
    assert resumed.watch.selector.best_step == straight.watch.selector.best_step and same_states(resumed, straight)
    # the record of a restored search is the search at its best step: resuming from it replays the rest
    record = straight.record()
    assert int(record["invarexplore.steps"][0]) == straight.watch.selector.best_step
    export = tmp_path / "export.safetensors"
    straight.save_record(export)
    replayed = searched(holdout=HOLDOUT, max_steps=12, resume=export, **KNOBS)
    assert replayed.watch.selector.best_step == straight.watch.selector.best_step and same_states(replayed, straight)
    assert replayed.watch.selector.rows[0]["step"] > straight.watch.selector.best_step  # it replayed only the rest
    with pytest.raises(LowbitError, match="holdout=4"):
        searched(holdout=HOLDOUT[:2], max_steps=12, resume=export, **KNOBS)


def test_the_stage_records_both_curves(tiny_llama_dir, text_file):
    values = {
        "samples": 4, "monitored_layers": 2, "progress": False, "batch_size": 2, "max_steps": 6, "holdout": 2,
        "holdout_every": 2, "heldout_eval": "builtin", "heldout_every": 3, "heldout_windows": 2, "heldout_seqlen": 16,
    }  # fmt: skip
    result = lowbit.quantize(
        str(tiny_llama_dir), recipe="invarexplore+rtn", scheme="w2g32", dataset=str(text_file), nsamples=6,
        seqlen=32, seed=3, options={"invarexplore": values, "engine": {"progress": False}},
    )  # fmt: skip
    metrics = result.record["stages"]["invarexplore"]
    assert metrics["windows"] == [4, 32] and metrics["holdout"]["windows"] == 2
    assert [row["step"] for row in metrics["holdout"]["curve"]] == [0, 2, 4, 6]
    assert [row["step"] for row in metrics["test_curve"]][:3] == [0, 3, 6]
    assert metrics["test_curve"][0]["builtin_ppl"] > 1 and metrics["fold_check"] == "bit-identical"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"heldout_eval": ",,"}, "distinct dataset names"),
        ({"heldout_eval": "builtin,builtin"}, "distinct dataset names"),
        ({"heldout_eval": "no-such-text"}, "neither a known dataset"),
        ({"holdout_patience": 3}, "set invarexplore.holdout=K"),
        ({"holdout": -1}, "holdout must be 0"),
        ({"heldout_windows": 0}, "heldout_windows must be at least 1"),
        ({"heldout_seqlen": 1}, "heldout_seqlen must be at least 2"),
    ],
)
def test_bad_heldout_options_are_refused(values, message):
    with pytest.raises(LowbitError, match=message):
        build_config(recipe="awq+invarexplore+rtn", options={"invarexplore": values})


def test_holdout_needs_windows_beyond_the_search_batch():
    with pytest.raises(LowbitError, match="raise --nsamples to 40 or lower invarexplore.samples or invarexplore.hold"):
        InvarExplore.check_run(options(samples=32, holdout=8), nsamples=32, seqlen=512, depth=4)
