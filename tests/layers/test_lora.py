"""LoRA (peer.layers.lora): h = W0 x + (alpha / r) B A x, starting at W0 x exactly; its merge equals it."""

import pytest
import torch
from torch import nn

from peer.layers.lora import LoRALinear, linear, merged_weight


def test_starts_as_the_linear_map_with_the_same_draws_and_equals_eq_3():
    torch.manual_seed(0)
    plain = nn.Linear(6, 5, bias=True)
    torch.manual_seed(0)
    lora = LoRALinear(6, 5, bias=True, rank=2, alpha=6.0)
    assert torch.equal(lora.weight, plain.weight) and torch.equal(lora.bias, plain.bias)
    x = torch.randn(3, 6)
    assert torch.equal(lora(x), plain(x))  # B = 0: no change at the start
    with torch.no_grad():
        lora.lora_b.normal_()
    want = x @ lora.weight.T + lora.bias + 3.0 * x @ lora.lora_a.T @ lora.lora_b.T  # alpha / r = 3
    torch.testing.assert_close(lora(x), want)
    torch.testing.assert_close(x @ merged_weight(lora).T + lora.bias, want)


def test_alpha_zero_means_scale_one_and_bad_arguments_fail():
    assert LoRALinear(4, 4, rank=8).scale == 1.0 and LoRALinear(4, 4, rank=8, alpha=16).scale == 2.0
    assert isinstance(linear(4, 4), nn.Linear) and isinstance(linear(4, 4, lora_rank=1), LoRALinear)
    for kw in ({"rank": 0}, {"alpha": -1.0}, {"alpha": float("nan")}):
        with pytest.raises(ValueError):
            LoRALinear(4, 4, **kw)
