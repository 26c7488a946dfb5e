"""The unimodal reference: one modality's encoder and head, trained alone."""

from __future__ import annotations

import pytest

from balancemm.errors import ConfigError
from balancemm.methods.unimodal import Unimodal
from tests.conftest import TinyDataset, tiny_spec


@pytest.mark.parametrize("modality", ["audio", "visual"])
def test_the_model_keeps_only_the_chosen_modality(modality: str) -> None:
    spec = tiny_spec(TinyDataset())
    only = Unimodal.model_spec(spec, Unimodal.HParams(modality=modality))
    assert only == spec.only([modality]) and only.modalities == (modality,)


@pytest.mark.parametrize(("modality", "got"), [(None, "it is not set"), ("text", "got 'text'"), ("", "it is not set")])
def test_a_missing_or_unknown_modality_is_one_clear_error(modality: str | None, got: str) -> None:
    with pytest.raises(ConfigError) as err:
        Unimodal.model_spec(tiny_spec(TinyDataset()), Unimodal.HParams(modality=modality))
    assert str(err.value) == (
        f"unimodal needs method.modality, one of audio, visual ({got}); e.g. --set method.modality=audio"
    )
