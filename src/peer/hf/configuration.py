"""``PeerConfig``: a ``transformers`` config holding the fields of :class:`peer.config.ModelConfig`.

    cfg = PeerConfig.from_model_config(model_cfg)     # from a peer ModelConfig
    model_cfg = cfg.to_model_config()                 # back (validated, errors name ``model.<field>``)

The nested layer settings (``peer``, ``pkm``, ``moe``) are plain dicts, so ``config.json`` is plain JSON.
The usual Hugging Face names are aliases: ``hidden_size`` = ``d_model``, ``num_hidden_layers`` =
``n_layers``, ``num_attention_heads`` = ``n_heads``, ``max_position_embeddings`` = ``max_seq_len``;
``tie_word_embeddings`` follows ``tie_embeddings``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from ..config import ModelConfig, config_from_dict

__all__ = ["PeerConfig"]

_MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]
_NESTED = ("peer", "pkm", "moe")


class PeerConfig(PretrainedConfig):
    """Configuration of :class:`peer.hf.PeerForCausalLM`: every field of ``peer.config.ModelConfig``.

    Keyword arguments not given take ``ModelConfig``'s defaults; nested ``peer`` / ``pkm`` / ``moe``
    dicts are merged over the defaults of their dataclasses. Values are checked when the model is
    built (:meth:`to_model_config`), with errors naming ``model.<field>``.
    """

    model_type = "peer"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
    }
    # Trainer / evaluation: output keys that are not logits
    keys_to_ignore_at_inference = ["cache", "past_key_values", "aux_loss"]

    def __init__(self, **kwargs: Any):
        defaults = dataclasses.asdict(ModelConfig())
        for name in _MODEL_FIELDS:
            value = kwargs.pop(name, None)
            if value is None:
                value = defaults[name]
            elif name in _NESTED:
                if dataclasses.is_dataclass(value):
                    value = dataclasses.asdict(value)
                if not isinstance(value, dict):
                    raise ValueError(f"PeerConfig: {name} must be a dict of settings, got {value!r}")
                value = {**defaults[name], **value}
            elif name == "sparse_blocks" and not isinstance(value, str):
                value = [int(i) for i in value]
            setattr(self, name, value)
        kwargs.pop("tie_word_embeddings", None)  # always follows tie_embeddings
        kwargs.setdefault("use_cache", True)
        super().__init__(tie_word_embeddings=bool(self.tie_embeddings), **kwargs)

    # ------------------------------------------------------------------ ModelConfig bridge
    @classmethod
    def from_model_config(cls, model_cfg: ModelConfig, **kwargs: Any) -> PeerConfig:
        """A PeerConfig with the fields of ``model_cfg`` (plus extra HF settings, e.g. ``eos_token_id``)."""
        if not isinstance(model_cfg, ModelConfig):
            raise ValueError(f"model_cfg must be a peer.config.ModelConfig, got {type(model_cfg).__name__}")
        return cls(**dataclasses.asdict(model_cfg), **kwargs)

    def model_fields(self) -> dict[str, Any]:
        """The ModelConfig fields as a plain dict (nested layer settings as dicts)."""
        return {name: getattr(self, name) for name in _MODEL_FIELDS}

    def to_model_config(self) -> ModelConfig:
        """The validated ``peer.config.ModelConfig``; a bad value raises ConfigError naming ``model.<field>``."""
        fields = self.model_fields()
        # only the model section matters; keep train.seq_len within max_seq_len so validation is about the model
        seq_len = max(1, min(128, int(fields["max_seq_len"]) if isinstance(fields["max_seq_len"], int) else 1))
        return config_from_dict({"model": fields, "train": {"seq_len": seq_len}}).model
