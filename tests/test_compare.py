"""lumos eval --against: two runs on the same prompts and seeds, compared item by item."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from lumos.evaluate import compare_results, evaluate_real, main, paired_difference

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def real():
    """Real held-out clips scored as a run: 12 prompts x 2 seeds."""
    return evaluate_real("heldout", 12, [0, 1], 8, None, None)


def _item_mean(split, key):
    vals = [it[key] for c in split["clips"] for it in c["items"] if it[key] is not None]
    return float(np.mean(vals))


def test_a_run_against_itself_differs_by_nothing(real):
    cmp = paired_difference(real, real)
    assert set(cmp) == {"class", "colour", "direction", "identity", "all"}
    for name, m in cmp.items():
        assert m["diff"] == 0.0 and (m["low"], m["high"]) == (0.0, 0.0), name
        assert m["verdict"] == "no worse"
    assert cmp["class"]["new"] == pytest.approx(real["class_accuracy"])
    assert cmp["direction"]["new"] == pytest.approx(real["direction_accuracy"])


def test_a_worse_run_is_called_worse_and_the_difference_is_the_metric_difference(real):
    worse = copy.deepcopy(real)
    for clip in worse["clips"][::2]:  # half the clips lose every class
        for it in clip["items"]:
            it["class_correct"] = 0.0
        clip["all_correct"] = 0.0
    cmp = paired_difference(worse, real)
    want = _item_mean(worse, "class_correct") - _item_mean(real, "class_correct")
    assert want < -0.2
    assert cmp["class"]["diff"] == pytest.approx(want)
    assert cmp["class"]["low"] <= want <= cmp["class"]["high"] < -0.03
    assert cmp["class"]["verdict"] == "worse"
    assert cmp["colour"]["verdict"] == "no worse"  # untouched
    # the other way round the change is an improvement
    assert paired_difference(real, worse)["class"]["verdict"] == "no worse"


def test_one_item_lost_of_few_clips_is_undecided(real):
    few = {"clips": real["clips"][:6]}
    worse = copy.deepcopy(few)
    right = [it for c in worse["clips"] for it in c["items"] if it["class_correct"] == 1.0]
    assert right, "real clips get some classes right"
    right[0]["class_correct"] = 0.0
    m = paired_difference(worse, few, tolerance=0.03)["class"]
    # one item of ~8 moves the mean by ~0.1, but resamples without its clip see no change
    assert m["diff"] < -0.03 and m["low"] < -0.03 and m["high"] == 0.0
    assert m["verdict"] == "undecided"


def test_runs_on_different_seeds_or_prompts_are_refused(real):
    other = evaluate_real("heldout", 12, [0, 2], 8, None, None)
    with pytest.raises(ValueError, match="different clips"):
        paired_difference(other, real)
    with pytest.raises(ValueError, match="no per-clip results"):
        paired_difference({"clips": []}, real)
    with pytest.raises(ValueError, match="tolerance"):
        paired_difference(real, real, tolerance=-0.1)
    with pytest.raises(ValueError, match="share no split"):
        compare_results({"splits": {"seen": real}}, {"splits": {"heldout": real}})


def test_cli_compares_stored_runs_and_names_bad_files(tmp_path, real, capsys):
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    base.write_text(json.dumps({"splits": {"heldout": real}}))
    worse = copy.deepcopy(real)
    for clip in worse["clips"]:
        for it in clip["items"]:
            it["colour_present"] = 0.0
    new.write_text(json.dumps({"splits": {"heldout": worse}}))
    assert main(["--results", str(new), "--against", str(base)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if " colour " in line)
    assert "-1.000" in row and row.rstrip().endswith("worse")
    assert next(line for line in out.splitlines() if " class " in line).rstrip().endswith("worse")

    with pytest.raises(SystemExit):
        main(["--results", str(new)])
    assert "needs --against" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--results", str(new), "--against", str(tmp_path / "missing.json")])
    assert "missing.json: no such file" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(SystemExit):
        main(["--results", str(tmp_path / "junk.json"), "--against", str(base)])
    assert "not a lumos eval --json file" in capsys.readouterr().err


def test_an_eval_run_against_its_own_earlier_run(tmp_path, capsys):
    path = tmp_path / "eval.json"
    argv = ["--model", "random", "--split", "heldout", "--prompts", "2", "--steps", "2"]
    argv += ["--frames", "4", "-q"]
    assert main([*argv, "--json", str(path)]) == 0
    capsys.readouterr()
    assert main([*argv, "--against", str(path)]) == 0
    out = capsys.readouterr().out
    assert "new - base" in out and "+0.000" in out and "undecided" not in out
