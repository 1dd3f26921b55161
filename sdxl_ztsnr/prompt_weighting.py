"""A1111-style prompt emphasis on top of the training path's 75-token chunking.

Syntax (as AUTOMATIC1111's web UI reads it): ``(text)`` multiplies the weight of its tokens by 1.1,
``[text]`` divides it by 1.1, ``(text:1.3)`` sets the factor to 1.3; brackets nest (factors multiply) and
``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` stand for the literal characters. An unclosed bracket applies to
the rest of the prompt; an unmatched closing one is kept as text. ``BREAK`` is not special here: the
training captions were chunked every 75 tokens with no breaks, and sampling uses the same chunks.

The prompt is encoded exactly as in training (`sdxl_ztsnr.text_encoding.encode_prompts`), then each chunk's
hidden states are multiplied per token by its weight and rescaled so their mean is unchanged — A1111's
"original" emphasis. Two deliberate differences: the mean is restored per prompt, per chunk and per text
encoder (A1111 takes it over the whole batch, which makes a prompt depend on its batch-mates), and the
pooled embedding is left unweighted (as in A1111). We chose this small parser over compel: compel reads
its own syntax (``word++``, ``(word)1.2``), not A1111's, and chunks long prompts its own way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from sdxl_ztsnr.text_encoding import CHUNK_LENGTH, CHUNK_TOKENS, count_chunks, encode_prompts

ROUND_FACTOR = 1.1  # what one pair of ( ) multiplies by
SQUARE_FACTOR = 1 / 1.1  # what one pair of [ ] multiplies by

# One lexical piece of a prompt: an escape, a weighted close ":1.2)", a bracket, or a run of plain text.
_PIECE = re.compile(r"\\[()\[\]\\]|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|[()\[\]]|[^\\()\[\]:]+|[\\:]")


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """Split an A1111-style prompt into (text, weight) fragments; plain text gets weight 1.0.

    Neighbouring fragments of equal weight are merged; a prompt without markup gives [(prompt, 1.0)].
    """
    fragments: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    open_round: list[int] = []  # index of the first fragment inside each open bracket
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _PIECE.finditer(prompt):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            if len(piece) == 2:  # an escape stands for its character; a backslash before anything else is
                fragments.append([piece[1], 1.0])  # dropped, as A1111 drops it ("a\\b" reads "ab")
        elif piece == "(":
            open_round.append(len(fragments))
        elif piece == "[":
            open_square.append(len(fragments))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), float(weight))
        elif piece == ")" and open_round:
            scale_from(open_round.pop(), ROUND_FACTOR)
        elif piece == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_FACTOR)
        else:
            fragments.append([piece, 1.0])
    for start in open_round:
        scale_from(start, ROUND_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_FACTOR)

    merged: list[tuple[str, float]] = []
    for text, factor in fragments:
        if merged and merged[-1][1] == factor:
            merged[-1] = (merged[-1][0] + text, factor)
        else:
            merged.append((text, factor))
    return merged or [("", 1.0)]


def plain_text(fragments: Sequence[tuple[str, float]]) -> str:
    """The text the tokenizers see: one fragment as is; several joined by spaces so that no token spans two
    fragments (CLIP's tokenizer splits words at spaces), which is how A1111 tokenizes fragments."""
    if len(fragments) == 1:
        return fragments[0][0]
    return " ".join(text for text, _ in fragments)


def token_weights(fragments: Sequence[tuple[str, float]], tokenizer, num_chunks: int) -> torch.Tensor:
    """(num_chunks·77,) weight of every position of the chunked ids: BOS, EOS and padding keep 1.0."""
    weights: list[float] = []
    for text, factor in fragments:
        count = len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])
        weights.extend([factor] * count)
    joined = tokenizer(plain_text(fragments), add_special_tokens=False, truncation=False, verbose=False)
    if len(joined["input_ids"]) != len(weights):
        raise RuntimeError(
            f"emphasis: fragments tokenize to {len(weights)} tokens but their joined text to "
            f"{len(joined['input_ids'])}; prompt fragments {list(fragments)!r}"
        )
    out = torch.ones(num_chunks, CHUNK_LENGTH)
    for chunk in range(num_chunks):
        piece = weights[chunk * CHUNK_TOKENS : (chunk + 1) * CHUNK_TOKENS]
        out[chunk, 1 : 1 + len(piece)] = torch.tensor(piece)
    return out.reshape(-1)


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply (77·k, C) hidden states per token by (77·k,) weights, then restore each chunk's mean (A1111)."""
    chunks = hidden.float().reshape(-1, CHUNK_LENGTH, hidden.shape[-1])
    original_mean = chunks.mean(dim=(1, 2), keepdim=True)
    weighted = chunks * weights.reshape(-1, CHUNK_LENGTH, 1).to(chunks.device)
    weighted = weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))
    return weighted.reshape(hidden.shape).to(hidden.dtype)


def prompt_chunk_counts(
    prompts: Sequence[str], tokenizers: Sequence, max_chunks: int = 3, emphasis: bool = True
) -> list[int]:
    """Chunks each prompt gets when `encode_weighted_prompts` encodes it alone; a batch gets its rows' most."""
    texts = [plain_text(parse_emphasis(prompt)) for prompt in prompts] if emphasis else list(prompts)
    return count_chunks(texts, tokenizers, max_chunks)


@torch.no_grad()
def encode_weighted_prompts(
    prompts: Sequence[str],
    tokenizers: Sequence,
    text_encoders: Sequence[torch.nn.Module],
    max_chunks: int = 3,
    emphasis: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, 77·k, C1+C2), pooled (B, P)) through the training chunking, with A1111 emphasis.

    ``emphasis=False`` encodes the prompts verbatim (brackets are text), exactly as training captions were.
    Without markup the result equals `encode_prompts` bit for bit.
    """
    if not emphasis:
        return encode_prompts(prompts, tokenizers, text_encoders, max_chunks=max_chunks)
    parsed = [parse_emphasis(prompt) for prompt in prompts]
    texts = [plain_text(fragments) for fragments in parsed]
    num_chunks = max(count_chunks(texts, tokenizers, max_chunks), default=1)
    embeds, pooled = encode_prompts(texts, tokenizers, text_encoders, num_chunks=num_chunks)
    if all(len(fragments) == 1 and fragments[0][1] == 1.0 for fragments in parsed):
        return embeds, pooled
    # Each encoder's slice of the channels is weighted and mean-restored on its own, as A1111 does.
    widths = [encoder.config.hidden_size for encoder in text_encoders]
    parts = list(torch.split(embeds, widths, dim=-1))
    for index, fragments in enumerate(parsed):
        for slot, tokenizer in enumerate(tokenizers):
            weights = token_weights(fragments, tokenizer, num_chunks)
            parts[slot][index] = apply_emphasis(parts[slot][index], weights)
    return torch.cat(parts, dim=-1), pooled
