"""The whole method end to end, offline, on scikit-learn's bundled handwritten digits, in minutes on two CPU cores
(6 min 22 s on an idle 2-vCPU machine): pretrain a tiny Image GPT on pixels, complete held-out digits from their top
half (the grids also upscaled: nearest-neighbour by default, or any image super-resolution checkpoint given with
`--upscale_model`), probe every layer linearly (pretrained vs random init vs raw pixels), fine-tune it as a
classifier, and pretrain a class-conditional model beside it: a grid with one row per digit, and how often the
fine-tuned classifier recognises the requested digit in its samples at several classifier-free guidance scales.

    make demo                      # or: python examples/demo.py --output_dir demo_output

Each stage is one of the example scripts, run as a user would run it; the command lines are printed, so any stage
can be re-run or scaled up (more steps, `--dataset_name uoft-cs/cifar10 --n_px 32`, `accelerate launch` on GPUs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence

import PIL.Image
import torch

from image_gpt_hf.generation import upscale_images
from image_gpt_hf.safe_io import atomic_file, check_output_path

EXAMPLES = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Image GPT end to end on the bundled digits: pretrain, sample, probe, fine-tune."
    )
    parser.add_argument("--output_dir", type=str, default="demo_output", help="Where every artifact goes.")
    parser.add_argument("--overwrite", action="store_true", help="Replace the artifacts of an earlier run.")
    parser.add_argument("--n_px", type=int, default=8, help="Input resolution (the digits are 8x8 scans).")
    parser.add_argument("--model_size", type=str, default="tiny", help="Model preset.")
    parser.add_argument(
        "--config_overrides",
        type=str,
        default=None,
        help="Config overrides for the pretrained model (as pretrain.py).",
    )
    parser.add_argument("--pretrain_steps", type=int, default=320, help="Pretraining steps (batches of 64).")
    parser.add_argument("--finetune_steps", type=int, default=200, help="Fine-tuning steps (batches of 64).")
    parser.add_argument("--num_images", type=int, default=8, help="Held-out digits to complete.")
    parser.add_argument("--num_completions", type=int, default=4, help="Completions per held-out digit.")
    parser.add_argument("--num_samples", type=int, default=16, help="Unconditional samples.")
    parser.add_argument("--samples_per_class", type=int, default=20, help="Class-conditional samples per digit.")
    parser.add_argument(
        "--guidance_scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0], help="Guidance scales measured."
    )
    parser.add_argument(
        "--upscale_model",
        type=str,
        default=None,
        help="How sample.py enlarges the samples and completions for their _upscaled.png grids: an integer factor "
        "(nearest-neighbour) or an image super-resolution checkpoint (a folder or Hub id, e.g. a Swin2SR model). "
        "Default: the nearest-neighbour factor that makes each image 128 pixels wide.",
    )
    parser.add_argument(
        "--num_processes",
        type=int,
        default=None,
        help="Processes for pretraining, probing and fine-tuning (`accelerate launch`, data parallel over CPU cores). "
        "Default: 2 on a machine with 2+ cores and no GPU, else 1.",
    )
    parser.add_argument("--seed", type=int, default=42, help="Seed of every stage.")
    args = parser.parse_args(argv)
    if args.num_processes is None:
        args.num_processes = 1 if torch.accelerator.is_available() else min(2, os.cpu_count() or 1)
    if args.num_processes < 1 or 64 % args.num_processes:
        raise ValueError(
            f"--num_processes must be at least 1 and divide the batch of 64 images, got {args.num_processes}."
        )
    if args.upscale_model is None:
        args.upscale_model = str(max(1, math.ceil(128 / args.n_px)))
    # The sampling stage's --upscale_model, tried on one image here, so that a bad value fails before pretraining.
    factor = int(args.upscale_model) if re.fullmatch(r"[+-]?[0-9]+", args.upscale_model) else None
    if factor is not None and factor < 1:
        raise ValueError(f"--upscale_model as a factor must be at least 1, got {args.upscale_model}.")
    try:
        upscale_images([PIL.Image.new("RGB", (args.n_px, args.n_px))], factor or args.upscale_model)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--upscale_model {args.upscale_model!r} is neither an integer factor nor an image super-resolution "
            f"checkpoint that loads: {error}"
        ) from error
    args.upscale_checkpoint = None if factor else args.upscale_model  # an input: never written into
    return args


def run_stage(name: str, script: str, arguments: list[str], log_dir: str, num_processes: int = 1, log=None) -> float:
    """Runs one example script as a user would (`python examples/<script> ...`, or `accelerate launch` on several
    CPU processes); returns its wall time."""
    script_path = os.path.join(EXAMPLES, script)
    if num_processes > 1:
        config = os.path.join(EXAMPLES, "accelerate_configs", "multi_cpu.yaml")
        launcher = ["--config_file", config, "--num_processes", str(num_processes)]
        command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, script_path, *arguments]
        shown = ["accelerate launch", "--config_file", os.path.relpath(config), "--num_processes", str(num_processes)]
    else:
        command, shown = [sys.executable, script_path, *arguments], ["python"]
    shown = " ".join([*shown, os.path.relpath(script_path), *arguments])
    print(f"\n=== {name} ===\n$ {shown}\n", flush=True)
    log_path = os.path.join(log_dir, f"{log or os.path.splitext(script)[0]}.log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        # The script's own logs and progress bars go to the terminal and to the stage's log file.
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        returncode = process.wait()
    seconds = time.perf_counter() - start
    if returncode != 0:
        raise SystemExit(f"{name} failed (exit code {returncode}); its log is {log_path}")
    print(f"--- {name}: {seconds:.0f} s (log: {log_path})", flush=True)
    return seconds


@torch.no_grad()
def recognise_classes(paths: dict, args: argparse.Namespace) -> list[tuple[str, str, float]]:
    """How often the fine-tuned classifier recognises the requested digit in the class-conditional model's samples,
    at each guidance scale, and in its unconditional samples (the same labels asked for, none given: chance). Writes
    classes.png, one row per digit (at the best scale)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from image_gpt_hf import ImageGPTForCausalImageModeling, ImageGPTImageProcessor
    from image_gpt_hf.generation import sample

    model = ImageGPTForCausalImageModeling.from_pretrained(paths["conditional"]).eval()
    processor = ImageGPTImageProcessor.from_pretrained(paths["conditional"])
    classifier = AutoModelForImageClassification.from_pretrained(paths["finetuned"]).eval()
    classifier_processor = AutoImageProcessor.from_pretrained(paths["finetuned"])
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    requested = [name for name in names for _ in range(args.samples_per_class)]
    rows, best = [], (-1.0, None)
    for scale in [None, *args.guidance_scales]:
        classes = {} if scale is None else {"class_labels": requested, "guidance_scale": scale}
        images = sample(model, len(requested), processor=processor, seed=args.seed, progress=False, **classes)
        logits = classifier(**classifier_processor(images, return_tensors="pt")).logits
        found = [classifier.config.id2label[int(i)] for i in logits.argmax(-1)]
        share = sum(a == b for a, b in zip(found, requested)) / len(requested)
        rows.append(("unconditional", "-", share) if scale is None else ("class-conditional", f"{scale:g}", share))
        if scale is not None and share > best[0]:
            best = (share, images)
    per_row = min(8, args.samples_per_class)
    grid = [best[1][i * args.samples_per_class : i * args.samples_per_class + per_row] for i in range(len(names))]
    side = max(1, math.ceil(128 / args.n_px)) * args.n_px // 2
    canvas = PIL.Image.new("RGB", (per_row * (side + 2), len(names) * (side + 2)), "white")
    for r, row in enumerate(grid):
        for c, image in enumerate(row):
            canvas.paste(image.resize((side, side), PIL.Image.NEAREST), (c * (side + 2), r * (side + 2)))
    with atomic_file(os.path.join(paths["conditional"], "classes.png"), overwrite=True, arg="the grid") as tmp:
        canvas.save(tmp, format="PNG")
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    # An earlier run's artifacts stay unless --overwrite; a super-resolution checkpoint is an input, never written to.
    check_output_path(args.output_dir, inputs=[args.upscale_checkpoint], overwrite=args.overwrite)
    out = os.path.abspath(args.output_dir)
    paths = {
        "pretrained": os.path.join(out, "pretrained"),
        "samples": os.path.join(out, "samples"),
        "probe": os.path.join(out, "probe"),
        "finetuned": os.path.join(out, "finetuned"),
        "conditional": os.path.join(out, "conditional"),
        "logs": os.path.join(out, "logs"),
    }
    os.makedirs(paths["logs"], exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never wait on the network
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # The cores shared out between the processes (one each on a 2-core machine): the tiny model's matrices gain little
    # from more threads, and threads that wait on each other inside every operation stall whenever anything else runs.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.num_processes)))
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # MKL's sums in one order on a machine: reruns repeat bit for bit
    batch = str(64 // args.num_processes)  # 64 images per step, whatever the number of processes
    shared = ["--seed", str(args.seed)] + (["--overwrite"] if args.overwrite else [])
    overrides = ["--config_overrides", args.config_overrides] if args.config_overrides else []
    start = time.perf_counter()
    times = {}

    warmup = max(1, args.pretrain_steps // 20)
    pretraining = (
        f"--objective ar --model_size {args.model_size} --n_px {args.n_px} --max_train_steps {args.pretrain_steps} "
        f"--num_warmup_steps {warmup} --learning_rate 2e-3 --per_device_train_batch_size {batch} "
        f"--eval_steps {max(1, args.pretrain_steps // 4)} --logging_steps 50 "
        f"--checkpointing_steps {max(1, args.pretrain_steps // 2)} --checkpoints_total_limit 1".split()
        + overrides
    )
    times["pretrain"] = run_stage(
        "1/5 Pretrain a tiny Image GPT on the digits' pixels (autoregressive objective)",
        "pretrain.py",
        pretraining + ["--output_dir", paths["pretrained"], *shared],
        paths["logs"],
        args.num_processes,
    )
    times["sample"] = run_stage(
        "2/5 Complete held-out digits from their top half, and sample new ones",
        "sample.py",
        f"--num_images {args.num_images} --num_completions {args.num_completions} --num_samples {args.num_samples}".split()
        + ["--upscale_model", args.upscale_model]
        + ["--model_name_or_path", paths["pretrained"], "--output_dir", paths["samples"], *shared],
        paths["logs"],
    )
    times["linear_probe"] = run_stage(
        "3/5 Linear probes on every layer: pretrained vs random init vs raw pixels",
        "linear_probe.py",
        ["--model_name_or_path", paths["pretrained"], "--output_dir", paths["probe"], *shared],
        paths["logs"],
        args.num_processes,
    )
    times["finetune"] = run_stage(
        "4/5 Fine-tune as a classifier on the paper's joint loss (L_clf + L_gen)",
        "finetune.py",
        f"--gen_loss_weight 1.0 --max_train_steps {args.finetune_steps} "
        f"--num_warmup_steps {max(1, args.finetune_steps // 10)} --learning_rate 3e-3 --per_device_train_batch_size {batch} "
        f"--random_crop_scale 0.8 1 --eval_steps {args.finetune_steps} --logging_steps 25".split()
        + ["--model_name_or_path", paths["pretrained"], "--output_dir", paths["finetuned"], *shared],
        paths["logs"],
        args.num_processes,
    )
    times["class_conditional"] = run_stage(
        "5/5 Pretrain the same model class-conditionally (each digit's class token, dropped 10% of the time)",
        "pretrain.py",
        pretraining + ["--class_conditional", "--output_dir", paths["conditional"], *shared],
        paths["logs"],
        args.num_processes,
        log="pretrain_class_conditional",
    )
    started = time.perf_counter()
    recognition = recognise_classes(paths, args)
    times["class_conditional"] += time.perf_counter() - started
    total = time.perf_counter() - start

    with open(os.path.join(paths["pretrained"], "all_results.json")) as f:
        pretrain_results = json.load(f)
    with open(os.path.join(paths["finetuned"], "all_results.json")) as f:
        finetune_results = json.load(f)
    with open(os.path.join(paths["conditional"], "all_results.json")) as f:
        conditional_results = json.load(f)
    with open(os.path.join(paths["probe"], "probe_results.md")) as f:
        probe_table = f.read().strip()
    artifacts = {
        "pretrained model (AutoModelForCausalLM + AutoImageProcessor)": paths["pretrained"],
        "its model card": os.path.join(paths["pretrained"], "README.md"),
        "completions grid (original | top half given | completions)": os.path.join(
            paths["samples"], "completions.png"
        ),
        f"completions grid, upscaled (--upscale_model {args.upscale_model})": os.path.join(
            paths["samples"], "completions_upscaled.png"
        ),
        "unconditional samples": os.path.join(paths["samples"], "samples.png"),
        f"unconditional samples, upscaled (--upscale_model {args.upscale_model})": os.path.join(
            paths["samples"], "samples_upscaled.png"
        ),
        "linear probe table": os.path.join(paths["probe"], "probe_results.md"),
        "linear probe plot": os.path.join(paths["probe"], "probe_accuracy.png"),
        "linear probe results (JSON)": os.path.join(paths["probe"], "probe_results.json"),
        "fine-tuned classifier (AutoModelForImageClassification)": paths["finetuned"],
        "class-conditional model": paths["conditional"],
        "class-conditional samples (one row per digit)": os.path.join(paths["conditional"], "classes.png"),
        "logs of every stage": paths["logs"],
    }
    lines = [
        "# Image GPT demo: scikit-learn digits, end to end",
        "",
        f"Wall time: {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in times.items())}).",
        "",
        f"Pretraining: evaluation loss {pretrain_results['eval_bpd']:.3f} bits per pixel "
        f"({args.pretrain_steps} steps, {args.model_size} model, {args.n_px}x{args.n_px} pixels).",
        "",
        probe_table,
        "",
        f"Fine-tuning: test accuracy {finetune_results['eval_accuracy']:.4f} after {args.finetune_steps} steps.",
        "",
        f"Class-conditional pretraining (the same run, --class_conditional): held-out bits per pixel "
        f"{conditional_results['eval_bpd']:.3f} without a class, {conditional_results['eval_bpd_conditional']:.3f} "
        f"with it (the unconditional model: {pretrain_results['eval_bpd']:.3f}). Samples recognised as the requested "
        f"digit by the fine-tuned classifier ({args.samples_per_class} per digit):",
        "",
        "| samples | guidance scale | recognised as requested |",
        "|---|---|---|",
        *(f"| {kind} | {scale} | {share:.1%} |" for kind, scale, share in recognition),
        "",
        "Artifacts:",
        *(f"- {name}: {path}" for name, path in artifacts.items()),
    ]
    summary_path = os.path.join(out, "SUMMARY.md")
    with atomic_file(summary_path, overwrite=True, arg="the summary") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + f"\n\nThis summary: {summary_path}", flush=True)
    return {"times": times, "total": total, "summary": summary_path, "artifacts": artifacts}


if __name__ == "__main__":
    main()
