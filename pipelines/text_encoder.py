"""A small local text encoder for the reference video DiT: a fixed-vocabulary word tokenizer and a tiny
transformer, trained jointly with the DiT. No Hub access: the vocabulary lives in the model config, so
`save_pretrained` / `from_pretrained` carry everything.
"""

from __future__ import annotations

import warnings

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"


class ReferenceTextEncoder(ModelMixin, ConfigMixin):
    """Word-level tokenizer + transformer encoder producing `encoder_hidden_states` [B, max_length, dim].

    Every sequence starts with a BOS token, so the empty prompt (used for classifier-free guidance) is a
    valid one-token input. Padding positions are zero in the output and masked out inside the encoder.
    Unknown words map to an UNK token with a warning (the model was never trained on them).
    """

    @register_to_config
    def __init__(
        self,
        vocab: list[str] | tuple[str, ...] = (),
        dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_dim: int = 256,
        max_length: int = 32,
    ) -> None:
        super().__init__()
        if not vocab:
            raise ValueError("ReferenceTextEncoder needs a non-empty vocabulary (e.g. clip_prompts.vocabulary()).")
        self.itos = [PAD, BOS, UNK, *vocab]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.token_embedding = nn.Embedding(len(self.itos), dim)
        self.position_embedding = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, num_heads, ffn_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        """Token ids [B, max_length] (long, CPU) of one prompt or a list of prompts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        max_len = self.config.max_length
        ids = torch.zeros(len(prompts), max_len, dtype=torch.long)
        unknown: set[str] = set()
        for i, text in enumerate(prompts):
            words = text.lower().replace(",", " ").replace(".", " ").split()
            row = [self.stoi[BOS]]
            for w in words:
                if w not in self.stoi:
                    unknown.add(w)
                row.append(self.stoi.get(w, self.stoi[UNK]))
            if len(row) > max_len:
                warnings.warn(f"prompt truncated to {max_len - 1} words: {text!r}", stacklevel=2)
                row = row[:max_len]
            ids[i, : len(row)] = torch.tensor(row)
        if unknown:
            warnings.warn(
                f"words outside the reference model's vocabulary are ignored as <unk>: {sorted(unknown)}; "
                f"known words: {' '.join(self.itos[3:])}",
                stacklevel=2,
            )
        return ids

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, L, dim] of token ids [B, L]; padding positions are exactly zero."""
        pad = input_ids == self.stoi[PAD]
        h = self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]]
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad)
        h = self.norm(h)
        return h.masked_fill(pad.unsqueeze(-1), 0.0)

    def encode(self, prompts: str | list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Tokenize and embed prompts on `device` (default: the encoder's device)."""
        ids = self.tokenize(prompts).to(device or self.device)
        return self(ids)
