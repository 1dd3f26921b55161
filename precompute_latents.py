"""Precompute SDXL latents and text embeddings into a Hugging Face `datasets` cache.

    python precompute_latents.py --train_data_dir images/ --pretrained_model_name_or_path MODEL \
        --output_dir cache/
    python precompute_latents.py --data_config datasets.toml ...   # several sources, one cache (README: Datasets)
    accelerate launch --num_processes 8 precompute_latents.py ...   # shards inputs across ranks
    # WebDataset tars as img2dataset writes them, streamed (nothing is copied first), latents only:
    accelerate launch precompute_latents.py --dataset_name webdataset --streaming \
        --data_files 'shards/{00000..01199}.tar' --text_online --pretrained_model_name_or_path MODEL --output_dir cache/

Bucketed, sharded and resumable: rerun the same command after a crash (or kill) to finish the cache; on a
finished cache it changes nothing. Bad inputs are skipped and listed in OUTPUT_DIR/skipped.jsonl. Load the
result with `datasets.load_from_disk(OUTPUT_DIR)` or `sdxl_ztsnr.cache.load_cache(OUTPUT_DIR)`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile

from sdxl_ztsnr import options
from sdxl_ztsnr.precompute_run import DECODE_WORKERS
from sdxl_ztsnr.run_config import parse_with_config_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = options.new_parser(__doc__, raw_help=False)
    options.add_image_source_options(
        parser,
        "inputs",
        folder_help="folder of images + same-name .txt captions (recursive)",
        dataset_help="HF dataset: Hub name, local load_dataset path or save_to_disk dir",
        captions=True,
    )
    model = options.add_model_options(
        parser, vae_help="a separate VAE (e.g. an fp16-safe one)", revisions=False
    )
    model.add_argument("--vae_dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    model.add_argument(
        "--text_encoder_dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="auto: fp16 on GPU, fp32 on CPU",
    )
    model.add_argument(
        "--max_token_chunks", type=int, default=3, help="75-token chunks per prompt (3 = 225 tokens)"
    )
    model.add_argument(
        "--text_online",
        action="store_true",
        help="store no text embeddings, only latents and tags (the mode for large datasets: a row is ~131 KiB "
        "at 1024² instead of 441-1057 KiB with 1-3 text chunks); the trainer encodes captions each step "
        "(allows tag dropout)",
    )
    buckets = parser.add_argument_group("buckets")
    buckets.add_argument("--resolution", type=int, default=1024, help="maximum bucket area is resolution²")
    buckets.add_argument("--bucket_step", type=int, default=64)
    buckets.add_argument("--min_bucket_side", type=int, default=None, help="default resolution/2")
    buckets.add_argument("--max_bucket_side", type=int, default=None, help="default resolution·2")
    buckets.add_argument("--crop", choices=["center", "random"], default="center")
    buckets.add_argument("--random_flip", "--flip", action="store_true", help="also store a mirrored copy")
    buckets.add_argument("--seed", type=int, default=0, help="seeds random crops (per image, reproducible)")
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--overwrite", action="store_true", help="delete a cache made with other settings first")
    run.add_argument("--shard_size", type=int, default=512, help="inputs per shard (unit of work and resume)")
    run.add_argument(
        "--vae_batch_pixels",
        type=int,
        default=8 * 1024 * 1024,
        help="VAE batch = this many pixels (8·1024² = 8 images at 1024²); halved on out-of-memory",
    )
    run.add_argument("--num_workers", type=int, default=DECODE_WORKERS, help="image decoding processes")
    run.add_argument("--no_progress", action="store_true")
    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="publish the cache as a dataset repository")
    hub.add_argument("--hub_repo_id", "--hub_model_id", help="e.g. user/my-sdxl-cache")
    hub.add_argument("--hub_token")
    hub.add_argument("--hub_private", action="store_true")
    hub.add_argument("--hub_dry_run", action="store_true", help="stage and list the files, upload nothing")
    parser.add_argument(
        "--_debug_kill_at", help=argparse.SUPPRESS
    )  # EVENT:N, SIGKILL on the N-th EVENT (tests)
    return parse_with_config_file(parser, argv, lambda args: check_args(parser, args))


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that only make sense together."""
    if sum(map(bool, (args.train_data_dir, args.dataset_name, args.data_config))) != 1:
        parser.error("give exactly one of --train_data_dir (--data_dir), --dataset_name or --data_config")
    if (args.mask_dir or args.alpha_mask) and not args.train_data_dir:
        parser.error(
            "--mask_dir and --alpha_mask are for a --train_data_dir folder (masks of dataset rows are not read; "
            "with --data_config give mask_dir / alpha_mask per source)"
        )
    if (args.streaming or args.data_files) and not args.dataset_name:
        parser.error("--streaming and --data_files read a --dataset_name (e.g. --dataset_name webdataset)")
    if args.data_files and not args.streaming:
        parser.error("--data_files needs --streaming (large file sets are read as a stream, never copied)")
    if args.push_to_hub and not args.hub_repo_id:
        parser.error("--push_to_hub needs --hub_repo_id (e.g. user/my-sdxl-cache)")


def kill_hook(spec: str | None):
    """Hook that SIGKILLs this process at the N-th occurrence of EVENT (spec "EVENT:N"): crash tests."""
    if not spec:
        return None
    event, count = spec.rsplit(":", 1)
    seen = {"n": 0}

    def hook(name: str, shard: int) -> None:
        if name == event:
            seen["n"] += 1
            if seen["n"] >= int(count):
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main(args: argparse.Namespace) -> dict:
    from sdxl_ztsnr import cache, hub
    from sdxl_ztsnr.base_model import resolve_base
    from sdxl_ztsnr.data_config import load_data_config
    from sdxl_ztsnr.images import DEFAULT_MAX_PIXELS
    from sdxl_ztsnr.precompute import DatasetInputs, FolderInputs
    from sdxl_ztsnr.precompute_run import format_summary, process_state, run_precompute
    from sdxl_ztsnr.streaming_inputs import StreamingInputs

    # Inputs: one source, or the sources of a data config (one cache each under OUTPUT_DIR/sources, merged)
    if args.data_config:
        inputs = load_data_config(args.data_config)
        for note in inputs.notes:
            print(note, flush=True)
    elif args.train_data_dir:
        inputs = FolderInputs(args.train_data_dir, args.mask_dir, args.alpha_mask)
    elif args.streaming:
        inputs = StreamingInputs(
            args.dataset_name, args.data_files, args.image_column, args.caption_column, args.dataset_split
        )
    else:
        inputs = DatasetInputs(args.dataset_name, args.image_column, args.caption_column, args.dataset_split)
    # Models: a single-file base becomes a cached diffusers directory (one process per machine makes it)
    base = resolve_base(
        args.pretrained_model_name_or_path,
        args.config,
        vae_path=args.pretrained_vae_model_name_or_path,
        first=process_state().local_main_process_first,
    )
    # Precompute (every rank), merge (rank 0)
    try:
        result = run_precompute(
            inputs,
            args.output_dir,
            base.path,
            base.vae_path,
            vae_dtype=args.vae_dtype,
            text_encoder_dtype=args.text_encoder_dtype,
            text_online=args.text_online,
            hook=kill_hook(args._debug_kill_at),
            resolution=args.resolution,
            bucket_step=args.bucket_step,
            min_bucket_side=args.min_bucket_side,
            max_bucket_side=args.max_bucket_side,
            crop=args.crop,
            flip=args.random_flip,
            seed=args.seed,
            max_token_chunks=args.max_token_chunks,
            min_image_side=args.min_image_side,
            max_image_pixels=args.max_image_pixels or DEFAULT_MAX_PIXELS,
            allow_empty_captions=args.allow_empty_captions,
            shard_size=args.shard_size,
            vae_batch_pixels=args.vae_batch_pixels,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except cache.NoUsableInputsError as error:
        sys.exit(f"error: {error}")
    print(format_summary(result, args.output_dir), flush=True)
    # Publish (rank 0)
    if args.push_to_hub and process_state().is_main_process:
        with tempfile.TemporaryDirectory(dir=args.output_dir, prefix=".hub-staging-") as staging:
            cache.stage_for_hub(args.output_dir, staging)
            files = hub.push_to_hub(
                staging,
                args.hub_repo_id,
                repo_type="dataset",
                token=args.hub_token,
                private=args.hub_private,
                commit_message="Upload SDXL latent cache",
                dry_run=args.hub_dry_run,
            )
        verb = "would upload" if args.hub_dry_run else "uploaded"
        print(f"{verb} to dataset repo {args.hub_repo_id}: " + ", ".join(files), flush=True)
        result["hub_files"] = files
    return result


if __name__ == "__main__":
    from sdxl_ztsnr.console import run_script

    run_script(main, parse_args)
