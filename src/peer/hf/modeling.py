"""``PeerForCausalLM``: a :class:`peer.model.PeerLM` as a ``transformers`` causal LM.

    model = PeerForCausalLM(PeerConfig(d_model=256, sparse_layer="peer", peer={"num_experts": 65536}))
    out = model(input_ids, labels=input_ids)        # HF convention: labels are shifted inside
    model.generate(input_ids, max_new_tokens=20)    # KV cache: PeerLM's own, see PeerCache
    model.save_pretrained(d); AutoModelForCausalLM.from_pretrained(d)   # after ``import peer.hf``

The wrapped PeerLM is ``model.model``, so weight names are the PeerLM's under ``model.``; the
exported safetensors of a ``peer train`` checkpoint are its state dict with that prefix.

The loss is the mean next-token cross-entropy (``-100`` labels ignored) plus the auxiliary losses
of the FFW modules (e.g. the token-choice MoE's load-balancing loss), exactly PeerLM's loss; the
auxiliary part is also returned as ``aux_loss``.

Padding: PeerLM has no attention mask, so a forward allows only right padding (the padded positions
come after every real token and cannot influence them); a mask with a 0 before a 1 raises
ValueError. ``generate`` takes a batch padded on either side and generates it one row at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..model import KVCache, PeerLM, rotary_tables
from .configuration import PeerConfig

__all__ = ["PeerCache", "PeerCausalLMOutput", "PeerForCausalLM", "PeerPreTrainedModel"]

_V5 = int(transformers.__version__.split(".")[0]) >= 5
# transformers 5 calls the cache ``cache``; 4.x calls it ``past_key_values``
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class PeerCache:
    """The generation cache handed to and back from ``generate``: PeerLM's :class:`~peer.model.KVCache`.

    Implements the small part of the ``transformers`` Cache interface that generation touches:
    ``get_seq_length``, ``reorder_cache`` (beam search), ``crop``.
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, kv: KVCache):
        self.kv = kv

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.kv.k)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.kv.max_len

    def __len__(self) -> int:
        return len(self.kv.k)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select the batch rows ``beam_idx`` (beam search)."""
        kv = self.kv
        idx = beam_idx.to(kv.k[0].device)
        kv.k = [t.index_select(0, idx) for t in kv.k]
        kv.v = [t.index_select(0, idx) for t in kv.v]
        kv.batch_size = int(idx.numel())

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions (negative: drop ``-max_length`` from the end)."""
        n = self.kv.length
        self.kv.length = max(0, n + max_length if max_length < 0 else min(n, max_length))


@dataclass
class PeerCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``aux_loss``: the sum of the FFW modules' auxiliary losses."""

    aux_loss: torch.Tensor | None = None


class PeerPreTrainedModel(PreTrainedModel):
    """Base class: config class, weight prefix; PeerLM initialises its own weights."""

    config_class = PeerConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False
    _supports_cache_class = False  # transformers 4.x: generate must not make a DynamicCache

    @torch.no_grad()
    def _init_weights(self, module):
        """PeerLM's constructor applies its documented initialisation; only the rotary tables (buffers
        that are not saved, left empty by a meta-device load) are recomputed here."""
        if isinstance(module, PeerLM):
            cfg = module.config
            cos, sin = rotary_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)


class PeerForCausalLM(PeerPreTrainedModel, GenerationMixin):
    """A causal LM around ``PeerLM`` (``self.model``): labels, auxiliary losses, ``generate`` with a KV cache."""

    # Trainer: the loss is a per-batch mean plus auxiliary losses; let Trainer scale it for accumulation
    accepts_loss_kwargs = False
    _tied_weights_keys = {"model.lm_head.weight": "model.tok_emb.weight"} if _V5 else ["model.lm_head.weight"]

    def __init__(self, config: PeerConfig):
        super().__init__(config)
        self.model = PeerLM(config.to_model_config())
        self.post_init()

    @classmethod
    def from_peer_lm(cls, lm: PeerLM, **config_kwargs) -> PeerForCausalLM:
        """Wrap a trained PeerLM (same weights, copied); ``config_kwargs`` go to PeerConfig (e.g. eos_token_id)."""
        if not isinstance(lm, PeerLM):
            raise ValueError(f"lm must be a peer.model.PeerLM, got {type(lm).__name__}")
        model = cls(PeerConfig.from_model_config(lm.config, **config_kwargs))
        ref = next(lm.parameters())
        model.to(device=ref.device, dtype=ref.dtype)
        model.model.load_state_dict(lm.state_dict())
        return model.train(lm.training)

    # ------------------------------------------------------------------ HF plumbing
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is PeerLM's own (PeerCache), created in forward

    def get_input_embeddings(self):
        return self.model.tok_emb

    def set_input_embeddings(self, value):
        self.model.tok_emb = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: PeerCache | None = None,
        past_key_values: PeerCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> PeerCausalLMOutput:
        """input_ids [B, T] -> logits [B, T, V]; ``labels`` (= input ids, -100 ignored) give the loss.

        With a cache (``use_cache=True`` or a PeerCache passed in) ``input_ids`` continue the cached
        positions and the updated cache comes back in the output.
        """
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported by PeerForCausalLM; pass input_ids")
        if input_ids is None:
            raise ValueError("input_ids is required")
        past = cache if cache is not None else past_key_values
        if past is not None and not isinstance(past, PeerCache):
            raise ValueError(f"the cache must be a PeerCache from this model, got {type(past).__name__}")
        _check_attention_mask(attention_mask)
        if use_cache and past is None:
            past = PeerCache(self.model.new_kv_cache(input_ids.shape[0], self.config.max_seq_len))
        targets = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
                )
            # HF convention: labels are the input ids; position t predicts labels[t+1]
            targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1).long()
        out = self.model(input_ids, targets=targets, kv_cache=past.kv if past is not None else None)
        result = PeerCausalLMOutput(loss=out.loss, logits=out.logits, aux_loss=out.aux_loss, **{_CACHE_FIELD: past})
        if return_dict is False:
            return result.to_tuple()
        return result

    # ------------------------------------------------------------------ generation
    def prepare_inputs_for_generation(
        self,
        input_ids,
        cache=None,
        past_key_values=None,
        attention_mask=None,
        use_cache=True,
        inputs_embeds=None,
        **kwargs,
    ):
        """Feed only the tokens the cache has not seen; the cache object travels in model kwargs."""
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported by PeerForCausalLM.generate; pass input_ids")
        past = cache if cache is not None else past_key_values
        if past is not None:
            if not isinstance(past, PeerCache):
                raise ValueError(
                    f"PeerForCausalLM.generate needs its own PeerCache (or none), got {type(past).__name__}"
                )
            input_ids = input_ids[:, past.get_seq_length() :]
        inputs = {"input_ids": input_ids.contiguous(), "attention_mask": attention_mask, "use_cache": use_cache}
        if past is not None:
            inputs[_CACHE_FIELD] = past
        return inputs

    def generate(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        """``GenerationMixin.generate`` with two additions. The length is checked up front: prompt +
        new tokens must fit in ``max_seq_len`` (the KV cache's size). A padded batch (a 0 anywhere in
        ``attention_mask``, padding on either side) is generated one sequence at a time from its
        real tokens, since PeerLM has no attention mask (new tokens would attend to the pads); the
        results are right-padded with ``pad_token_id`` (else ``eos_token_id``) to one tensor."""
        if input_ids is not None and input_ids.dim() == 2:
            T = input_ids.shape[1]
            gc = kwargs.get("generation_config") or self.generation_config
            new = kwargs.get("max_new_tokens", getattr(gc, "max_new_tokens", None))
            if new is None:
                max_length = kwargs.get("max_length", getattr(gc, "max_length", None))
                new = (max_length - T) if max_length else 0
            if T + new > self.config.max_seq_len:
                raise ValueError(
                    f"generate: the prompt ({T} tokens) + max_new_tokens ({new}) exceed the model's "
                    f"max_seq_len={self.config.max_seq_len}; shorten the prompt or ask for at most "
                    f"{max(0, self.config.max_seq_len - T)} new tokens"
                )
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                return self._generate_rows(input_ids, attention_mask.bool(), gc, kwargs)
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _generate_rows(self, input_ids, mask, gc, kwargs):
        """A padded batch, one row at a time (see :meth:`generate`)."""
        if kwargs.get("return_dict_in_generate", getattr(gc, "return_dict_in_generate", False)):
            raise ValueError(
                "generate: a padded batch is generated one sequence at a time, which cannot "
                "return_dict_in_generate; generate the sequences separately"
            )
        if "max_length" in kwargs and "max_new_tokens" not in kwargs:
            raise ValueError("generate: with a padded batch give max_new_tokens (max_length would differ per sequence)")
        pad = gc.pad_token_id if gc.pad_token_id is not None else gc.eos_token_id
        if isinstance(pad, (list, tuple)):
            pad = pad[0]
        if pad is None:
            raise ValueError("generate: a padded batch needs pad_token_id (or eos_token_id) to pad the results")
        rows = []
        for ids, m in zip(input_ids, mask, strict=True):
            real = ids[m][None]
            if real.shape[1] == 0:
                raise ValueError("generate: a row of attention_mask has no real token")
            rows.append(super().generate(input_ids=real, attention_mask=torch.ones_like(real), **kwargs)[0])
        out = input_ids.new_full((len(rows), max(r.numel() for r in rows)), int(pad))
        for i, r in enumerate(rows):
            out[i, : r.numel()] = r
        return out

    def _reorder_cache(self, past, beam_idx):  # transformers 4.x beam search
        past.reorder_cache(beam_idx)
        return past


def _check_attention_mask(mask: torch.Tensor | None) -> None:
    """Only right padding is meaningful without an attention mask inside PeerLM."""
    if mask is None or mask.dim() != 2 or mask.shape[1] < 2:
        return
    m = mask.bool()
    if bool((~m[:, :-1] & m[:, 1:]).any()):
        raise ValueError(
            "attention_mask: PeerForCausalLM supports right padding only (a 0 before a 1 was found); "
            "pad on the right or generate one sequence at a time"
        )
