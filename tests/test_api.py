"""The Python entry points shown in the README."""

from __future__ import annotations

import json
from pathlib import Path

import balancemm
from balancemm.models import MultimodalClassifier


def test_readme_python_snippet_works(tmp_path: Path) -> None:
    # alpha 0.3 and epochs 2 differ from the defaults (0.1, the dataset's 30), so both must reach the run.
    assert balancemm.resolve_config("ogm_ge").method.alpha == 0.1
    s = balancemm.train("ogm_ge", seed=1, alpha=0.3, overrides={"train": {"epochs": 2}}, out=tmp_path / "r")
    assert s["seed"] == 1 and s["method"] == "ogm_ge" and s["flops"]["total"] > 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["config"]["method"]["alpha"] == 0.3 and saved["config"]["train"]["epochs"] == 2
    assert saved["config_hash"] == s["config_hash"]
    records = [json.loads(line) for line in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["split"] == "val"] == [0, 1]
    cfg = balancemm.resolve_config("mmpareto", "embedded3", sets=["method.gamma=2"])
    assert cfg.method.gamma == 2.0
    data = balancemm.create_dataset("embedded", audio_informativeness=0.8)
    assert data.options.audio_informativeness == 0.8  # type: ignore[attr-defined]
    model = balancemm.create_model("embedded", "mmpareto")
    assert isinstance(model, MultimodalClassifier) and model.unimodal_heads is not None
    assert balancemm.create_method("mmpareto", model).hp.gamma == 1.5  # the default ...
    method = balancemm.create_method("mmpareto", model, gamma=2.5)  # ... so 2.5 can only come from the kwargs
    assert method.hp.gamma == 2.5
    assert "ogm_ge" in balancemm.list_methods(group="optimization")
    assert {"embedded", "embedded3", "cremad", "kinetics_sounds", "vggsound", "balanced_av"} <= set(
        balancemm.list_datasets()
    )
