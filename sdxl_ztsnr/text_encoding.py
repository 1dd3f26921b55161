"""SDXL's two CLIP text encoders with long-prompt chunking: 75-token chunks, each wrapped in BOS/EOS and
encoded separately, concatenated along the sequence (NovelAI's "CLIP context concatenation",
arXiv:2409.15997; kohya's --max_token_length 225).

Per chunk, as SDXL (Podell et al. 2023, arXiv:2307.01952): the penultimate hidden states of both encoders
concatenated on channels (768 + 1280 = 2048 for SDXL). The pooled embedding is encoder 2's projected EOS
state of the *first* chunk only: exactly what diffusers computes for a prompt of up to 75 tokens, and what
kohya keeps for longer ones; later chunks reach the UNet only through cross-attention.

Every chunk is encoded independently, so a row stored with k chunks is padded to K > k chunks exactly by
appending K - k copies of the empty chunk's embedding (`empty_chunk_embeds`, `pad_prompt_embeds`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence

import torch

CHUNK_TOKENS = 75  # tokens per chunk, without BOS/EOS
CHUNK_LENGTH = CHUNK_TOKENS + 2  # CLIP's context of 77 positions


def load_text_encoders(
    model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[list, list[torch.nn.Module]]:
    """(tokenizers, text_encoders) of an SDXL pipeline directory or Hub name, encoders in eval mode."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdxl_ztsnr.console import loading_model

    with loading_model(model_dir, "tokenizers and text encoders"):
        tokenizers = [
            CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer"),
            CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2"),
        ]
        # Loaded in fp32 so that `module_fingerprint` sees the stored weights, then cast.
        encoders = [
            CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", dtype=torch.float32),
            CLIPTextModelWithProjection.from_pretrained(
                model_dir, subfolder="text_encoder_2", dtype=torch.float32
            ),
        ]
    for encoder in encoders:
        encoder.requires_grad_(False).eval()
    fingerprints = [module_fingerprint(encoder) for encoder in encoders]
    encoders = [encoder.to(device=device, dtype=dtype) for encoder in encoders]
    for encoder, fingerprint in zip(encoders, fingerprints, strict=True):
        encoder.weights_fingerprint = fingerprint  # read by the cache metadata
    return tokenizers, encoders


def module_fingerprint(module: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """sha256 (16 hex) over parameter names, shapes and evenly spaced fp32 values: tells fine-tunes apart
    where a config hash cannot, in milliseconds. Compute it before casting the weights to a lower dtype."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        values = flat[::step][:samples_per_tensor].to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def config_hash(config: dict) -> str:
    """sha256 (16 hex) of a model config without the keys that do not change the model (versions, paths)."""
    kept = {
        k: v
        for k, v in dict(config).items()
        if not k.startswith("_")
        and k not in ("transformers_version", "torch_dtype", "dtype", "architectures")
    }
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _token_ids(prompts: Sequence[str], tokenizer) -> list[list[int]]:
    """Token ids of each prompt without BOS/EOS and without truncation."""
    return tokenizer(list(prompts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def count_chunks(prompts: Sequence[str], tokenizers: Sequence, max_chunks: int = 3) -> list[int]:
    """Chunks each prompt needs (1 for the empty prompt), capped at max_chunks; the longer tokenization of
    the two tokenizers counts."""
    counts = [1] * len(prompts)
    for tokenizer in tokenizers:
        for i, ids in enumerate(_token_ids(prompts, tokenizer)):
            counts[i] = max(counts[i], math.ceil(len(ids) / CHUNK_TOKENS))
    return [min(c, max_chunks) for c in counts]


def chunk_token_ids(prompts: Sequence[str], tokenizer, num_chunks: int) -> torch.Tensor:
    """(B, num_chunks, 77) ids: 75-token chunks, each [BOS, tokens, EOS, PAD...]; tokens past
    num_chunks·75 are dropped. The first chunk equals the tokenizer's own max_length=77 encoding."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = []
    for ids in _token_ids(prompts, tokenizer):
        chunks = []
        for c in range(num_chunks):
            piece = ids[c * CHUNK_TOKENS : (c + 1) * CHUNK_TOKENS]
            chunks.append([bos, *piece, eos] + [pad] * (CHUNK_TOKENS - len(piece)))
        rows.append(chunks)
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def encode_prompts(
    prompts: Sequence[str],
    tokenizers: Sequence,
    text_encoders: Sequence[torch.nn.Module],
    max_chunks: int = 3,
    num_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, 77·k, C1+C2), pooled (B, P)) in the encoders' dtype; k = num_chunks, or the
    smallest count fitting the longest prompt (at most max_chunks; longer prompts are truncated)."""
    return encode_prompts_with_grad(prompts, tokenizers, text_encoders, max_chunks, num_chunks)


def encode_prompts_with_grad(
    prompts: Sequence[str],
    tokenizers: Sequence,
    text_encoders: Sequence[torch.nn.Module],
    max_chunks: int = 3,
    num_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_prompts`` inside autograd, for text encoders that train (--train_text_encoder); the encoders may
    be accelerate-prepared (DDP) wrappers."""
    if len(tokenizers) != 2 or len(text_encoders) != 2:
        raise ValueError("SDXL needs two tokenizers and two text encoders (CLIP ViT-L and OpenCLIP bigG)")
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
    if num_chunks is None:
        num_chunks = max(count_chunks(prompts, tokenizers, max_chunks), default=1)
    batch = len(prompts)
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        device = next(encoder.parameters()).device
        ids = chunk_token_ids(prompts, tokenizer, num_chunks).reshape(batch * num_chunks, CHUNK_LENGTH)
        out = encoder(ids.to(device), output_hidden_states=True)
        # Penultimate layer, as SDXL was trained: (B·k, 77, C_i) -> (B, 77·k, C_i), chunks in order.
        hidden.append(out.hidden_states[-2].reshape(batch, num_chunks * CHUNK_LENGTH, -1))
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds.reshape(batch, num_chunks, -1)[:, 0]  # first chunk's pooled output
    if pooled is None:
        raise ValueError(
            "text encoder 2 must have a projection (CLIPTextModelWithProjection) for pooled embeds"
        )
    dtype = hidden[0].dtype
    return torch.cat([h.to(dtype) for h in hidden], dim=-1), pooled


def empty_chunk_embeds(tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module]) -> torch.Tensor:
    """(77, C1+C2) embedding of one empty chunk [BOS, EOS, PAD...]: what padding chunks encode to."""
    embeds, _ = encode_prompts([""], tokenizers, text_encoders, max_chunks=1, num_chunks=1)
    return embeds[0]


def pad_prompt_embeds(prompt_embeds: Sequence[torch.Tensor], pad_chunk: torch.Tensor) -> torch.Tensor:
    """Stack rows of (77·k_i, C) into (B, 77·k_max, C), padding each with copies of the empty chunk (77, C);
    equal to encoding the batch with num_chunks=k_max, since chunks are encoded independently."""
    if not prompt_embeds:
        raise ValueError("pad_prompt_embeds needs at least one row")
    longest = max(e.shape[0] for e in prompt_embeds)
    rows = []
    for embeds in prompt_embeds:
        if embeds.shape[0] % CHUNK_LENGTH or embeds.shape[-1] != pad_chunk.shape[-1]:
            raise ValueError(
                f"prompt_embeds row of shape {tuple(embeds.shape)} is not (77·k, {pad_chunk.shape[-1]})"
            )
        missing = (longest - embeds.shape[0]) // CHUNK_LENGTH
        pad = pad_chunk.to(device=embeds.device, dtype=embeds.dtype)
        rows.append(torch.cat([embeds, pad.repeat(missing, 1)]) if missing else embeds)
    return torch.stack(rows)
