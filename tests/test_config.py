"""Config: precedence, strictness, real zero/false values, hashing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from balancemm.cli import main
from balancemm.config import RunConfig, parse_sets, resolve_config
from balancemm.errors import ConfigError


def test_precedence_defaults_protocol_user_file_cli(tmp_path: Path) -> None:
    cfg = resolve_config("ogm_ge")
    assert cfg.method.alpha == 0.1  # method default
    assert cfg.train.epochs == 30  # protocol (embedded.yaml), not the dataclass default 70
    user = tmp_path / "u.yaml"
    user.write_text("train:\n  epochs: 7\nmethod:\n  alpha: 0.4\n")
    cfg = resolve_config("ogm_ge", config_file=user)
    assert (cfg.train.epochs, cfg.method.alpha) == (7, 0.4)
    cfg = resolve_config("ogm_ge", config_file=user, sets=["train.epochs=3"])
    assert (cfg.train.epochs, cfg.method.alpha) == (3, 0.4)
    assert cfg.train.optimizer.lr == 0.02  # untouched protocol values survive the deep merge


def test_zero_and_false_are_real_values() -> None:
    cfg = resolve_config("ogm_ge", sets=["method.alpha=0", "method.ge=false", "train.grad_clip=0"])
    assert cfg.method.alpha == 0.0 and cfg.method.ge is False and cfg.train.grad_clip == 0.0


def test_yaml_1_2_scalars() -> None:
    # PyYAML's YAML 1.1 would read "off" as false and "1e-3" as a string.
    cfg = resolve_config("baseline", sets=["train.optimizer.lr=1e-3", "train.flops=off"])
    assert cfg.train.optimizer.lr == 1e-3 and cfg.train.flops == "off"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.epoch=3"], "unknown config key train.epoch (did you mean train.epochs?)"),
        (["method.alpah=3"], "did you mean method.alpha?"),
        (["train.epochs=abc"], "train.epochs: expected an integer"),
        (["train.epochs=2.5"], "train.epochs: expected an integer"),
        (["method.ge=1"], "method.ge: expected true or false"),
        (["train.epochs=0"], "train.epochs: 0 is out of range; allowed: >= 1"),
        (["method.alpha=-0.1"], "method.alpha: -0.1 is out of range"),
        (["train.optimizer.name=rmsprop"], "choose one of 'sgd', 'adamw', 'adam'"),
        (["model.fusion=late"], "model.fusion: unknown fusion 'late'"),
        (["model.encoders.audio.name=vgg"], "unknown encoder 'vgg'"),
        (["model.encoders.audio.depth=3"], "unknown config key model.encoders.audio.depth"),
        (["model.encoders.text.name=cnn"], "missing"),  # not a modality of embedded
        (["method.modulation_starts=5", "method.modulation_ends=2"], "modulation_ends must be >="),
        (["epochs=3"], "must start with a section"),
        (["train.epochs"], "expected key=value"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config("ogm_ge", sets=sets)
    assert message in str(err.value) or (message == "missing" and "exactly the dataset's modalities" in str(err.value))


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'nope'; valid: .*baseline"):
        resolve_config("nope")
    with pytest.raises(ConfigError, match=r"unknown dataset 'cifar'; valid: .*embedded"):
        resolve_config("baseline", "cifar")


def test_malformed_and_wrongly_shaped_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML at line"):
        resolve_config("baseline", config_file=bad)
    bad.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        resolve_config("baseline", config_file=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config("baseline", config_file=tmp_path / "missing.yaml")


def test_aliases_resolve_to_canonical_keys() -> None:
    assert resolve_config("OGMTrainer").run.method == "ogm_ge"
    assert resolve_config("OGM").run.method == "ogm_ge"
    assert resolve_config("MMPareto").run.method == "mmpareto"


def test_hash_is_stable_and_sensitive() -> None:
    a, b = resolve_config("ogm_ge"), resolve_config("OGM")
    assert a.digest() == b.digest()
    assert a.digest() != resolve_config("ogm_ge", sets=["method.alpha=0.2"]).digest()
    assert a.digest() != resolve_config("ogm_ge", seed=1).digest()


def test_round_trip_through_json_dict() -> None:
    cfg = resolve_config("mmpareto", "embedded3", sets=["model.fusion=sum", "method.gamma=2"])
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.digest() == cfg.digest()


def test_parse_sets_builds_nested_keys() -> None:
    assert parse_sets(["train.optimizer.lr=0.1", "method.heads=slice"]) == {
        "train": {"optimizer": {"lr": 0.1}},
        "method": {"heads": "slice"},
    }


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI on ``argv``; it must fail with exactly one line on stderr and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("balancemm: error:") and "Traceback" not in err
    return err


def _bomb(levels: int, fan: int) -> str:
    """A YAML alias bomb under data.seed: a few hundred bytes that expand to ``fan ** levels`` strings."""
    lines = ["data:", "  seed:", f"    l0: &l0 [{', '.join(['xxxxxxxx'] * fan)}]"]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"run: 5\n", "section run must be a mapping of its keys, not 5"),
        (b"train: 5\n", "section train must be a mapping of its keys, not 5"),
        (b"model:\n  encoders:\n    audio: 5\n", "model.encoders.audio: expected a mapping with the encoder's name"),
        (b"train:\n  epochs: \xff\n", "is not UTF-8 text (byte 0xff at offset 17); save it as UTF-8"),
        (("train:" + " [" * 5000).encode(), "is refused at line 1, column 70: nested deeper than 32 levels"),
        (b"data: &a\n  x: *a\n", "an alias refers to the node that contains it"),
        (b"data:\n  seed: " + b"1" * 5000 + b"\n", "a value cannot be read (Exceeds the limit"),
        (_bomb(6, 10).encode(), "expands to more than 100,000 values (aliases)"),
    ],
)
def test_hostile_config_files_are_one_short_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    err = _one_line_error(capsys, ["config", "--method", "baseline", "--config", str(path)])
    assert message in err and len(err) < 500


def test_the_alias_bomb_of_the_audit_is_refused_before_it_expands(tmp_path: Path) -> None:
    # 9 levels of 9: 387 million strings once expanded (printing them took 22 GB and minutes).
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(9, 9))
    assert len(path.read_bytes()) < 600
    with pytest.raises(ConfigError, match=r"bomb\.yaml is refused at line \d+, column \d+: expands to more than"):
        resolve_config("baseline", config_file=path)


def test_an_empty_section_sets_nothing(tmp_path: Path) -> None:
    # `train:` (None) once replaced the protocol's whole train section by what --set gave.
    path = tmp_path / "c.yaml"
    path.write_text("train:\nmethod:\nrun:\n")
    cfg = resolve_config("baseline", config_file=path, sets=["train.epochs=1"])
    assert cfg.train == resolve_config("baseline", sets=["train.epochs=1"]).train


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("model.encoders.audio=abc", "model.encoders.audio: expected a mapping with the encoder's name and options"),
        ("data.seed=" + "[" * 5000, "the value is refused: nested deeper than 32 levels"),
        ("train." + "a." * 5000 + "b=1", "the key is nested deeper than 32 levels"),
        ("data.seed=" + "x" * 100_000, "data.seed: expected an integer, got 'xxxx"),
        ("run.dataset=" + "d" * 100_000, "is not a registered name; valid: "),
        ("model.encoders." + "m" * 100_000 + "=abc", "expected a mapping with the encoder's name"),
    ],
)
def test_bad_set_values_are_one_short_line(capsys: pytest.CaptureFixture[str], item: str, message: str) -> None:
    err = _one_line_error(capsys, ["config", "--method", "baseline", "--set", item])
    assert message in err and len(err) < 1000


def test_overrides_sections_must_be_mappings() -> None:
    with pytest.raises(ConfigError, match="overrides: section train must be a mapping of its keys, not 5"):
        resolve_config("baseline", overrides={"train": 5})
    with pytest.raises(ConfigError, match="overrides: unknown section 'trian'"):
        resolve_config("baseline", overrides={"trian": {"epochs": 1}})


def test_a_damaged_saved_config_is_a_config_error() -> None:
    saved = resolve_config("baseline").to_dict()
    del saved["train"]
    with pytest.raises(ConfigError, match=r"a saved config must hold the sections .*; missing: train"):
        RunConfig.from_dict(saved)
    with pytest.raises(ConfigError, match="run: expected a mapping of RunSection fields, got 5"):
        RunConfig.from_dict({**resolve_config("baseline").to_dict(), "run": 5})


# -- what the mutation run found unchecked (docs/testing.md) ------------------------------------------


def test_the_run_id_hashes_the_canonical_json() -> None:
    # Run ids must not depend on key order or whitespace: the digest is SHA-256 over sorted, compact JSON.
    import hashlib
    import json

    cfg = resolve_config("ogm_ge", sets=["method.alpha=0.2"])
    canonical = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    assert cfg.digest() == hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("method", {"alpha": -1}, "method.alpha: -1.0 is out of range; allowed: >= 0"),
        ("data", {"seed": "x"}, "data.seed: expected an integer, got 'x'"),
        ("model", {"fusion": "late"}, "model.fusion: unknown fusion 'late'"),
        ("train", {"epochs": 0}, "train.epochs: 0 is out of range"),
    ],
)
def test_a_saved_config_names_the_bad_key(section: str, value: dict, message: str) -> None:
    saved = resolve_config("ogm_ge").to_dict()
    saved[section] = {**saved[section], **value}
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_dict(saved)


@pytest.mark.parametrize(
    ("method", "item", "message"),
    [
        ("agm", "method.kappa=abc", "method.kappa: 'abc' is not float or null"),
        ("baseline", "model.encoders.audio.channels=abc", "model.encoders.audio.channels: expected a list of int"),
        ("baseline", "model.encoders.audio.channels=[1, x]", "model.encoders.audio.channels[1]: expected an integer"),
        ("baseline", "train.grad_clip=abc", "train.grad_clip: expected a number, got 'abc'"),
    ],
)
def test_type_errors_describe_the_expected_type(method: str, item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_config(method, sets=[item])


def test_a_dataset_registered_with_its_protocol_uses_it() -> None:
    from balancemm.data import DATASETS
    from balancemm.data.embedded import Embedded

    class Toy(Embedded):
        pass

    encoders = {"audio": {"name": "cnn"}, "visual": {"name": "cnn"}}
    with DATASETS.temporary():
        DATASETS.register(
            "toy_protocol",
            modalities=("audio", "visual"),
            protocol={"model": {"encoders": encoders}, "train": {"epochs": 7}},
        )(Toy)
        assert resolve_config("baseline", "toy_protocol").train.epochs == 7
    with DATASETS.temporary():
        DATASETS.register("toy_bad", modalities=("audio", "visual"), protocol={"train": 5})(Toy)
        with pytest.raises(ConfigError, match="the protocol registered with dataset toy_bad: section train must"):
            resolve_config("baseline", "toy_bad")


def test_set_splits_at_the_first_equals_sign() -> None:
    assert parse_sets(["method.name=a=b"]) == {"method": {"name": "a=b"}}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: parse_sets(["epochs=3"]),
            "--set 'epochs=3': the key must start with a section (run, method, data, model, train), e.g. train.epochs",
        ),
        (
            lambda: parse_sets(["train.optimizer=1", "train.optimizer.lr=2"]),
            "--set 'train.optimizer.lr=2': optimizer is set twice with different shapes",
        ),
        (lambda: resolve_config(None), "no method given; use --method NAME, one of agm, amco, baseline, cml,"),
        (
            lambda: resolve_config("baseline", sets=["model.encoders.text.name=cnn"]),
            "model.encoders must name exactly the dataset's modalities (audio, visual); unknown text",
        ),
    ],
)
def test_config_errors_read_in_full(call: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        call()
    assert str(err.value).startswith(message)


def test_yaml_errors_without_a_position_still_say_what_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "control.yaml"
    bad.write_bytes(b"train:\n  epochs: \x07\n")  # a control character: PyYAML's reader gives no mark
    with pytest.raises(ConfigError) as err:
        resolve_config("baseline", config_file=bad)
    assert str(err.value) == f"config file {bad} is not valid YAML: invalid YAML"


def test_a_dataset_registered_without_its_modalities_is_named() -> None:
    from balancemm.data import DATASETS
    from balancemm.data.embedded import Embedded

    class Toy(Embedded):
        pass

    with DATASETS.temporary():
        DATASETS.register("toy_no_modalities", protocol={"model": {}})(Toy)
        with pytest.raises(ConfigError) as err:
            resolve_config("baseline", "toy_no_modalities")
    assert str(err.value) == (
        "dataset toy_no_modalities was registered without modalities=(...) (its sorted modality names)"
    )


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.optimizer.lr=0", "train.optimizer.lr: 0.0 is out of range; allowed: > 0"),
        ("data.val_fraction=0.5", "data.val_fraction: 0.5 is out of range; allowed: > 0, < 0.5"),
        ("train.optimizer.momentum=1", "train.optimizer.momentum: 1.0 is out of range; allowed: >= 0, < 1"),
        ("data.audio_informativeness=2", "data.audio_informativeness: 2.0 is out of range; allowed: >= 0, <= 1"),
    ],
)
def test_range_errors_state_every_bound(item: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config("baseline", sets=[item])
    assert str(err.value) == message


def test_null_is_a_value_where_the_type_allows_it() -> None:
    assert resolve_config("agm", sets=["method.kappa=null"]).method.kappa is None  # ranged, but None skips it


def test_values_are_shown_cut_short_in_messages() -> None:
    from balancemm.config import OptimizerConfig
    from balancemm.schema import parse, show

    assert show("x" * 50) == repr("x" * 50)
    assert "..." in show("y" * 400) and len(show("y" * 400)) < 130  # reprlib shortens one long string
    wide = show({f"k{i}": "z" * 120 for i in range(8)})  # eight shortened strings: still past 300
    assert len(wide) == 300 and wide.endswith("...")
    assert show(10**5000) == "<a int too long to print>"
    with pytest.raises(ConfigError) as err:
        parse(OptimizerConfig, 5)  # type: ignore[arg-type]
    assert str(err.value) == "config: expected a mapping of OptimizerConfig fields, got 5"


def test_registered_names_are_resolved_with_and_without_a_path() -> None:
    from balancemm.registry import FUSION_NAMES
    from balancemm.schema import resolve_name

    assert resolve_name(FUSION_NAMES, "ConcatFusion") == "concat"
    with pytest.raises(ConfigError) as err:
        resolve_name(FUSION_NAMES, "late")
    assert str(err.value).startswith("unknown fusion 'late'")
    with pytest.raises(ConfigError) as err:
        resolve_name(FUSION_NAMES, "x" * 100, "model.fusion")
    assert str(err.value).startswith("model.fusion: unknown fusion 'xxxx")  # 100 characters: still echoed
    with pytest.raises(ConfigError) as err:
        resolve_name(FUSION_NAMES, "x" * 101, "model.fusion")
    assert str(err.value).startswith("model.fusion: 'xxxx") and "is not a registered name" in str(err.value)
