"""UPMC Food-101: raw release → ``data prepare --option tokenizer=DIR`` → ``data check`` → one training epoch
with a tiny BERT; title cleaning and token ids by hand; the release read directly; tokenizer errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import balancemm.data.food101  # noqa: F401  (registers food101)
from balancemm.cli import main
from balancemm.data import create_dataset
from balancemm.data.food101 import clean_title, image_to_tensor, rotate
from balancemm.errors import DataError
from tests.fixtures import ucf_food_raw as fx

BERT = [
    "model.encoders.text.name=bert",
    "model.encoders.text.hidden=16",
    "model.encoders.text.layers=1",
    "model.encoders.text.heads=2",
    "model.encoders.text.intermediate=32",
    f"model.encoders.text.vocab_size={len(fx.VOCAB)}",
    "model.encoders.text.max_positions=40",
    "model.encoders.text.proj=8",
]
SMALL = [
    "data.image_size=32",
    "model.encoders.visual.width=4",
    "train.epochs=1",
    "train.num_workers=0",
    "train.batch_size=3",  # 9 training images: no batch of one, which BatchNorm refuses in training
    "data.val_fraction=0.25",  # one of the four training images per class
]
TINY = {"val_fraction": 0.25}
# Ids in the fixture's vocabulary: [PAD] 0, [CLS] 2, [SEP] 3, apple 5, pie 6, recipe 11, best 12, easy 13.
EASY_APPLE_PIE = [2, 13, 5, 6, 11, 3] + [0] * 34  # "Easy apple pie recipe"
RT_APPLE_PIE = [2, 5, 12, 5, 6, 3] + [0] * 34  # "RT #apple http://x.co/1 best apple pie" → "apple best apple pie"


@pytest.fixture(scope="module")
def food(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    raw = tmp_path_factory.mktemp("food-raw")
    fx.make_food_raw(raw)
    tokenizer = fx.make_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    out = tmp_path_factory.mktemp("food-prep") / "prepared"
    assert main(["data", "prepare", "food101", "--raw", str(raw), "--out", str(out), "--frame-size", "32",
                 "--workers", "1", "--option", f"tokenizer={tokenizer}", "--quiet"]) == 0  # fmt: skip
    return raw, out, tokenizer


def test_title_cleaning() -> None:
    # BalanceMM's pattern https?://.* also drops " yum" (it gives "pasta "); here the URL alone goes.
    assert clean_title("RT #pasta http://x.co yum") == "pasta yum"
    assert clean_title("Best #tacos!  https://a.b/c?d=1") == "Best tacos!"
    assert clean_title("RTS special RT x") == "RTS special RT x"  # only a leading "RT " is a retweet mark
    assert clean_title("  spaced \t out\n") == "spaced out"


def test_prepare_stores_token_ids_images_and_the_recipe(food: tuple[Path, Path, Path]) -> None:
    _, out, tokenizer = food
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "food101" and manifest["failed"] == {} and manifest["unmatched"] == {}
    assert manifest["classes"] == list(fx.FOOD_CLASSES)
    # test_titles.csv has BalanceMM's header row, train_titles.csv none: 12 and 6 rows either way
    assert {s: len(rows) for s, rows in manifest["splits"].items()} == {"train": 12, "test": 6}
    profile = manifest["profile"]
    assert profile["name"] == "bert_40" and profile["max_length"] == 40 and profile["version"] == 1
    assert profile["tokenizer"] == str(tokenizer.resolve()) and profile["vocab_size"] == len(fx.VOCAB) == 24
    assert profile["pad_token_id"] == 0 and "vocab.txt" in profile["hashed_files"]
    assert len(profile["vocab_sha256"]) == 64 and "URLs" in profile["cleaning"]
    # The same file name in both splits gives two clips.
    with np.load(out / "clips" / "train_apple_pie_0.npz") as npz, np.load(out / "clips" / "test_apple_pie_0.npz") as t:
        assert npz["text"].dtype == np.int64 and npz["text"].tolist() == EASY_APPLE_PIE
        assert npz["image"].shape == (32, 45, 3) and npz["image"].dtype == np.uint8  # 40 × 56 → 32 × 44.8
        assert not np.array_equal(npz["image"], t["image"])
    with np.load(out / "clips" / "train_apple_pie_1.npz") as npz:
        assert npz["text"].tolist() == RT_APPLE_PIE


def test_check_and_one_epoch(food: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = food
    assert main(["data", "check", "food101", "--root", str(out), "--set", "data.val_fraction=0.25", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "food101 at" in printed and "profile bert_40" in printed
    assert "train       9 usable (of 12 listed, 3 of them carved into val)" in printed
    assert "test        6 usable (of 6 listed), 0 missing, 0 unreadable" in printed
    code = main(["train", "--method", "baseline", "--dataset", "food101", "--quiet", "--out", str(tmp_path / "run"),
                 "--set", f"data.root={out}", *SMALL, *BERT])  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    info = summary["dataset_info"]
    assert info["sizes"] == {"train": 9, "val": 3, "test": 6} and info["profile"]["name"] == "bert_40"
    assert info["modalities"] == ["text", "visual"]


def test_the_release_read_directly(food: tuple[Path, Path, Path]) -> None:
    raw, out, tokenizer = food
    data = create_dataset("food101", root=str(raw), tokenizer=str(tokenizer), image_size=32, **TINY)
    assert data.layout == "files" and data.describe()["profile"]["vocab_size"] == 24
    test = data.split("test")
    sample = test[test.clips.index(next(c for c in test.clips if c.id == "test_apple_pie_0"))]["inputs"]
    assert sample["text"].dtype == torch.int64 and sample["text"].tolist() == EASY_APPLE_PIE
    assert sample["visual"].shape == (3, 32, 32)
    prepared = create_dataset("food101", root=str(out), image_size=32, **TINY)
    assert [c.id for c in prepared.split("test").clips] == [c.id for c in test.clips]
    assert data.input_shapes == prepared.input_shapes == {"text": (40,), "visual": (3, 32, 32)}
    with pytest.raises(DataError, match="needs a local BERT tokenizer folder"):
        create_dataset("food101", root=str(raw), **TINY)


def test_missing_image_is_listed_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "raw"
    fx.make_food_raw(raw)
    tokenizer = fx.make_tokenizer(tmp_path / "tok")
    (raw / "images" / "test" / "sushi" / "sushi_1.jpg").unlink()
    (raw / "images" / "train" / "tacos" / "tacos_2.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    assert main(["data", "prepare", "food", "--raw", str(raw), "--out", str(out), "--frame-size", "16",
                 "--workers", "1", "--option", f"tokenizer={tokenizer}", "--quiet"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert (
        "skipped" in captured.err
        and "tacos_2.jpg" in captured.err
        and "1 failed, 1 listed without media" in captured.out
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["unmatched"]) == ["test_sushi_1"] and list(manifest["failed"]) == ["train_tacos_2"]
    data = create_dataset("food101", root=str(out), **TINY)
    assert data.missing["test"] == ["test_sushi_1"] and not data.comparability()[0]
    # a restart with another tokenizer is refused: the vocabulary is part of the recipe
    other = fx.make_tokenizer(tmp_path / "tok2")
    (other / "vocab.txt").write_text((other / "vocab.txt").read_text() + "salad\n")
    with pytest.raises(DataError, match="different profile"):
        from balancemm.data.prepare import prepare

        prepare("food101", raw, out, frame_size=16, progress=False, options={"tokenizer": str(other)})


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("tokenizer={missing}", "is not a directory"),
        ("tokenizer={empty}", "cannot be loaded as a tokenizer"),
        (None, "needs a local BERT tokenizer folder"),
        ("vocab={empty}", "takes only --option tokenizer=DIR"),
    ],
)
def test_a_wrong_tokenizer_is_one_clear_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str | None, message: str
) -> None:
    raw = tmp_path / "raw"
    fx.make_food_raw(raw, per_class=(1, 1))
    (tmp_path / "empty").mkdir()
    extra = ["--option", option.format(missing=tmp_path / "nope", empty=tmp_path / "empty")] if option else []
    code = main(["data", "prepare", "food101", "--raw", str(raw), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_image_transform() -> None:
    # rotate() turns counter-clockwise like torchvision: 90° on a square image is torch.rot90 (k=1)
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    assert torch.allclose(rotate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-4)
    assert torch.allclose(rotate(x, 0.0), x, atol=1e-5)
    # non-square: 180° is a point reflection; 90° takes the pixel 2 right of the centre (2, 4) of a 5 × 9
    # image to 2 above it, so the aspect ratio is accounted for
    y = torch.rand(1, 3, 6, 10)
    assert torch.allclose(rotate(y, 180.0), y.flip(-1).flip(-2), atol=1e-4)
    dot = torch.zeros(1, 1, 5, 9)
    dot[0, 0, 2, 6] = 1.0
    turned = rotate(dot, 90.0)[0, 0]
    assert turned[0, 4] > 0.99 and turned.sum() < 1.01
    image = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    evaluated = image_to_tensor(image, 16, None)
    assert evaluated.shape == (3, 16, 16) and torch.equal(evaluated, image_to_tensor(image, 16, None))
    # white becomes (1 − mean) / std after normalisation
    white = image_to_tensor(np.full((8, 8, 3), 255, dtype=np.uint8), 8, None)
    assert torch.allclose(
        white[:, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    )
    trained = [image_to_tensor(image, 16, np.random.default_rng(s)) for s in (0, 0, 1)]
    assert torch.equal(trained[0], trained[1]) and not torch.equal(trained[0], trained[2])
    # the rotation leaves black corners: the normalised value of 0 appears in a rotated white image
    rotated = image_to_tensor(np.full((16, 16, 3), 255, dtype=np.uint8), 16, np.random.default_rng(3))
    black = -torch.tensor(0.485) / 0.229
    assert bool((rotated[0] - black).abs().min() < 0.5)


def test_protocol_preset() -> None:
    from balancemm.config import resolve_config

    cfg = resolve_config("baseline", "food101")
    t, opt = cfg.train, cfg.train.optimizer
    assert (opt.name, opt.lr, opt.momentum, opt.weight_decay) == ("sgd", 1e-3, 0.9, 1e-4)
    assert (t.scheduler.name, t.scheduler.step_size, t.scheduler.gamma) == ("step", 30, 0.1)
    assert (t.epochs, t.batch_size, t.eval_batch_size, t.num_workers) == (70, 64, 64, 4)
    text, visual = cfg.model.encoders["text"], cfg.model.encoders["visual"]
    assert (text.name, text.options.pooling, text.options.proj, visual.name) == ("bert", "pooler", 1024, "resnet18")
    assert cfg.model.fusion == "concat" and cfg.data.profile == "bert_40"
