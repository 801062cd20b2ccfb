"""lumos.evaluate: bundled classifier, colour tracker, clip scores, Frechet distance, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lumos.data import COLOURS, ItemSpec, MovingFashionConfig, load_fashion_mnist, make_clip
from lumos.evaluate import (
    CLASSIFIER_DIR,
    assign_colours,
    classifier_accuracy,
    clip_features,
    confusion,
    evaluate_tokenizer,
    frechet_distance,
    load_classifier,
    main,
    motion,
    per_frame,
    score_clip,
    select_prompts,
    track_items,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def clf():
    return load_classifier()


@pytest.fixture(scope="module")
def real_clips():
    """40 real test-split clips (1-2 items, 16 frames) with their items."""
    cfg = MovingFashionConfig(frames=16)
    return [make_clip(np.random.default_rng([123, i]), cfg, "test") for i in range(40)]


def test_bundled_classifier_accuracy(clf):
    files = sorted(p.name for p in CLASSIFIER_DIR.iterdir())
    assert "classifier.safetensors" in files and "classifier.json" in files
    assert (CLASSIFIER_DIR / "classifier.safetensors").stat().st_size < 1_000_000
    assert clf.meta["test_accuracy"] >= 0.9
    images, labels = load_fashion_mnist("test")
    acc = classifier_accuracy(clf, images[:2000], labels[:2000])
    assert acc >= 0.9
    feats = clf.features(torch.zeros(3, 1, 28, 28))
    assert feats.shape == (3, clf.meta["config"]["feature_dim"])


def test_assign_colours_pure_hues():
    video = np.zeros((1, 4, len(COLOURS), 3), np.uint8)
    for k, rgb in enumerate(COLOURS.values()):
        video[0, 0, k] = rgb  # full brightness
        video[0, 1, k] = (np.array(rgb) * 0.3).astype(np.uint8)  # dim but above threshold
        video[0, 2, k] = (np.array(rgb) * 0.1).astype(np.uint8)  # below threshold
    labels, bright = assign_colours(video, threshold=48)
    assert labels[0, 0].tolist() == list(range(len(COLOURS)))
    assert labels[0, 1].tolist() == list(range(len(COLOURS)))
    assert (labels[0, 2] == -1).all() and (labels[0, 3] == -1).all()
    assert bright[0, 0].max() == 255


def test_tracker_on_real_clips(clf, real_clips):
    colour, direction, cls, n, consistency = [], [], [], 0, []
    for clip in real_clips:
        sc = score_clip(clip.video, [it.spec for it in clip.items], clf)
        for it in sc["items"]:
            colour.append(it["colour_present"])
            direction.append(it["direction_correct"])
            cls.append(it["class_correct"])
            consistency.append(it["identity_consistency"])
            n += 1
    assert n >= 50  # 1-2 items per clip
    assert np.mean(colour) == 1.0
    assert np.mean(direction) >= 0.95
    assert np.mean(cls) >= 0.8
    assert np.mean(consistency) >= 0.8


def test_track_positions_match_ground_truth(clf, real_clips):
    # single-item clips: the tracked box lies inside the true 28x28 box in every frame
    for clip in [c for c in real_clips if len(c.items) == 1][:5]:
        it = clip.items[0]
        tr = track_items(clip.video, [it.colour], clf)[it.colour]
        assert tr.present.all()
        y0, x0 = it.positions[:, 0], it.positions[:, 1]
        assert (tr.boxes[:, 0] >= y0).all() and (tr.boxes[:, 2] < y0 + 28).all()
        assert (tr.boxes[:, 1] >= x0).all() and (tr.boxes[:, 3] < x0 + 28).all()


def test_blank_and_noise_videos_score_zero(clf):
    specs = [ItemSpec("sneaker", "red", "left"), ItemSpec("bag", "white", "down")]
    blank = np.zeros((8, 64, 64, 3), np.uint8)
    sc = score_clip(blank, specs, clf)
    for key in ("class_accuracy", "colour_accuracy", "direction_accuracy", "identity_consistency"):
        assert sc[key] == 0.0
    assert sc["all_correct"] == 0.0
    # full-frame gray noise is not an item-sized white blob
    noise = np.random.default_rng(0).integers(60, 200, (8, 64, 64, 3)).astype(np.uint8)
    assert score_clip(noise, specs, clf)["colour_accuracy"] == 0.0


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 3.0) == pytest.approx(16 * 9.0, rel=1e-6)
    b = rng.normal(size=(200, 16))
    assert frechet_distance(a, b) < 1.0
    assert frechet_distance(a[:5], b[:7]) >= 0.0  # singular covariances are fine


def test_frechet_real_vs_noise(clf, real_clips):
    specs = [[it.spec for it in c.items] for c in real_clips]
    half = len(real_clips) // 2
    fa = [clip_features(c.video, s, clf) for c, s in zip(real_clips[:half], specs[:half])]
    fb = [clip_features(c.video, s, clf) for c, s in zip(real_clips[half:], specs[half:])]
    noise = np.random.default_rng(1).integers(0, 256, (half, 16, 64, 64, 3)).astype(np.uint8)
    fn = [clip_features(v, s, clf) for v, s in zip(noise, specs[half:])]
    for key in ("items", "frames"):
        a = np.concatenate([f[key] for f in fa])
        b = np.concatenate([f[key] for f in fb])
        n = np.concatenate([f[key] for f in fn])
        same = frechet_distance(a, a)
        real = frechet_distance(a, b)
        fake = frechet_distance(a, n)
        assert same == pytest.approx(0.0, abs=1e-4)
        assert fake > 3 * real > 0


def test_select_prompts():
    all_ = select_prompts("heldout")
    assert len(all_) == 48
    two = select_prompts("seen", 2)
    assert len(two) == 2 and len(two[0][1]) == 1 and len(two[1][1]) == 2


def test_main_random_end_to_end(tmp_path, capsys):
    path = tmp_path / "eval.json"
    argv = ["--model", "random", "--prompts", "2", "--steps", "2", "--frames", "4"]
    rc = main(
        [
            *argv,
            "--json",
            str(path),
            "--temperature",
            "0.8",
            "--tau0",
            "0.5",
            "--history-mask",
            "0.6",
            "-q",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "heldout" in out and "class" in out
    res = json.loads(path.read_text())
    assert res["classifier"]["test_accuracy"] >= 0.9
    assert res["settings"]["temperature"] == 0.8
    assert (res["settings"]["tau0"], res["settings"]["history_mask"]) == (0.5, 0.6)
    assert set(res["splits"]) == {"seen", "heldout"}
    for r in res["splits"].values():
        for key in (
            "class_accuracy",
            "colour_accuracy",
            "direction_accuracy",
            "identity_consistency",
            "frechet_distance",
            "frechet_distance_frames",
            "n_clips",
        ):
            assert key in r
        assert r["n_clips"] == 2
        assert r["colour_accuracy"] <= 0.25  # random weights: (near) nothing is found
        assert r["class_accuracy"] <= 0.25
        assert r["frechet_distance"] > 0


def test_main_rejects_bad_sampling_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "random", "--prompts", "1", "--temperature", "-1", "-q"])
    assert "temperature must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "random", "--prompts", "1", "--history-mask", "0.99999", "--tau0", "-2"])
    assert "tau0 must be >= 0" in capsys.readouterr().err


def test_main_real_only(tmp_path):
    path = tmp_path / "real.json"
    argv = ["--real-only", "--split", "heldout", "--prompts", "3", "--frames", "8"]
    assert main([*argv, "--json", str(path), "-q"]) == 0
    r = json.loads(path.read_text())["real"]["heldout"]
    assert r["colour_accuracy"] == 1.0 and r["direction_accuracy"] >= 0.75


def test_main_real_only_late_window(tmp_path, capsys):
    path = tmp_path / "late.json"
    argv = ["--real-only", "--split", "heldout", "--prompts", "2", "--frames", "40"]
    assert main([*argv, "--window-from", "24", "--json", str(path), "-q"]) == 0
    r = json.loads(path.read_text())["real"]["heldout"]
    assert r["frames"] == 40 and len(r["per_frame"]["present"]) == 16  # frames [24, 40)
    assert r["colour_accuracy"] == 1.0
    with pytest.raises(SystemExit):
        main([*argv, "--window-from", "40", "-q"])
    assert "--window-from must be in [0, 40)" in capsys.readouterr().err


def test_train_classifier_never_overwrites_the_bundled_one(capsys):
    files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in CLASSIFIER_DIR.iterdir()}
    with pytest.raises(SystemExit):
        main(["--train-classifier", "--epochs", "1", "-q"])
    assert "--train-classifier needs --classifier DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--train-classifier", "--classifier", str(CLASSIFIER_DIR), "-q"])
    assert "refusing to overwrite the bundled classifier" in capsys.readouterr().err
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in CLASSIFIER_DIR.iterdir()}
    assert after == files


def test_confusion_and_per_frame(clf, real_clips):
    clips = real_clips[:6]
    items = [
        it for c in clips for it in score_clip(c.video, [i.spec for i in c.items], clf)["items"]
    ]
    for it in items:
        assert len(it["frame_classes"]) == 16
    conf = confusion(items)
    assert sum(sum(row.values()) for row in conf.values()) == len(items)
    assert sum(row.get(cls, 0) for cls, row in conf.items()) == sum(
        it["class_correct"] for it in items
    )
    pf = per_frame(items)
    assert {k: len(v) for k, v in pf.items()} == {"present": 16, "class": 16, "identity": 16}
    assert all(a >= b for a, b in zip(pf["present"], pf["class"]))
    assert np.mean(pf["present"]) == pytest.approx(
        np.mean([it["present_fraction"] for it in items])
    )
    assert np.mean(pf["present"]) >= 0.95  # real clips: (almost) every item in every frame
    # a blank clip: nothing found in any frame, every item's row is "none"
    blank = score_clip(np.zeros((4, 64, 64, 3), np.uint8), [ItemSpec("bag", "red", "up")], clf)
    assert confusion(blank["items"]) == {"bag": {"none": 1}}
    assert per_frame(blank["items"])["present"] == [0.0] * 4


def test_main_prints_confusion_and_per_frame(tmp_path, capsys):
    path = tmp_path / "real.json"
    argv = ["--real-only", "--split", "heldout", "--prompts", "2", "--frames", "4"]
    assert main([*argv, "--confusion", "--per-frame", "--json", str(path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "asked \\ got" in out and "present  class  identity" in out
    r = json.loads(path.read_text())["real"]["heldout"]
    assert len(r["per_frame"]["class"]) == 4 and sum(map(sum, (
        row.values() for row in r["confusion"].values()))) == r["n_items"]  # fmt: skip


def test_package_reexports_every_public_name():
    import lumos.evaluate as pkg

    for name in pkg.__all__:
        assert getattr(pkg, name) is not None, name
    assert pkg.CLASSIFIER_DIR.is_dir() and (pkg.CLASSIFIER_DIR / pkg.WEIGHTS_FILE).is_file()


def test_motion_breakdown(clf, real_clips):
    items = [
        it
        for c in real_clips[:8]
        for it in score_clip(c.video, [i.spec for i in c.items], clf)["items"]
    ]
    m = motion(items)
    assert sum(m["kinds"].values()) == len(items) and m["kinds"]["right"] >= len(items) - 1
    assert m["speed_px"]["slowly"] < 1.6 < 2.4 < m["speed_px"]["quickly"]  # 1 and 3 px/frame
    assert m["jump_rate"] < 0.05
    base = {"colour_present": 1.0, "speed": "slowly", "jump_rate": 0.5}
    made = [
        {**base, "direction": "left", "pred_direction": "right", "velocity": [0, 1]},
        {**base, "direction": "left", "pred_direction": "up", "velocity": [-1, 0]},
        {**base, "direction": "up", "pred_direction": None, "velocity": [0, 0]},
        {**base, "direction": "up", "pred_direction": "up", "velocity": [-2, 0]},
        {**base, "colour_present": 0.0, "direction": "up", "pred_direction": None},
    ]
    got = motion(made)
    assert got["kinds"] == {"right": 1, "static": 1, "opposite": 1, "other_axis": 1}
    assert got["speed_px"] == {"slowly": 2.0} and got["jump_rate"] == 0.5


def test_jumping_item_is_counted(clf):
    # one item whose second half is drawn 18 px to the side: one jump in 15 frame pairs
    clip = make_clip(np.random.default_rng(3), MovingFashionConfig(frames=16), "test",
                     spec=[ItemSpec("bag", "red", "down", "slowly")])  # fmt: skip
    video = clip.video.copy()
    x0 = int(clip.items[0].positions[:, 1].min())
    shift = 18 if x0 <= 18 else -18  # stays inside the 64 px frame
    video[8:] = np.roll(video[8:], shift, axis=2)
    jr = score_clip(video, [ItemSpec("bag", "red", "down")], clf)["items"][0]["jump_rate"]
    assert jr == pytest.approx(1 / 15)
    assert (
        score_clip(clip.video, [ItemSpec("bag", "red", "down")], clf)["items"][0]["jump_rate"] == 0
    )


def test_tokenizer_ceiling_of_the_bundled_tokenizer(clf):
    from lumos.pipeline import Pipeline

    r = evaluate_tokenizer(Pipeline.from_folder(), "heldout", 3, [0], 16, clf)
    assert r["n_clips"] == 3 and r["colour_accuracy"] == 1.0 and r["direction_accuracy"] >= 0.75


def test_main_tokenizer_ceiling_and_motion(tmp_path, capsys):
    path = tmp_path / "tok.json"
    argv = ["--model", "random", "--split", "heldout", "--prompts", "1", "--steps", "1"]
    argv += ["--frames", "4", "--tokenizer-ceiling", "--motion", "--json", str(path), "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tokenized real heldout" in out and "heldout motion:" in out
    r = json.loads(path.read_text())
    assert r["tokenizer"]["heldout"]["n_clips"] == 1
    assert set(r["splits"]["heldout"]["motion"]) == {"kinds", "speed_px", "jump_rate"}
