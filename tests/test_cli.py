"""The `lumos` command end to end (random weights; the bundled model has its own tests)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from lumos.cli import main
from lumos.pipeline import Pipeline, PipelineSettings


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_generate_gif_png_and_mp4(tmp_path):
    from lumos.video import read_video

    for name, frames in (("a.gif", "3"), ("b.mp4", "3"), ("c.png", None)):
        out = tmp_path / name
        args = ["generate", "a red sneaker moves left", "-o", str(out), "--model", "random"]
        args += ["--steps", "2", "-q"] + (["--frames", frames] if frames else [])
        assert main(args) == 0
        assert out.stat().st_size > 0
        video = read_video(out)
        assert video.shape[1:] == (64, 64, 3)
        assert video.shape[0] == (3 if frames else 1)


def test_image_to_video(tmp_path):
    from lumos.video import write_video

    img = tmp_path / "first.png"
    write_video(img, np.full((1, 64, 64, 3), 200, dtype=np.uint8))
    out = tmp_path / "i2v.gif"
    args = ["generate", "a bag falls", "--image", str(img), "-o", str(out), "--frames", "3"]
    assert main(args + ["--model", "random", "--steps", "2", "-q"]) == 0


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="must end in .mp4, .gif or .png"):
        main(["generate", "x", "-o", str(tmp_path / "x.avi"), "--model", "random"])
    with pytest.raises(SystemExit, match="--frames must be in"):
        main(["generate", "x", "-o", str(tmp_path / "x.gif"), "--model", "random", "--frames", "0"])
    out = tmp_path / "cold.gif"
    args = ["generate", "x", "-o", str(out), "--model", "random", "--frames", "2", "--steps", "2"]
    assert main([*args, "--temperature", "0.5", "--top-k", "4", "-q"]) == 0 and out.is_file()
    with pytest.raises(SystemExit, match="temperature must be > 0"):
        main(
            [
                "generate",
                "x",
                "-o",
                str(tmp_path / "x.gif"),
                "--model",
                "random",
                "--temperature",
                "0",
            ]
        )
    with pytest.raises(SystemExit, match="top_p must be in"):
        main(["generate", "x", "-o", str(tmp_path / "x.gif"), "--model", "random", "--top-p", "2"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["generate", "x", "-o", str(tmp_path / "x.gif"), "--model", str(tmp_path / "none")])
    bad = ["generate", "x", "-o", str(tmp_path / "x.gif"), "--model", "random"]
    with pytest.raises(SystemExit, match="history_mask_ratio must be in"):
        main([*bad, "--history-mask", "1.5"])
    with pytest.raises(SystemExit, match="tau0 must be >= 0"):
        main([*bad, "--tau0", "-1"])
    assert main([*args, "--tau0", "0", "--history-mask", "0.5", "-q"]) == 0


def test_console_script_help():
    proc = subprocess.run(
        [sys.executable, "-m", "lumos.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "generate" in proc.stdout and "serve" in proc.stdout


def test_pipeline_t2i_t2v_extend_shapes():
    pipe = Pipeline.from_folder("random")
    img = pipe.text_to_image("a red sneaker", steps=2)
    assert img.shape == (1, 64, 64, 3) and img.dtype == torch.uint8
    codes = pipe.generate_codes("a red sneaker moves left", 2, steps=2)
    more = pipe.extend(codes, "a red sneaker rises", frames=2, steps=2)
    assert more.shape == (4, 8, 8) and torch.equal(more[:2], codes)
    pipe.settings = replace(pipe.settings, max_frames=64)  # no cap by default; a folder may set one
    with pytest.raises(ValueError, match="frames must be in"):
        pipe.text_to_video("x", frames=1000)


def test_pipeline_settings_carry_the_sampling_defaults():
    settings = PipelineSettings.from_dict(
        {"steps": 12, "cfg_video": 7.5, "top_p": 0.8, "top_k": 50, "temperature": 0.7, "x": 1}
    )
    assert (settings.steps, settings.cfg_video, settings.top_p) == (12, 7.5, 0.8)
    pipe = Pipeline.from_folder("random")
    pipe.settings = settings
    video = pipe.sampler_config(None, None, image=False)
    assert (video.steps, video.cfg, video.top_p) == (12, 7.5, 0.8)
    assert (video.top_k, video.temperature) == (50, 0.7)
    assert pipe.sampler_config(3, 2.0, image=True).cfg == 2.0
    assert PipelineSettings().top_p is None  # the full distribution unless a folder says
    assert (video.tau0, video.history_mask_ratio) == (1.0, 0.7)  # method.md's defaults
    pipe.settings = PipelineSettings.from_dict({"tau0": 0.3, "history_mask": 0.5})
    video = pipe.sampler_config(None, None)
    assert (video.tau0, video.history_mask_ratio) == (0.3, 0.5)


def test_subcommand_arguments_keep_their_order(tmp_path, capsys):
    # flags before positional values must reach the subcommand unchanged
    args = ["train", "--preset", "tiny", "--data", str(tmp_path / "missing"), "--out", "x"]
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err


def test_set_sampling_overrides_and_rejects_without_change():
    pipe = Pipeline.from_folder("random")
    pipe.set_sampling(temperature=0.5, top_p=None, top_k=7)
    assert (pipe.settings.temperature, pipe.settings.top_p, pipe.settings.top_k) == (0.5, None, 7)
    with pytest.raises(ValueError, match="top_p must be in"):
        pipe.set_sampling(temperature=0.9, top_p=1.5)
    assert (pipe.settings.temperature, pipe.settings.top_k) == (0.5, 7)  # nothing changed
    with pytest.raises(TypeError, match="not sampling settings"):
        pipe.set_sampling(steps=3)
    pipe.set_sampling(tau0=0.0, history_mask=0.4)
    sc = pipe.sampler_config()
    assert (sc.tau0, sc.history_mask_ratio, sc.temperature) == (0.0, 0.4, 0.5)
    with pytest.raises(ValueError, match="history_mask_ratio must be in"):
        pipe.set_sampling(history_mask=1.0)
    with pytest.raises(ValueError, match="tau0 must be >= 0"):
        pipe.set_sampling(tau0=-0.5)
    assert (pipe.settings.tau0, pipe.settings.history_mask) == (0.0, 0.4)  # nothing changed
