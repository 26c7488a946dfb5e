"""Config: precedence, strictness, real zero/false values, hashing."""

from __future__ import annotations

import dataclasses
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from balancemm import config
from balancemm.catalog import ENCODER_OPTIONS, FUSION_NAMES
from balancemm.cli import main
from balancemm.config import MAX_DEPTH, MAX_VALUES, OptimizerConfig, RunConfig, load_yaml, parse_sets, resolve_config
from balancemm.errors import ConfigError
from balancemm.schema import coerce, epoch_meta, parse, resolve_epoch, resolve_name, rng, show, window_order


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
        (
            lambda: resolve_config(None),
            "no method given; use --method NAME, one of agm, amco, aug, baseline, cggm, cml, dgl,",
        ),
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


# -- survivors of the second mutation run: exact messages, exact bounds ---------------------------------


def _error(call: Any) -> str:
    """The message of the ConfigError ``call()`` raises."""
    with pytest.raises(ConfigError) as err:
        call()
    return str(err.value)


def _values(n: int) -> str:
    """A YAML document that stands for exactly ``n`` values once its aliases are expanded (n >= 99_003): a
    mapping (1) with one key (1) holding a list (1) of a 1000-value anchored list, 98 aliases to it and
    scalars for the rest; the mapping and the list each count themselves, so each of their +1s matters."""
    block = "&b [" + ", ".join(["0"] * 999) + "]"
    return "{a: [" + ", ".join([block] + ["*b"] * 98 + ["0"] * (n - 3 - 99_000)) + "]}"


def test_a_document_of_exactly_max_values_is_read_and_one_more_is_refused() -> None:
    assert len(parse_sets([f"data.x={_values(MAX_VALUES)}"])["data"]["x"]["a"]) == 1 + 98 + 997
    message = _error(lambda: parse_sets([f"data.x={_values(MAX_VALUES + 1)}"]))
    assert message.endswith(": the value is refused: expands to more than 100,000 values (aliases)")


def test_aliases_used_as_keys_count_towards_the_size_bound() -> None:
    # 101 keys that are each an alias to a 1000-value list: refused by size, before PyYAML builds anything
    # (else the error would be PyYAML's "found unhashable key" or, with hashable keys, a huge mapping).
    text = "{b: &b [" + ", ".join(["0"] * 999) + "], m: {" + ", ".join(["*b : 0"] * 101) + "}}"
    message = _error(lambda: parse_sets([f"data.x={text}"]))
    assert message.endswith(": the value is refused: expands to more than 100,000 values (aliases)")


def test_a_document_nested_exactly_max_depth_levels_is_read_and_one_more_is_refused() -> None:
    nested: list[Any] = []
    for _ in range(MAX_DEPTH - 1):
        nested = [nested]
    assert parse_sets(["data.x=" + "[" * MAX_DEPTH + "]" * MAX_DEPTH]) == {"data": {"x": nested}}
    item = "data.x=" + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    assert _error(lambda: parse_sets([item])) == f"--set {item!r}: the value is refused: nested deeper than 32 levels"


def test_the_depth_bound_counts_levels_after_a_sibling_returns() -> None:
    # 40 levels, the second 20 under a list whose first item came back first: the depth must be restored
    # to the level of that list, not reset.
    item = "data.x=" + "[" * 20 + "0, " + "[" * 20 + "]" * 40
    assert _error(lambda: parse_sets([item])).endswith("the value is refused: nested deeper than 32 levels")


def test_a_refused_document_is_a_yaml_error_that_names_its_position() -> None:
    # Code that catches yaml.YAMLError (not only load_yaml) prints it like PyYAML's own errors.
    with pytest.raises(yaml.YAMLError) as err:
        config._yaml("[" * 40)
    mark = err.value.problem_mark  # type: ignore[attr-defined]
    assert (mark.line, mark.column) == (0, 32)
    assert str(err.value).startswith('nested deeper than 32 levels\n  in "<unicode string>", line 1, column 33:\n')


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("data: &a\n  x: *a\n", "is refused at line 1, column 7: an alias refers to the node that contains it"),
        ("train: {a: 1", "is not valid YAML at line 1, column 13: expected ',' or '}', but got '<stream end>'"),
        (
            "train:\n  epochs: [1, 2\n",
            "is not valid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'",
        ),
        ("- 1\n- 2\n", "must hold a mapping, not [1, 2]"),
        ("trian:\n  epochs: 3\n", ": unknown section 'trian'; allowed: run, method, data, model, train"),
    ],
)
def test_load_yaml_messages_read_in_full(tmp_path: Path, content: str, message: str) -> None:
    # Positions are 1-based; the message ends with what the parser or the check found.
    path = tmp_path / "c.yaml"
    path.write_text(content)
    sep = "" if message.startswith(":") else " "
    assert _error(lambda: load_yaml(path)) == f"config file {path}{sep}{message}"


@pytest.mark.parametrize(
    ("error", "shown"),
    [(PermissionError(13, "Permission denied"), "Permission denied"), (OSError("disk gone"), "disk gone")],
)
def test_a_file_that_cannot_be_read_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError, shown: str
) -> None:
    # The OS's reason (strerror) when it gives one, else the exception's own text.
    path = tmp_path / "c.yaml"
    path.write_text("train: {}\n")

    def fail(self: Path) -> bytes:
        raise error

    monkeypatch.setattr(Path, "read_bytes", fail)
    assert _error(lambda: load_yaml(path)) == f"cannot read config file {path} ({shown})"


def test_an_unreadable_value_is_quoted_up_to_200_characters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train: {}\n")

    def fail(text: str) -> Any:
        raise ValueError("v" * 300)

    monkeypatch.setattr(config, "_yaml", fail)
    assert _error(lambda: load_yaml(path)) == f"config file {path}: a value cannot be read ({'v' * 200})"


def test_an_empty_section_is_skipped_not_the_sections_after_it(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\nmethod:\n  alpha: 0.4\n")
    assert resolve_config("ogm_ge", config_file=path).method.alpha == 0.4
    path.write_text("train:\ntrian: {}\n")
    assert _error(lambda: load_yaml(path)) == (
        f"config file {path}: unknown section 'trian'; allowed: run, method, data, model, train"
    )


def test_the_run_section_of_a_file_sets_the_run(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  method: ogm_ge\n  seed: 3\n")
    run = resolve_config(config_file=path).run
    assert (run.method, run.seed) == ("ogm_ge", 3)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.epochs", "--set 'train.epochs': expected key=value, e.g. --set train.epochs=5"),
        (
            "train=5",
            "--set 'train=5': the key must start with a section (run, method, data, model, train), e.g. train.epochs",
        ),
        (
            "train." + "a." * (MAX_DEPTH - 1) + "b=1",
            f"--set 'train.{'a.' * (MAX_DEPTH - 1)}b=1': the key is nested deeper than 32 levels",
        ),
    ],
)
def test_set_errors_read_in_full(item: str, message: str) -> None:
    assert _error(lambda: parse_sets([item])) == message


def test_a_set_key_of_exactly_max_depth_parts_is_accepted() -> None:
    value = parse_sets(["train." + "a." * (MAX_DEPTH - 2) + "b=1"])
    for _ in range(MAX_DEPTH):  # train, 30 times a, b
        (value,) = value.values()
    assert value == 1


@pytest.mark.parametrize(
    ("item", "value"),
    [
        ("data.name=", ""),  # nothing after "=": the empty string, not YAML's null
        ("data.name=  ", ""),
        ("data.name=[1, 2", "[1, 2"),  # not YAML: the text as typed
        ("data.name=" + "1" * 5000, "1" * 5000),  # an integer Python refuses to read: the text as typed
    ],
)
def test_set_values_that_are_not_yaml_are_kept_as_typed(item: str, value: str) -> None:
    assert parse_sets([item]) == {"data": {"name": value}}


def test_a_dataset_protocol_may_set_the_data_section_but_not_the_run() -> None:
    from balancemm.data import DATASETS
    from balancemm.data.embedded import Embedded

    class Toy(Embedded):
        pass

    encoders = {"audio": {"name": "cnn"}, "visual": {"name": "cnn"}}
    with DATASETS.temporary():
        DATASETS.register(
            "toy_data", modalities=("audio", "visual"), protocol={"data": {"seed": 5}, "model": {"encoders": encoders}}
        )(Toy)
        assert resolve_config("baseline", "toy_data").data.seed == 5
    with DATASETS.temporary():
        DATASETS.register("toy_run", modalities=("audio", "visual"), protocol={"run": {"seed": 1}})(Toy)
        assert _error(lambda: resolve_config("baseline", "toy_run")) == (
            "the protocol registered with dataset toy_run: unknown section 'run'; allowed: data, model, train"
        )


def test_a_protocol_without_a_model_section_names_every_missing_modality() -> None:
    from balancemm.data import DATASETS
    from balancemm.data.embedded import Embedded

    class Toy(Embedded):
        pass

    with DATASETS.temporary():
        DATASETS.register("toy_no_model", modalities=("audio", "visual"), protocol={"train": {"epochs": 1}})(Toy)
        assert _error(lambda: resolve_config("baseline", "toy_no_model")) == (
            "model.encoders must name exactly the dataset's modalities (audio, visual); missing audio, visual"
        )


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["model.encoders.text.name=cnn", "model.encoders.depth.name=cnn"],
            "model.encoders must name exactly the dataset's modalities (audio, visual); unknown text, depth",
        ),
        (
            ["model.encoders.audio=null"],
            "model.encoders.audio: missing key 'name'; valid encoders: " + ", ".join(ENCODER_OPTIONS.names()),
        ),
        (
            ["model.encoders.audio.name=vgg"],
            "model.encoders.audio.name: unknown encoder 'vgg'; valid: " + ", ".join(ENCODER_OPTIONS.names()),
        ),
        (["model.encoders.audio.name=5"], "model.encoders.audio.name: expected a string, got 5"),
        (["model.encoders=5"], "model.encoders: expected a mapping modality -> encoder, got 5"),
        (
            ["model.encoders." + "m" * 150 + "=abc"],
            f"model.encoders.{'m' * 100}: expected a mapping with the encoder's name and options, got 'abc'",
        ),
        (["model.fusion=5"], "model.fusion: expected a string, got 5"),
        (["run.seed=x"], "run.seed: expected an integer, got 'x'"),
        (["train.optimizer=5"], "train.optimizer: expected a mapping of OptimizerConfig fields, got 5"),
        (
            ["train.optimizer.name=rmsprop"],
            "train.optimizer.name: 'rmsprop' is not allowed; choose one of 'sgd', 'adamw', 'adam'",
        ),
        (["train.deterministic=1"], "train.deterministic: expected true or false, got 1"),
        (["model.encoders.audio.channels=abc"], "model.encoders.audio.channels: expected a list of int, got 'abc'"),
        (["method.x=5"], "unknown config key method.x; allowed keys: none"),  # baseline has no hyper-parameters
        (
            ["train.zzz=5"],
            "unknown config key train.zzz; allowed keys: "
            + ", ".join(f.name for f in dataclasses.fields(config.TrainConfig)),
        ),
    ],
)
def test_resolve_config_errors_read_in_full(sets: list[str], message: str) -> None:
    assert _error(lambda: resolve_config("baseline", sets=sets)) == message


def test_a_window_error_names_the_section() -> None:
    message = _error(lambda: resolve_config("ogm_ge", sets=["method.modulation_starts=5", "method.modulation_ends=2"]))
    assert message == "method.modulation_ends must be >= method.modulation_starts"


def test_values_on_their_bound_are_accepted() -> None:
    cfg = resolve_config("agm", sets=["data.audio_informativeness=1", "method.kappa=0.5"])
    assert (cfg.data.audio_informativeness, cfg.method.kappa) == (1.0, 0.5)


def test_a_saved_config_that_is_not_a_mapping_misses_every_section() -> None:
    assert _error(lambda: RunConfig.from_dict(5)) == (  # type: ignore[arg-type]
        "a saved config must hold the sections run, method, data, model, train; missing: run, method, data, model, "
        "train"
    )
    saved = resolve_config("baseline").to_dict()
    del saved["data"], saved["train"]
    assert _error(lambda: RunConfig.from_dict(saved)) == (
        "a saved config must hold the sections run, method, data, model, train; missing: data, train"
    )


def test_show_cuts_only_past_300_characters() -> None:
    exactly = ["x" * 96] * 3  # repr: 300 characters
    assert show(exactly) == repr(exactly)
    longer = ["x" * 96, "x" * 96, "x" * 97]  # 301
    assert show(longer) == repr(longer)[:297] + "..."


def test_too_long_names_list_the_valid_ones() -> None:
    name = "x" * 101
    assert _error(lambda: resolve_name(FUSION_NAMES, name, "model.fusion")) == (
        f"model.fusion: {name!r} is not a registered name; valid: {', '.join(FUSION_NAMES.names())}"
    )


def test_rng_declares_each_bound_and_each_bound_is_checked() -> None:
    # Built here, not at import: field metadata is computed when the class is defined.
    assert rng(ge=1, gt=2, le=3, lt=4) == {"ge": 1, "gt": 2, "le": 3, "lt": 4}

    @dataclass(frozen=True)
    class Ranged:
        ge: float = field(default=0.0, metadata=rng(ge=0))
        gt: float = field(default=1.0, metadata=rng(gt=0))
        le: float = field(default=0.0, metadata=rng(le=1))
        lt: float = field(default=0.0, metadata=rng(lt=1))

    assert parse(Ranged, {"ge": 0, "gt": 0.5, "le": 1, "lt": 0.5}) == Ranged(0.0, 0.5, 1.0, 0.5)
    for key, bad, allowed in [("ge", -1, ">= 0"), ("gt", 0, "> 0"), ("le", 1.5, "<= 1"), ("lt", 1, "< 1")]:
        with pytest.raises(ConfigError) as err:
            parse(Ranged, {key: bad}, "r")
        assert str(err.value) == f"r.{key}: {float(bad)} is out of range; allowed: {allowed}"


def test_epoch_fields_take_an_epoch_or_a_share_up_to_100_percent() -> None:
    @dataclass(frozen=True)
    class Window:
        start: int | str = field(default=0, metadata=epoch_meta())
        period: int | str = field(default=1, metadata=epoch_meta(ge=1))

    assert parse(Window, {"start": 0, "period": 1}) == Window(0, 1)
    assert parse(Window, {"start": " 100% ", "period": "0%"}) == Window("100%", "0%")
    assert _error(lambda: parse(Window, {"start": -1}, "w")) == "w.start: -1 is out of range; allowed: >= 0"
    assert _error(lambda: parse(Window, {"period": 0}, "w")) == "w.period: 0 is out of range; allowed: >= 1"
    for bad in ("abc", "100.5%"):
        with pytest.raises(ConfigError) as err:
            parse(Window, {"start": bad}, "w")
        assert str(err.value) == (
            f"w.start: expected an epoch number or a share of train.epochs between '0%' and '100%', got {bad!r}"
        )


def test_resolve_epoch_rounds_half_up_and_bounds_below_by_ge() -> None:
    assert resolve_epoch(7, 30) == 7
    assert resolve_epoch("50%", 3) == 2  # 1.5 rounds up
    assert resolve_epoch("1%", 30) == 0  # 0.3 rounds down; ge defaults to 0
    assert resolve_epoch("1%", 30, ge=1) == 1


def test_a_window_may_be_one_epoch_long_and_compares_integers_exactly() -> None:
    window_order(5, 5, "m")
    window_order("30%", "30%", "m")
    window_order(5, "1%", "m")  # mixed units: compared once the protocol's length is known
    # 2**53 + 1 and 2**53 are the same float: the order of epoch numbers is taken on the integers.
    with pytest.raises(ConfigError) as err:
        window_order(2**53 + 1, 2**53, "m")
    assert str(err.value) == "m.modulation_ends must be >= m.modulation_starts"


def test_coerce_tries_each_type_of_a_union_in_turn() -> None:
    assert coerce(3, None | int, "x") == 3  # null first among the types
    assert coerce(0.5, float | None, "x") == 0.5
    assert coerce("abc", int | str, "x") == "abc"  # not an integer: the next type
    assert coerce(None, int | None, "x") is None


def test_an_unsupported_type_is_named_with_its_path() -> None:
    # A schema bug, not a user error: a TypeError, with the key, also from inside a union.
    with pytest.raises(TypeError) as err:
        coerce({}, dict | None, "model.x")
    assert str(err.value) == "unsupported config type <class 'dict'> at model.x"


def test_a_type_left_as_a_string_is_described_by_that_string() -> None:
    # tuple["Encoder", ...], as coerce may be handed it by code that does not resolve its type hints
    unresolved = types.GenericAlias(tuple, ("Encoder", ...))
    assert _error(lambda: coerce(5, unresolved, "x")) == "x: expected a list of Encoder, got 5"


def test_coerce_type_errors_read_in_full() -> None:
    assert _error(lambda: coerce(5, str, "x")) == "x: expected a string, got 5"
    assert _error(lambda: coerce("b", Literal["a"], "x")) == "x: 'b' is not allowed; choose one of 'a'"


def test_parse_messages_without_a_path_and_with_a_long_key() -> None:
    allowed = "allowed keys: name, lr, momentum, weight_decay"
    assert _error(lambda: parse(OptimizerConfig, {"lrr": 1})) == f"unknown config key lrr (did you mean lr?); {allowed}"
    assert _error(lambda: parse(OptimizerConfig, {"zzz": 1})) == f"unknown config key zzz; {allowed}"
    key = "k" * 150
    assert _error(lambda: parse(OptimizerConfig, {key: 1}, "o")) == f"unknown config key o.{'k' * 100}; {allowed}"


def test_a_missing_required_key_is_named() -> None:
    @dataclass(frozen=True)
    class Required:
        x: int

    assert _error(lambda: parse(Required, {}, "r")) == "missing required config key r.x"
    assert _error(lambda: parse(Required, {})) == "missing required config key x"
