"""A BERT-style text Transformer through HuggingFace ``transformers``, BalanceMM's FOOD-101 text encoder.

BERT: Devlin, Chang, Lee, Toutanova. "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding." NAACL 2019. BalanceMM's ``text_encoder``
(``balancemm/encoders/pretrained_encoder.py``) runs BERT-base on the recipe title's token ids and
returns ``dropout(Linear(768 → 1024)(pooler output))``.

Input per sample ``[L]`` int64 token ids, right-padded with the model's ``pad_token_id`` (0 for BERT's
vocabularies; the datasets pad with 0). The attention mask is ``ids != pad``, so padding changes no
token's hidden state.

Weights come from a local directory written by ``save_pretrained`` (``config.json`` + weights), loaded
with ``AutoModel.from_pretrained`` (any BERT-like model: BERT, RoBERTa, …), or the model is built from
scratch from the size options (a ``BertConfig``; the size options are ignored when ``pretrained`` is
set, the directory's config decides). Nothing is ever downloaded.

Deviations from BalanceMM:

* An attention mask from the pad id; BalanceMM feeds the ids alone, so every [PAD] is attended to
  and the features depend on the padded length.
* No dropout at evaluation: BalanceMM applies ``F.dropout(p=0.5)`` with ``training=True`` after the
  projection, so its test predictions are random. Here the model's own dropout follows train/eval
  and nothing is added after the projection.
* The projection (``proj``, BalanceMM 1024) and the pooling (``pooler``, BalanceMM's; ``cls``, the
  raw [CLS] state; ``mean`` over real tokens) are options; ``proj: 0`` keeps the hidden width.
* A local ``pretrained`` directory instead of BalanceMM's ``from_pretrained('')`` placeholder.
* ``freeze: true`` stops gradients into the Transformer and keeps it in eval mode (deterministic
  features, the linear-probe convention); the projection still trains.
* No stages: BalanceMM's Greedy gates BERT layers 9–12 with the 40 token positions as channels; here
  mid-fusion refuses a bert encoder (``Encoder.stages``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from balancemm.catalog.models import BertOptions
from balancemm.errors import ConfigError
from balancemm.models.encoders.base import Encoder, load_local_pretrained, missing_transformers
from balancemm.registry import ENCODERS

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@ENCODERS.register("bert")
class BertEncoder(Encoder):
    """``[B, L]`` token ids → ``[B, proj or hidden]``. Runs as one call: no stages (no mid-fusion)."""

    Options = BertOptions

    def __init__(self, input_shape: tuple[int, ...], options: BertOptions | None = None) -> None:
        super().__init__()
        options = options or BertOptions()
        if len(input_shape) != 1:
            raise ValueError(f"bert takes [L] token ids, got {input_shape}")
        try:
            from transformers import AutoModel, BertConfig, BertModel
        except ImportError:
            raise missing_transformers("bert") from None
        self.model: PreTrainedModel
        if options.pretrained:
            self.model = load_local_pretrained(AutoModel, options.pretrained, "bert")
            if options.pooling != "pooler":
                self.model.register_module("pooler", None)  # unused: its parameters would get no gradient
            elif getattr(self.model, "pooler", None) is None:
                raise ConfigError(
                    f"bert.pretrained {options.pretrained!r} has no pooler layer; use pooling cls or mean"
                )
        else:
            bert_config = BertConfig(
                vocab_size=options.vocab_size,
                hidden_size=options.hidden,
                num_hidden_layers=options.layers,
                num_attention_heads=options.heads,
                intermediate_size=options.intermediate,
                max_position_embeddings=options.max_positions,
            )
            self.model = BertModel(bert_config, add_pooling_layer=options.pooling == "pooler")
        config = self.model.config
        if input_shape[0] > config.max_position_embeddings:
            raise ValueError(
                f"bert: {input_shape[0]} tokens exceed the model's {config.max_position_embeddings} positions"
            )
        # Models without a pad token (GPT-style) fall back to 0, the datasets' padding.
        self.pad_id = int(config.pad_token_id) if config.pad_token_id is not None else 0
        self.pooling = options.pooling
        self.frozen = options.freeze
        if self.frozen:
            self.model.requires_grad_(False)
            self.model.eval()
        self.proj: nn.Module = nn.Linear(config.hidden_size, options.proj) if options.proj else nn.Identity()
        self.num_features = options.proj or config.hidden_size

    def train(self, mode: bool = True) -> BertEncoder:
        super().train(mode)
        if self.frozen:  # a frozen Transformer stays in eval mode: no dropout noise in fixed features
            self.model.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """``[B, L]`` int64 ids → ``[B, num_features]``."""
        mask = x != self.pad_id
        out = self.model(input_ids=x, attention_mask=mask.long())
        if self.pooling == "pooler":
            pooled = out.pooler_output
        elif self.pooling == "cls":
            pooled = out.last_hidden_state[:, 0]
        else:  # mean over real tokens; an all-pad row (an absent modality) pools to 0, not NaN
            weights = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.proj(pooled)
