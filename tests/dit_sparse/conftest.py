"""Shared fixtures for the dit_sparse tests."""

import pytest
import torch


@torch.no_grad()
def _build_coherent_tiny_wan(num_layers=2, seed=0):
    """Tiny Wan whose self-attention is concentrated and tile-coherent on a banded input.

    Random weights give diffuse or row-incoherent attention. Here keys share the query projection and
    the input is constant over bands of 8 latent rows, so tokens attend to their own band: whole key tiles
    carry negligible mass for whole query tiles, as in real video DiTs' local attention.
    """
    from dit_sparse.pipelines.tiny_models import tiny_wan_transformer

    model = tiny_wan_transformer(num_layers=num_layers, seed=seed)
    for block in model.blocks:
        a = block.attn1
        a.to_k.weight.copy_(a.to_q.weight)
        a.to_k.bias.copy_(a.to_q.bias)
        a.norm_q.weight.mul_(2.0)
        a.norm_k.weight.copy_(a.norm_q.weight)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 3, 1, generator=g).repeat_interleave(8, 3).expand(-1, -1, -1, -1, 24).contiguous()
    return model, x, torch.randn(1, 7, 32, generator=g)


@pytest.fixture
def coherent_tiny_wan():
    """Factory: (num_layers=2, seed=0) -> (tiny Wan with tile-coherent attention, latent input, text)."""
    return _build_coherent_tiny_wan
