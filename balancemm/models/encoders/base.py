"""What every encoder offers: a pooled feature, and its stages for mid-fusion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from balancemm.errors import ConfigError, first_line
from balancemm.registry import ENCODERS


class Encoder(nn.Module):
    """Maps one modality's input ``[B, *input_shape]`` to a pooled feature ``[B, num_features]``.

    ``forward`` is ``exit(stage_n(...stage_1(enter(x))), B)``. Exposing the three parts (timm's
    ``forward_features`` idea) lets a mid-fusion module such as MMTM sit between stages of any
    encoder without hand-unrolling it.
    """

    num_features: int

    def enter(self, x: Tensor) -> Tensor:
        """Input reshaping and stem, before the first stage."""
        return x

    def stages(self) -> list[nn.Module]:
        """The stages in order; each maps a channel-first map ``[B(·T), C, *S]`` to the next one.

        Encoders without them (pre-trained Transformers run as one HuggingFace call) override
        ``forward`` instead and refuse here, so mid-fusion fails with one line, not a traceback.
        """
        name = next((e.name for e in ENCODERS if e.obj is type(self)), type(self).__name__)
        raise ConfigError(
            f"encoder {name} has no stages: mid-fusion (method greedy, method.mmtm_stages) needs encoders "
            "such as resnet18, cnn or transformer"
        )

    def exit(self, h: Tensor, batch_size: int) -> Tensor:
        """Pool the last stage's map to ``[B, num_features]``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        h = self.enter(x)
        for stage in self.stages():
            h = stage(h)
        return self.exit(h, x.shape[0])


# -- helpers of the HuggingFace-backed encoders (text.py, vit.py); transformers is imported by them


def missing_transformers(encoder: str) -> ConfigError:
    """The error for a HuggingFace-backed encoder when ``transformers`` is not installed."""
    return ConfigError(
        f"encoder {encoder} needs the transformers library: pip install 'balancemm[text]' (the text extra) "
        "or pip install 'transformers>=4.40'"
    )


def load_local_pretrained(model_cls: Any, path: str, encoder: str, **kwargs: Any) -> Any:
    """``model_cls.from_pretrained`` on a local ``save_pretrained`` directory, never the network.

    Every failure is one ConfigError naming the directory: the existence check comes first because
    HuggingFace reads a path that is not a directory as a Hub repository name and would try to
    download it. The model comes back in float32 like every other encoder (transformers 5 keeps a
    checkpoint's own dtype, e.g. float16); mixed precision is the training loop's business.
    """
    where = f"{encoder}.pretrained {path!r}"
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"{where} is not a directory (expected one written by save_pretrained)")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{where} has no config.json (expected a directory written by save_pretrained)")
    try:
        model = model_cls.from_pretrained(str(directory), local_files_only=True, **kwargs)
    except Exception as exc:  # missing weights, bad JSON, corrupt safetensors…: the types vary by version
        raise ConfigError(f"{where} cannot be loaded: {first_line(exc)}") from None
    return model.float()
