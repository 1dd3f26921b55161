"""The command-line options of every script, defined once and grouped by concern, and the run config file.

Each ``add_*`` function adds one group to a parser; a script's ``parse_args`` is the list of groups it takes
plus its own flags. The parser built that way is also the table the run config file is read against
(``--config_file run.toml`` or a run's ``training_config.json``): its keys are the flag names, in any of their
spellings, and the command line overrides the file. Flag names follow diffusers' training examples, with the
spellings kohya sd-scripts users type as aliases.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from sdxl_ztsnr.run_config import CONFIG_FILE_FLAG


def new_parser(
    description: str, raw_help: bool = True, prog: str | None = None, config_file: bool = True
) -> argparse.ArgumentParser:
    """An ArgumentParser as every script makes it, with ``--config_file`` first."""
    formatter = argparse.RawTextHelpFormatter if raw_help else argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=formatter)
    if config_file:
        parser.add_argument(
            CONFIG_FILE_FLAG,
            default=None,
            help="a TOML file of options (keys = flag names, [sections] ignored, as kohya's), or a run's "
            "training_config.json; flags on the command line override it",
        )
    return parser


# --- groups -------------------------------------------------------------------------------------------------


def add_model_options(
    parser: argparse.ArgumentParser,
    model_help: str | None = None,
    vae_help: str | None = None,
    required: bool = True,
    revisions: bool = True,
    variant_help: str | None = None,
) -> argparse._ArgumentGroup:
    """The SDXL base and an optional separate VAE."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        "--model_path",
        required=required,
        default=None,
        help=(model_help + "; or" if model_help else "an SDXL base:") + " a single .safetensors file",
    )
    model.add_argument("--pretrained_vae_model_name_or_path", default=None, help=vae_help)
    model.add_argument(
        "--config",
        default=None,
        help="with a single-file base (.safetensors, original SDXL layout): a diffusers SDXL directory holding "
        "the configs and tokenizers (default: stabilityai/stable-diffusion-xl-base-1.0's, when online)",
    )
    if revisions:
        model.add_argument("--revision", default=None)
        model.add_argument("--variant", default=None, help=variant_help)
    return model


def add_image_source_options(
    parser: argparse.ArgumentParser,
    title: str,
    folder_help: str,
    dataset_help: str,
    captions: bool,
) -> argparse._ArgumentGroup:
    """Where images (and their captions) come from: a folder or a Hugging Face dataset."""
    data = parser.add_argument_group(title)
    add_data_config_option(data)
    data.add_argument("--train_data_dir", "--data_dir", default=None, help=folder_help)
    data.add_argument("--dataset_name", default=None, help=dataset_help)
    data.add_argument("--dataset_split", default="train")
    if captions:
        data.add_argument(
            "--streaming",
            action="store_true",
            help="read --dataset_name as a stream (datasets IterableDataset): for datasets too large to copy "
            "first",
        )
        data.add_argument(
            "--data_files",
            nargs="+",
            help="with --streaming: files or patterns of the dataset, e.g. 'shards/{00000..00099}.tar' "
            "(--dataset_name webdataset; brace ranges and globs are expanded)",
        )
    data.add_argument("--image_column", default="image")
    if captions:
        data.add_argument("--caption_column", default="text")
        data.add_argument(
            "--allow_empty_captions", action="store_true", help="keep images whose caption is empty"
        )
        data.add_argument(
            "--min_image_side", type=int, default=0, help="skip images with a shorter side (px); 0 upscales"
        )
        add_mask_source_options(data, "")
    data.add_argument("--max_image_pixels", type=int, default=None, help="decompression-bomb limit (w·h)")
    return data


def add_data_config_option(group: argparse._ArgumentGroup) -> None:
    """--data_config: several sources (folders, datasets, streams) with their own repeats, captions and buckets."""
    group.add_argument(
        "--data_config",
        "--dataset_config",
        default=None,
        help="a TOML of [[datasets]] tables, one source each (kohya's [[datasets.subsets]] and SimpleTuner's "
        "backend JSON are read too): instead of --train_data_dir / --dataset_name; see the README's Datasets",
    )


def add_mask_source_options(group: argparse._ArgumentGroup, what: str) -> None:
    """Where a folder's loss masks come from (masks.py); name.mask.png beside an image needs no flag."""
    group.add_argument(
        "--mask_dir",
        "--conditioning_data_dir",
        default=None,
        help=f"{what}folder of loss masks named as the images (white trains, black is ignored); default: "
        "name.mask.png beside name.png",
    )
    group.add_argument(
        "--alpha_mask",
        action="store_true",
        help=f"{what}an image's alpha channel is its loss mask (where it has no mask file)",
    )


def add_optimizer_options(
    parser: argparse.ArgumentParser,
    lr_scheduler: str,
    lr_scheduler_help: str,
    weight_decay: float,
    learning_rate_aliases: Sequence[str] = (),
    trainer: bool = False,
) -> argparse._ArgumentGroup:
    """Batch, length of the run, learning rate and its schedule, AdamW's settings, clipping."""
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", "--batch_size", type=int, default=4, help="per device")
    optim.add_argument("--num_train_epochs", "--num_epochs", type=int, default=1)
    optim.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--learning_rate", *learning_rate_aliases, type=float, default=1e-5)
    if trainer:
        optim.add_argument(
            "--scale_lr", action="store_true", help="multiply lr by batch × accumulation × processes"
        )
    optim.add_argument("--lr_scheduler", default=lr_scheduler, help=lr_scheduler_help)
    optim.add_argument("--lr_warmup_steps", type=int, default=0)
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=weight_decay)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    if trainer:
        optim.add_argument(
            "--optimizer",
            "--optimizer_type",
            default="adamw",
            help="adamw (fused torch kernel), adamw8bit (bitsandbytes), adafactor (factored second moments), "
            "prodigy (prodigyopt; --learning_rate 1.0), or any torch.optim / bitsandbytes class by name in any "
            "case (SGD, RAdam, Lion8bit, PagedAdamW8bit) or path (torch.optim.SGD, bitsandbytes.optim.Lion8bit). "
            "The --adam_* flags apply to adamw and adamw8bit (weight decay also to adafactor); other optimizers "
            "take --learning_rate and --optimizer_args",
        )
        optim.add_argument(
            "--optimizer_args",
            nargs="*",
            default=[],
            metavar="KEY=VALUE",
            help="keyword arguments of the optimizer as Python literals (kohya's), e.g. weight_decay=0.01 "
            "betas=0.9,0.99 decouple=True d_coef=2",
        )
        optim.add_argument("--use_8bit_adam", action="store_true", help="alias of --optimizer adamw8bit")
        optim.add_argument(
            "--max_grad_norm", type=float, default=1.0, help="global-norm clipping; 0 or less: no clipping"
        )
        optim.add_argument(
            "--max_bad_steps",
            type=int,
            default=20,
            help="non-finite steps in a row (checked at logging steps) that stop the run",
        )
    else:
        optim.add_argument("--use_8bit_adam", action="store_true")
        optim.add_argument("--max_grad_norm", type=float, default=1.0, help="0 or less: no clipping")
    return optim


def add_ema_options(group: argparse._ArgumentGroup, use_help: str, full: bool) -> None:
    """An exponential moving average of the trained weights (diffusers' EMAModel)."""
    group.add_argument("--use_ema", action="store_true", help=use_help)
    group.add_argument(
        "--ema_decay", type=float, default=0.9999, help="decay after the warm-up" if full else None
    )
    if full:
        group.add_argument(
            "--ema_warmup",
            choices=["power", "tensorflow", "none"],
            default="power",
            help="decay warm-up: power 1-(1+s/inv_gamma)^-power, tensorflow s/(s+9), none",
        )
        group.add_argument("--ema_power", type=float, default=2 / 3, help="3/4 for runs under ~100k steps")
        group.add_argument("--ema_inv_gamma", type=float, default=1.0)
    group.add_argument(
        "--ema_update_every", type=int, default=1, help="update the EMA every N steps" if full else None
    )
    group.add_argument(
        "--ema_device",
        choices=["accelerator", "cpu"],
        default="accelerator",
        help="cpu keeps the fp32 average in host memory (saves accelerator memory)" if full else None,
    )


def add_memory_options(
    parser: argparse.ArgumentParser,
    mixed_precision_choices: Sequence[str],
    unet: bool,
    attention_backends: Sequence[str] = (),
) -> argparse._ArgumentGroup:
    """Mixed precision, activation checkpointing, compilation; for the UNet also weights and attention."""
    speed = parser.add_argument_group("speed and memory")
    speed.add_argument("--mixed_precision", choices=list(mixed_precision_choices), default=None)
    speed.add_argument("--enable_amp", action="store_true", help="alias of --mixed_precision bf16")
    speed.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute activations in backward (less memory)" if unet else None,
    )
    if unet:
        speed.add_argument(
            "--fused_backward_pass",
            action="store_true",
            help="step each parameter inside backward: whole-model gradients never exist (1 process, no "
            "accumulation)",
        )
        speed.add_argument(
            "--weights_dtype",
            choices=["fp32", "bf16"],
            default="fp32",
            help="bf16: no fp32 master weights (half the weight memory); updates use --bf16_update",
        )
        speed.add_argument(
            "--bf16_update",
            choices=["stochastic", "kahan"],
            default="stochastic",
            help="how bf16 weights take an fp32 update: stochastic rounding or a Kahan compensation buffer",
        )
        speed.add_argument(
            "--attention_backend",
            choices=list(attention_backends),
            default="auto",
            help="SDPA kernel (cudnn was 17%% faster than auto on an H200) or xformers",
        )
    speed.add_argument("--allow_tf32", action="store_true")
    if unet:
        speed.add_argument(
            "--enable_xformers",
            "--enable_xformers_memory_efficient_attention",
            action="store_true",
            help="alias of --attention_backend xformers (PyTorch SDPA, with one warning, where xformers is "
            "missing)",
        )
        speed.add_argument("--enable_compile", action="store_true", help="torch.compile the UNet")
        speed.add_argument(
            "--compile_mode", default="default", help="torch.compile mode (default, max-autotune, ...)"
        )
    else:
        speed.add_argument(
            "--enable_compile", action="store_true", help="torch.compile (eager where it cannot)"
        )
        speed.add_argument("--compile_mode", default="default")
    return speed


def add_run_options(
    parser: argparse.ArgumentParser, output_dir: str, resume_help: str, overwrite_help: str | None
) -> argparse._ArgumentGroup:
    """Where the run lives, its seed, its checkpoints and how a requeue resumes it."""
    run = parser.add_argument_group("run: output, seed, checkpoints and resume")
    run.add_argument("--output_dir", default=output_dir)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--checkpointing_steps", type=int, default=500)
    run.add_argument("--checkpoints_total_limit", type=int, default=None)
    run.add_argument("--resume_from_checkpoint", default=None, help=resume_help)
    run.add_argument("--overwrite_output_dir", action="store_true", help=overwrite_help)
    return run


def add_logging_options(
    parser: argparse.ArgumentParser, wandb_project: str, logging_steps_help: str | None = None
) -> argparse._ArgumentGroup:
    """Trackers (tensorboard, wandb) and how often the loss is logged."""
    logs = parser.add_argument_group("logging")
    logs.add_argument("--logging_steps", type=int, default=10, help=logging_steps_help)
    logs.add_argument("--logging_dir", default="logs")
    logs.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    logs.add_argument("--use_wandb", action="store_true", help="alias of --report_to wandb")
    logs.add_argument("--wandb_project", default=wandb_project)
    logs.add_argument("--wandb_run_name", default=None)
    return logs


def add_output_options(
    parser: argparse.ArgumentParser, single_file_help: str | None, token_help: str | None
) -> argparse._ArgumentGroup:
    """What a training run writes besides the diffusers directory, and publishing it."""
    out = parser.add_argument_group("outputs and the Hub")
    out.add_argument("--no_single_file", action="store_true", help=single_file_help)
    out.add_argument("--push_to_hub", action="store_true")
    out.add_argument("--hub_model_id", default=None)
    out.add_argument("--hub_token", default=None, help=token_help)
    return out


def add_sampling_options(
    parser: argparse.ArgumentParser,
    steps: int,
    steps_help: str | None,
    prompt: Mapping[str, object],
    samplers: Sequence[str],
    sigma_max: float,
    model_help: str,
    config_help: str,
    rescale_help: str | None = None,
    sigma_help: str | None = None,
) -> None:
    """The model to sample and the settings every sampling command shares (the sampler, upscale.py)."""
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument("--prompt", **prompt)
    parser.add_argument("--negative_prompt", default="")
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--guidance_rescale", type=float, default=0.7, help=rescale_help)
    parser.add_argument("--sampler", choices=list(samplers), default="euler")
    parser.add_argument(
        "--seed", type=int, default=0, help="-1 picks one at random (it is written to the image)"
    )
    parser.add_argument("--sigma_max", type=float, default=sigma_max, help=sigma_help)
    parser.add_argument("--no_emphasis", action="store_true", help="read brackets in prompts as plain text")


def add_device_options(parser: argparse.ArgumentParser, cuda: bool) -> None:
    """Where a sampling command runs and in which precision."""
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument(
        "--dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="auto: fp16 on CUDA, else fp32",
    )


# --- after parsing --------------------------------------------------------------------------------------------


def resolve_aliases(args: argparse.Namespace) -> argparse.Namespace:
    """The seed's alias flags (--enable_amp, --use_wandb, --use_8bit_adam, --enable_xformers) into the flags
    they stand for; --mixed_precision defaults to "no"."""
    if getattr(args, "enable_amp", False) and args.mixed_precision is None:
        args.mixed_precision = "bf16"
    if hasattr(args, "mixed_precision"):
        args.mixed_precision = args.mixed_precision or "no"
    if getattr(args, "use_wandb", False):
        args.report_to = "wandb"
    if getattr(args, "use_8bit_adam", False) and hasattr(args, "optimizer"):
        args.optimizer = "adamw8bit"
    if getattr(args, "enable_xformers", False):
        args.attention_backend = "xformers"
    return args
