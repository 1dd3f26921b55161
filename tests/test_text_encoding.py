"""Text encoding: SDXL's two CLIP encoders with 75-token chunk concatenation, checked against diffusers'
own StableDiffusionXLPipeline.encode_prompt for prompts that fit one chunk."""

import pytest
import torch

from sdxl_ztsnr.text_encoding import (
    CHUNK_LENGTH,
    chunk_token_ids,
    config_hash,
    count_chunks,
    empty_chunk_embeds,
    encode_prompts,
    load_text_encoders,
    module_fingerprint,
    pad_prompt_embeds,
)

SHORT = "1girl, solo, anime style, outdoor, high quality"
# ~2.3 chunks of tokens with the tiny tokenizer (every listed word is one token, commas one more)
LONG = ", ".join(["cat", "dog", "flower", "tree", "sky", "sea"] * 13)


@pytest.fixture(scope="module")
def encoders(tiny_sdxl):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the toy encoders are slower with 2 threads on a busy 2-core machine
    yield load_text_encoders(tiny_sdxl)
    torch.set_num_threads(previous)


def test_one_chunk_equals_diffusers_encode_prompt(tiny_sdxl, encoders):
    from diffusers import StableDiffusionXLPipeline

    tokenizers, text_encoders = encoders
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    prompts = [SHORT, "cat", ""]
    reference, _, reference_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    embeds, pooled = encode_prompts(prompts, tokenizers, text_encoders)
    hidden = text_encoders[0].config.hidden_size + text_encoders[1].config.hidden_size
    assert embeds.shape == (3, CHUNK_LENGTH, hidden)
    assert pooled.shape == (3, text_encoders[1].config.projection_dim)
    torch.testing.assert_close(embeds, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, reference_pooled, rtol=0, atol=1e-5)


def test_chunks_wrap_each_75_tokens_in_bos_eos(encoders):
    tokenizers, _ = encoders
    tokenizer = tokenizers[1]
    plain = tokenizer(LONG, add_special_tokens=False)["input_ids"]
    assert 150 < len(plain) <= 225, "LONG must need exactly 3 chunks for this test"
    assert count_chunks([LONG, SHORT, ""], tokenizers) == [3, 1, 1]
    assert count_chunks([LONG], tokenizers, max_chunks=2) == [2]
    ids = chunk_token_ids([LONG], tokenizer, num_chunks=3)[0]  # (3, 77)
    assert ids.shape == (3, CHUNK_LENGTH)
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    # Content tokens, chunk by chunk, reproduce the un-chunked tokenization.
    content = []
    for c in range(3):
        chunk = plain[c * 75 : (c + 1) * 75]
        assert ids[c, 1 : 1 + len(chunk)].tolist() == chunk
        assert ids[c, 1 + len(chunk)] == tokenizer.eos_token_id
        assert (ids[c, 2 + len(chunk) :] == tokenizer.pad_token_id).all()
        content += chunk
    assert content == plain


def test_long_prompt_concatenates_chunks_and_pools_the_first(encoders):
    tokenizers, text_encoders = encoders
    embeds, pooled = encode_prompts([LONG], tokenizers, text_encoders, max_chunks=3)
    assert embeds.shape[1] == 3 * CHUNK_LENGTH
    # Truncating to one chunk keeps the first chunk's embedding and the pooled output unchanged...
    first, first_pooled = encode_prompts([LONG], tokenizers, text_encoders, num_chunks=1)
    torch.testing.assert_close(embeds[:, :CHUNK_LENGTH], first, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, first_pooled, rtol=0, atol=1e-6)
    # ...and the later chunks carry the rest of the prompt: they differ from padding.
    pad = empty_chunk_embeds(tokenizers, text_encoders)
    assert (embeds[0, CHUNK_LENGTH : 2 * CHUNK_LENGTH] - pad).abs().max() > 1e-3
    # max_chunks caps the length (truncation).
    capped, _ = encode_prompts([LONG], tokenizers, text_encoders, max_chunks=2)
    assert capped.shape[1] == 2 * CHUNK_LENGTH


def test_padding_with_empty_chunk_equals_encoding_with_more_chunks(encoders):
    tokenizers, text_encoders = encoders
    pad = empty_chunk_embeds(tokenizers, text_encoders)
    short, _ = encode_prompts([SHORT], tokenizers, text_encoders)
    long, _ = encode_prompts([LONG], tokenizers, text_encoders)
    batch, _ = encode_prompts([SHORT, LONG], tokenizers, text_encoders)  # both encoded at 3 chunks
    padded = pad_prompt_embeds([short[0], long[0]], pad)
    assert padded.shape == batch.shape == (2, 3 * CHUNK_LENGTH, pad.shape[-1])
    torch.testing.assert_close(padded, batch, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="77"):
        pad_prompt_embeds([short[0, :50]], pad)


def test_fingerprint_and_config_hash(encoders):
    _, text_encoders = encoders
    encoder = text_encoders[0]
    before = module_fingerprint(encoder)
    assert before == encoder.weights_fingerprint
    weight = list(encoder.parameters())[-1]  # element 0 of every tensor is sampled
    with torch.no_grad():
        weight[0] += 0.5
        changed = module_fingerprint(encoder)
        weight[0] -= 0.5
    assert changed != before
    config = encoder.config.to_dict()
    assert config_hash(config) == config_hash(
        {**config, "_name_or_path": "elsewhere", "transformers_version": "x"}
    )
    assert config_hash(config) != config_hash({**config, "hidden_size": config["hidden_size"] + 1})
