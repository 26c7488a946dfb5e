"""The Python entry points shown in the README."""

from __future__ import annotations

from pathlib import Path

import balancemm
from balancemm.models import MultimodalClassifier


def test_readme_python_snippet_works(tmp_path: Path) -> None:
    s = balancemm.train("ogm_ge", seed=1, alpha=0.3, overrides={"train": {"epochs": 2}}, out=tmp_path / "r")
    assert s["seed"] == 1 and s["method"] == "ogm_ge" and s["flops"]["total"] > 0
    saved = (tmp_path / "r" / "config.json").read_text()
    assert '"alpha": 0.3' in saved
    cfg = balancemm.resolve_config("mmpareto", "embedded3", sets=["method.gamma=2"])
    assert cfg.method.gamma == 2.0
    data = balancemm.create_dataset("embedded", audio_informativeness=0.8)
    assert data.options.audio_informativeness == 0.8  # type: ignore[attr-defined]
    model = balancemm.create_model("embedded", "mmpareto")
    assert isinstance(model, MultimodalClassifier) and model.unimodal_heads is not None
    method = balancemm.create_method("mmpareto", model, gamma=1.5)
    assert method.hp.gamma == 1.5
    assert "ogm_ge" in balancemm.list_methods(group="optimization")
    assert {"embedded", "embedded3", "cremad", "kinetics_sounds", "vggsound", "balanced_av"} <= set(
        balancemm.list_datasets()
    )
