"""What both converters share: the output options, the output folder, the run, and the upload after it."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import HfApi, split_torch_state_dict_into_shards

from conversion.openai_checkpoint import ConversionError
from conversion.verify import Check
from image_gpt_hf import ImageGPTPreTrainedModel
from image_gpt_hf.generation import openai_generation_config
from image_gpt_hf.image_processing_imagegpt import ImageGPTImageProcessor
from image_gpt_hf.model_card import write_model_card
from image_gpt_hf.safe_io import OutputPathError, check_output_path, staged_dir

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_options(output_dir, inputs: list, overwrite: bool, dtype: str, max_shard_size: str) -> None:
    """Refuse, before anything is read, an output path that must not be written and a `--dtype` or
    `--max_shard_size` that saving would reject only after the conversion."""
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    try:
        split_torch_state_dict_into_shards({}, max_shard_size=max_shard_size)  # parses the size as saving will
    except ValueError as err:
        raise ConversionError(
            f"--max_shard_size {max_shard_size!r} is not a size such as 5GB or 500MB: {err}"
        ) from None
    check_output_path(output_dir, inputs=inputs, overwrite=overwrite)


def write_checkpoint(
    output_dir: str | os.PathLike,
    inputs: list,
    model: ImageGPTPreTrainedModel,
    palette: np.ndarray,
    options: dict,
    check: Callable[[Path], list[Check]] | None,
    against: str,
    facts: dict[str, object],
) -> list[Check]:
    """Write the converted `model` with its `palette` to `output_dir`: config.json (+ auto_map and source files),
    safetensors in `options["dtype"]` (the model is cast in place, then its weights are freed), preprocessor_config,
    generation_config and a model card stating `facts` and the checks `check(folder)` made against `against`.

    The folder is assembled in a hidden sibling and renamed into place only when every check passed
    (`image_gpt_hf.safe_io.staged_dir`); a failed check raises ConversionError and leaves nothing behind.
    """
    with staged_dir(output_dir, overwrite=options["overwrite"], inputs=inputs) as tmp:
        config = model.to(DTYPES[options["dtype"]]).config
        model.save_pretrained(tmp, max_shard_size=options["max_shard_size"])
        processor = ImageGPTImageProcessor(clusters=palette, size={"height": config.n_px, "width": config.n_px})
        processor.save_pretrained(tmp)
        if config.objective == "ar" and hasattr(model, "lm_head"):
            # Written explicitly: a classification model with an LM head (AR + clf) would not write one, yet it
            # generates once loaded with AutoModelForCausalLM.
            openai_generation_config(config).save_pretrained(tmp)
        # The check loads the folder back: free the weights first. The card reads only class, size and dtype.
        model.to("meta")
        checks = check(tmp) if check else []
        for c in checks:
            logger.info("%s", c)
        failed = [c for c in checks if not c.ok]
        if failed:
            raise ConversionError(
                f"The converted model does not match {against}: {'; '.join(map(str, failed))}. Nothing was written."
            )
        record = "This conversion was not verified (`--skip_verification`)."
        if checks:
            figures = "; ".join(f"{c.name} {c.max_abs_diff:.1e}" for c in checks)
            record = (
                f"Verified at conversion, on random tokens, against {against}. Max abs differences: {figures} "
                f"(tolerance {max(c.tolerance for c in checks):.0e})."
            )
        facts = {**facts, "notes": [*facts.get("notes", []), record]}
        write_model_card(tmp, model, processor=processor, facts=facts)
    logger.info("Wrote %s", output_dir)
    return checks


def run_converter(
    parser: argparse.ArgumentParser, convert: Callable[..., object], argv: Sequence[str] | None, checked_against: str
) -> int:
    """Parse `argv` with `parser` (which declares the converter's inputs, named as `convert`'s arguments) plus the
    output options added here, run `convert`, then upload with `--push_to_hub`. Errors are logged, not raised.

    `checked_against` names what the converter compares its output with, for `--skip_verification`'s help.
    Returns the exit status.
    """
    parser.add_argument("--output_dir", required=True, help="folder to write the converted checkpoint to")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors file, e.g. 2GB or 500MB")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --output_dir (all of its content)"
    )
    parser.add_argument(
        "--skip_verification", action="store_true", help=f"skip the check against {checked_against} before writing"
    )
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="upload the folder to this Hub model repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    args = vars(parser.parse_args(argv))
    repo_id, private = args.pop("push_to_hub"), args.pop("private")
    args["verify"] = not args.pop("skip_verification")
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)
    try:
        convert(**args, repo_id=repo_id)  # the repository only names itself in the model card's usage snippet
    except (ConversionError, OutputPathError) as err:
        logger.error("%s", err)
        return 1
    except OSError as err:  # the disk is full, a folder is not writable, ...: nothing was left behind
        logger.error("Writing %s failed: %s", args["output_dir"], err)
        return 1
    return push_after_conversion(args["output_dir"], repo_id, private=private) if repo_id else 0


def push_after_conversion(folder: str | os.PathLike, repo_id: str, private: bool = False) -> int:
    """Upload a finished output folder to the Hub (credentials from `hf auth login` or HF_TOKEN). A failure is
    reported, not raised: the folder on disk is complete and can be uploaded later. Returns the exit status."""
    try:
        api = HfApi()
        repo = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=os.fspath(folder),
            repo_type="model",
            commit_message="Upload converted iGPT checkpoint",
        )
    except Exception as err:  # network, authentication, permissions: huggingface_hub raises many kinds
        logger.error(
            "Upload to %s failed: %s. The folder %s is complete; retry with `hf upload %s %s`.",
            repo_id,
            err,
            folder,
            repo_id,
            folder,
        )
        return 1
    logger.info("Uploaded to https://huggingface.co/%s", repo.repo_id)
    return 0
