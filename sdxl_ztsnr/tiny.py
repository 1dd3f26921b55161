"""Tiny random-weight SDXL pipeline for tests and smoke runs: SDXL's structure at toy widths.

`build_tiny_sdxl(out_dir)` writes a diffusers-format directory (unet/ vae/ text_encoder/ text_encoder_2/
tokenizer/ tokenizer_2/ scheduler/ model_index.json) that `StableDiffusionXLPipeline.from_pretrained` loads
and samples at 64x64 on CPU in about a second. Nothing is downloaded: the CLIP tokenizers get a small
byte-level BPE vocabulary trained here on a fixed word list. Dims are deliberately not SDXL's (the text
embeddings are 96 wide, not 2048), so code that reads dims from configs is exercised.

    python -m sdxl_ztsnr.tiny OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import torch

from sdxl_ztsnr.export import save_pipeline
from sdxl_ztsnr.schedule import scheduler_config

# Widths. CLIP-L-like encoder 1 without projection, bigG-like encoder 2 with projection (SDXL: 768, 1280,
# projection 1280); cross-attention sees both hidden states concatenated (SDXL: 2048).
TEXT_1_HIDDEN = 32
TEXT_2_HIDDEN = 64
TEXT_2_PROJECTION = 32
CROSS_ATTENTION_DIM = TEXT_1_HIDDEN + TEXT_2_HIDDEN
ADDITION_TIME_EMBED_DIM = 8  # SDXL: 256; six micro-conditioning numbers each get this many Fourier features
MAX_TOKENS = 77  # CLIP context: BOS + 75 tokens + EOS

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
END_OF_WORD = "</w>"

# Words the BPE is trained on: every one becomes a single token; anything else splits into pieces down to
# single bytes, so arbitrary text still tokenizes. Digits are split off by the pre-tokenizer ("1girl" -> "1",
# "girl"), so the list holds letter-only words.
WORD_LIST = """
solo girl boy anime style outdoor outdoors indoor indoors solid black white grey gray red green
blue yellow orange purple pink brown cyan magenta colour color colorful monochrome simple background high
quality best low worst masterpiece horizontal vertical diagonal stripes striped checkerboard noise gradient
circle square pattern texture photo photograph painting sketch watercolor flat realistic portrait landscape
night day sky cloud clouds sun moon star stars tree trees grass water sea beach city street room window
cat dog flower flowers hair long short eyes smile looking at viewer standing sitting holding with and the
a an of in on watermark signature sparkles light dark bright soft detailed absurdres shadow lineart
""".split()


def byte_symbols() -> dict[int, str]:
    """Printable stand-in for each of the 256 bytes, in the byte-level BPE order of GPT-2's and CLIP's vocab."""
    # Bytes that print as themselves keep their character; the rest (control chars, space, ...) are moved to
    # code points from 256 up, so every byte has a visible, whitespace-free symbol. Insertion order is the
    # vocab order: printable bytes first, then the moved ones.
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols = {b: chr(b) for b in printable}
    moved = [b for b in range(256) if b not in symbols]
    symbols.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return symbols


def train_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE in CLIP's format (Sennrich et al. 2016): returns (vocab, merges) for vocab.json/merges.txt."""
    byte_symbol = byte_symbols()
    alphabet = list(byte_symbol.values())
    # Each word is a tuple of byte symbols; the last one carries the end-of-word marker, as CLIP expects.
    segmented = []
    for word in sorted(set(words)):
        symbols = [byte_symbol[b] for b in word.lower().encode("utf-8")]
        segmented.append((*symbols[:-1], symbols[-1] + END_OF_WORD))
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for word in segmented for pair in pairwise(word))
        if not pairs:
            break
        # Most frequent pair; ties broken by the pair itself so the result never depends on hash order.
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        segmented = [_merge_pair(word, best) for word in segmented]
    tokens = alphabet + [s + END_OF_WORD for s in alphabet] + ["".join(pair) for pair in merges]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    return vocab, merges


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every occurrence of `pair` in `word` by the joined symbol."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_bpe_files(directory: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Write vocab.json and merges.txt (with the '#version' header CLIP's files have)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random-weight SDXL pipeline at toy widths to `out_dir`; same seed -> byte-identical weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(
            f"{out_dir}: exists and is not a directory; pass a directory path for the pipeline"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    vocab, merges = train_bpe(WORD_LIST)
    # Load the tokenizers through from_pretrained from the files written here, the path users take.
    write_bpe_files(out_dir / "tokenizer", vocab, merges)
    write_bpe_files(out_dir / "tokenizer_2", vocab, merges)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer", model_max_length=MAX_TOKENS)
    # SDXL's second tokenizer pads with "!" (id 0) rather than <|endoftext|>.
    tokenizer_2 = CLIPTokenizer.from_pretrained(
        out_dir / "tokenizer_2", model_max_length=MAX_TOKENS, pad_token="!"
    )

    token_ids = {
        "vocab_size": len(vocab),
        "max_position_embeddings": MAX_TOKENS,
        "bos_token_id": vocab[SPECIAL_TOKENS[0]],
        # Pooling reads the hidden state at the first EOS; the id must be the real one, not a legacy 2.
        "eos_token_id": vocab[SPECIAL_TOKENS[1]],
        "pad_token_id": vocab[SPECIAL_TOKENS[1]],
    }
    config_1 = CLIPTextConfig(
        hidden_size=TEXT_1_HIDDEN,
        intermediate_size=4 * TEXT_1_HIDDEN,
        num_hidden_layers=2,  # SDXL reads the penultimate layer, so at least two
        num_attention_heads=4,
        projection_dim=TEXT_1_HIDDEN,
        hidden_act="quick_gelu",  # CLIP ViT-L/14 (OpenAI)
        **token_ids,
    )
    config_2 = CLIPTextConfig(
        hidden_size=TEXT_2_HIDDEN,
        intermediate_size=4 * TEXT_2_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=TEXT_2_PROJECTION,
        hidden_act="gelu",  # OpenCLIP ViT-bigG/14
        **token_ids,
    )

    # Fork the RNG so building does not disturb the caller's torch random state; each model gets its own seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 10 + 0)
        text_encoder = CLIPTextModel(config_1)
        torch.manual_seed(seed * 10 + 1)
        text_encoder_2 = CLIPTextModelWithProjection(config_2)
        torch.manual_seed(seed * 10 + 2)
        unet = UNet2DConditionModel(
            sample_size=8,  # latent side; the pipeline's default image side is 8 * 8 = 64 px
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=(32, 48, 64),  # SDXL: (320, 640, 1280); two downsamples, so sides % 4 == 0
            layers_per_block=2,
            norm_num_groups=16,
            attention_head_dim=(2, 3, 4),  # number of heads, as in SDXL's config; 16 channels per head
            transformer_layers_per_block=(1, 1, 2),  # SDXL: (1, 2, 10)
            cross_attention_dim=CROSS_ATTENTION_DIM,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
            # pooled text embedding + 6 micro-conditioning numbers (original size, crop top-left, target size)
            projection_class_embeddings_input_dim=TEXT_2_PROJECTION + 6 * ADDITION_TIME_EMBED_DIM,
            flip_sin_to_cos=True,
            freq_shift=0,
        )
        torch.manual_seed(seed * 10 + 3)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 64, 64),  # SDXL: (128, 256, 512, 512); three downsamples = 8x
            layers_per_block=2,
            norm_num_groups=16,
            latent_channels=4,
            sample_size=64,
            scaling_factor=0.13025,  # SDXL's VAE
            force_upcast=True,  # SDXL's VAE overflows in fp16; the pipeline upcasts on decode
        )

    # v-prediction, zero terminal SNR, trailing spacing: the scheduler every model of ours ships with.
    save_pipeline(
        out_dir, unet, vae, (text_encoder, text_encoder_2), (tokenizer, tokenizer_2), scheduler_config()
    )
    return out_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sdxl_ztsnr.tiny",
        description="Write a tiny random-weight SDXL pipeline (diffusers format) for tests and smoke runs.",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write the pipeline to (created if missing)")
    parser.add_argument(
        "--seed", type=int, default=0, help="weight seed; the same seed gives identical files"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = build_tiny_sdxl(args.out_dir, seed=args.seed)
    print(f"wrote tiny SDXL pipeline to {path}")


if __name__ == "__main__":
    from sdxl_ztsnr.console import quiet_libraries

    with quiet_libraries():  # no "Writing model shards" bars from the libraries
        main()
