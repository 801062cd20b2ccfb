"""lumos prepare-data and its export rebuild what ships in src/lumos/assets/fmnist (but weights).

One tiny data folder (2-step tokenizer, 2 clips + 2 images) and a 1-step run of the bundled
model's preset are built once per module; the real recipe takes 10-25 min and is not run here.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from lumos.prepare import TOKENIZER_LR, export_bundle, main, prepare
from lumos.settings import PipelineSettings
from lumos.train import train, train_preset

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "lumos" / "assets" / "fmnist"


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prepare")
    data, run = root / "data", root / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        prepare(data, videos=2, images=2, tokenizer_steps=2, tokenizer_clips=2, eval_clips=2,
                log_every=1)  # fmt: skip
    cfg = train_preset("fmnist", steps=1, batch_size=1, image_batch_size=1, log_every=1,
                       ckpt_every=0, warmup_steps=1)  # fmt: skip
    train(cfg, str(data / "shards/video"), str(data / "shards/image"), str(run), device="cpu",
          progress=False)  # fmt: skip
    return {"data": data, "run": run, "root": root, "stdout": out.getvalue()}


def test_prepare_uses_the_shipped_tokenizer_recipe(built):
    data = built["data"]
    assert _json(data / "tokenizer/config.json") == _json(SHIPPED / "tokenizer/config.json")
    ev = _json(data / "tokenizer/eval.json")
    assert ev["lr"] == TOKENIZER_LR == 2e-3
    assert ev["lr_peak_seen"] == pytest.approx(2e-3)  # what the optimiser actually ran at
    name = _json(SHIPPED / "tokenizer/config.json")["config"]["name"]
    for kind in ("video", "image"):
        assert _json(data / "shards" / kind / "manifest.json")["tokenizer"] == name
    # progress lines (review item 12: it used to print nothing for 10-25 minutes)
    text = built["stdout"]
    assert "tokenizer: step 1/2 " in text and "ETA" in text
    assert "shards/video: 2/2" in text and "shards/image: 2/2" in text
    assert "text tokenizer:" in text


def test_export_writes_the_shipped_bundle_layout_and_defaults(built):
    dest = export_bundle(built["run"], built["data"], built["root"] / "bundle")
    assert _json(dest / "pipeline.json") == _json(SHIPPED / "pipeline.json")
    assert _json(dest / "tokenizer/config.json") == _json(SHIPPED / "tokenizer/config.json")
    files = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert files == {str(p.relative_to(SHIPPED)) for p in SHIPPED.rglob("*") if p.is_file()}
    model_cfg = _json(dest / "model/config.json")
    assert model_cfg["layout"]["tokenizer"] == "fmnist64-lite"
    shipped = PipelineSettings.from_dict(_json(SHIPPED / "pipeline.json"))
    assert PipelineSettings.from_dict(_json(dest / "pipeline.json")) == shipped


def test_export_cli_overrides_and_refuses_to_clobber(built, capsys):
    data, run, root = str(built["data"]), str(built["run"]), built["root"]
    dest = root / "cli-bundle"
    assert main(["--out", data, "--export", run, str(dest), "--cfg", "6", "--tau0", "0.5"]) == 0
    got, want = _json(dest / "pipeline.json"), _json(SHIPPED / "pipeline.json")
    assert (got["cfg_video"], got["cfg_image"], got["tau0"]) == (6.0, 6.0, 0.5)
    assert {k: v for k, v in got.items() if k not in ("cfg_video", "cfg_image", "tau0")} == {
        k: v for k, v in want.items() if k not in ("cfg_video", "cfg_image", "tau0")
    }
    # re-exporting over a pipeline folder replaces it
    assert main(["--out", data, "--export", run, str(dest)]) == 0
    assert _json(dest / "pipeline.json") == want
    # a folder that is not a pipeline folder is left alone
    other = root / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["--out", data, "--export", run, str(other)]) == 2
    assert "not a pipeline folder" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
    # a bad override is a clear error and writes nothing
    assert main(["--out", data, "--export", run, str(root / "bad"), "--tau0", "-1"]) == 2
    assert "tau0 must be >= 0" in capsys.readouterr().err and not (root / "bad").exists()


def test_train_tokenizer_rejects_an_unknown_preset(tmp_path, capsys):
    from lumos.prepare import tokenizer_main

    with pytest.raises(SystemExit):
        tokenizer_main(["--out", str(tmp_path / "tok"), "--preset", "nope", "--clips", "1"])
    assert "unknown tokenizer preset 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


def test_late_windows_reach_training_as_unsupervised_history(built, tmp_path, capsys):
    import shutil

    from lumos.config import model_preset
    from lumos.data import ShardDataset
    from lumos.train.batches import VIDEO, Stream

    data = tmp_path / "late"
    data.mkdir()
    shutil.copytree(built["data"] / "tokenizer", data / "tokenizer")
    shutil.copy(built["data"] / "text_tokenizer.json", data / "text_tokenizer.json")
    with contextlib.redirect_stdout(io.StringIO()):
        prepare(data, videos=3, images=1, late=1.0)
    assert _json(data / "data.json")["late"] == 1.0
    ds = ShardDataset(data / "shards/video")
    assert [ds.context(i) for i in range(3)] == [8, 8, 8]  # the shipped tokenizer: 1 latent/frame
    cfg = train_preset("fmnist", steps=1, batch_size=1)
    stream = Stream(VIDEO, ds, model_preset("fmnist"), cfg, 1, 2, 8)
    s = stream.sample(0)
    cut = s.seq.spans[8].start
    assert not s.loss_mask[:cut].any() and s.loss_mask[cut:].any()
    assert main(["--out", str(tmp_path / "bad"), "--late", "2"]) == 2
    assert "late must be a fraction in [0, 1], got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
