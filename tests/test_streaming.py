"""examples/pretrain.py --shards_dir --streaming: a resumed streamed run ends with the uninterrupted run's weights,
2 processes and 2 simulated nodes read each example exactly once per epoch (from their own shards) and train alike,
and streams it cannot use are refused by name."""

import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import EXAMPLES, ROOT, launch, refusal, run_in_process, run_script, script_env
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow  # pretraining runs

MODEL = ["--config_overrides", "n_layer=2,n_embd=32,n_head=2", "--per_device_train_batch_size", "64"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):  # the digits at 4x4: 1,437 training images in 4 shards of 359 or 360
    output = tmp_path_factory.mktemp("shards") / "digits4"
    run_script("tokenize_images.py", "--output_dir", str(output), "--n_px", "4", "--num_shards", "4")
    return output


@pytest.fixture(scope="module")
def even_shards(shards, tmp_path_factory):  # 1,024 OpenAI-layout ids at 4x4 in 4 shards of 256: 2 x 8 x 64 per epoch
    folder = tmp_path_factory.mktemp("npy")
    ids = np.random.default_rng(0).integers(0, 16, size=(1024 + 64, 16), dtype=np.int64)
    np.save(folder / "cifar10_trX.npy", ids[:1024])
    np.save(folder / "cifar10_vaX.npy", ids[1024:])
    output, palette = folder / "shards", str(shards)  # the digits' 16-color palette
    run_script("tokenize_images.py", "--npy_ids", str(folder / "cifar10_trX.npy"), "--validation_npy_ids",
               str(folder / "cifar10_vaX.npy"), "--processor_name_or_path", palette, "--num_shards", "4",
               "--output_dir", str(output))  # fmt: skip
    return output


def streamed(shards, output, *args: str) -> list[str]:
    return [
        "--shards_dir",
        str(shards),
        "--streaming",
        *MODEL,
        "--output_dir",
        str(output),
        "--save_data_order",
        *args,
    ]


def data_order(output, process: int) -> list[tuple[int, list[int]]]:  # (epoch, indices) of each batch, in order
    lines = (output / "image_gpt_pretrain" / "data_order" / f"process_{process}.txt").read_text().splitlines()
    return [(int(line.split()[0]), [int(i) for i in line.split()[1:]]) for line in lines]


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def same_weights(a, b) -> bool:
    return all(torch.equal(weights(a)[key], value) for key, value in weights(b).items())


def test_an_interrupted_streamed_run_resumes_to_the_uninterrupted_runs_weights(shards, tmp_path):
    """22 batches per epoch (1,437 // 64), 30 steps with dropout on, a checkpoint at step 15: the run resumed there
    replays epoch 0's stream past its first 15 batches, reads the batches the uninterrupted run read after them and
    ends with its weights, bit for bit."""
    run = ["--max_train_steps", "30", "--checkpointing_steps", "15", "--shuffle_buffer_size", "300"]
    run_in_process("pretrain.py", *streamed(shards, tmp_path / "whole", *run))
    whole = data_order(tmp_path / "whole", 0)
    assert [epoch for epoch, _ in whole] == [0] * 22 + [1] * 8 and all(len(batch) == 64 for _, batch in whole)
    epoch_0 = [i for _, batch in whole[:22] for i in batch]
    assert len(set(epoch_0)) == 22 * 64 and set(epoch_0) <= set(range(1437))  # each example at most once
    assert [i for _, batch in whole[22:] for i in batch] != epoch_0[: 8 * 64]  # epoch 1: another order
    first = tmp_path / "whole" / "checkpoints" / "checkpoint_0"
    shutil.copytree(first, tmp_path / "resumed" / "checkpoints" / "checkpoint_0")
    run_in_process("pretrain.py", *streamed(shards, tmp_path / "resumed", *run, "--resume_from_checkpoint", "latest"))
    assert data_order(tmp_path / "resumed", 0) == whole[15:]
    assert not same_weights(tmp_path / "whole", first)  # it trained on
    assert same_weights(tmp_path / "whole", tmp_path / "resumed")


@pytest.fixture(scope="module")
def two_processes(even_shards, tmp_path_factory):  # one epoch: 8 batches of 64 on each of 2 processes
    output = tmp_path_factory.mktemp("two") / "run"
    log = launch("multi_cpu.yaml", "pretrain.py", *streamed(even_shards, output, "--max_train_steps", "8"))
    return output, log


def shard_of(shards) -> dict[int, int]:  # example index -> the number of the training shard that holds it
    files = sorted((shards / "train").glob("*.parquet"))
    return {i: n for n, file in enumerate(files) for i in pq.read_table(file, columns=["index"])["index"].to_pylist()}


def check_one_epoch(output, shards) -> None:
    """Each of the 2 processes read 8 batches of epoch 0 from 2 shards of its own: together every one of the 1,024
    examples exactly once. (Where the examples do not divide into whole batches on every process, each process stops
    at the batch count all can fill: the rest sit that epoch out, another rest the next.)"""
    orders = [data_order(output, process) for process in (0, 1)]
    assert [[epoch for epoch, _ in order] for order in orders] == [[0] * 8] * 2
    read = [[i for _, batch in order for i in batch] for order in orders]
    assert sorted(read[0] + read[1]) == list(range(1024))
    shard = shard_of(shards)
    own = [{shard[i] for i in indices} for indices in read]
    assert [len(s) for s in own] == [2, 2] and not own[0] & own[1]


def test_two_processes_read_each_example_once_from_their_own_shards(two_processes, even_shards):
    output, log = two_processes
    assert "4 shards over 2 processes: each reads 2 of its own." in log
    check_one_epoch(output, even_shards)
    assert "images_per_s" in log and "tokens_per_s" in log


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_read_each_example_once_and_train_as_two_processes_do(two_processes, even_shards, tmp_path):
    """Two `accelerate launch` invocations as machines 0 and 1 (one process each, gloo on CPU, static rendezvous on
    127.0.0.1) are ranks 0 and 1 of the 2-process run: the same batches, the same all-reduce, the same weights."""
    output, port = tmp_path / "nodes", str(free_port())
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2"]
    launcher += ["--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port]
    launcher += ["--rdzv_backend", "static", "--same_network"]
    script = [str(EXAMPLES / "pretrain.py"), *streamed(even_shards, output, "--max_train_steps", "8")]
    nodes = [
        subprocess.Popen(
            [*launcher, "--machine_rank", str(rank), *script],
            env=script_env(ACCELERATE_USE_CPU="1"),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    check_one_epoch(output, even_shards)
    for process in (0, 1):
        assert data_order(output, process) == data_order(two_processes[0], process)
    assert same_weights(output, two_processes[0])


def test_streams_it_cannot_use_are_refused_by_name(two_processes, shards, tmp_path):
    out = ["--output_dir", str(tmp_path / "out")]
    message = refusal("pretrain.py", "--shards_dir", str(shards), "--streaming", *out)
    assert (
        "--streaming reads --shards_dir and needs --max_train_steps" in message and "give --max_train_steps" in message
    )
    assert "give --shards_dir and --max_train_steps" in refusal("pretrain.py", "--streaming", *out)
    message = refusal("pretrain.py", "--shards_dir", str(shards), "--palette_size", "8", "--no_random_crop", *out)
    assert "drop --palette_size, --no_random_crop" in message
    eight = tmp_path / "digits8"  # the digits at 8x8, with a palette of their own: not the trained model's
    run_script("tokenize_images.py", "--output_dir", str(eight), "--num_shards", "2", "--seed", "1")
    model = ["--model_name_or_path", str(two_processes[0]), "--max_train_steps", "1"]
    message = refusal("pretrain.py", "--shards_dir", str(eight), "--streaming", *model, *out)
    assert re.search(
        r"were tokenized for another model: their palette \w+ \(the model's: \w+\), n_px 8 \(the model's: 4\)\.",
        message,
    )


def test_map_style_shards_train_and_log_throughput_and_mfu(shards, tmp_path):
    run = ["--shards_dir", str(shards), *MODEL, "--max_train_steps", "4", "--logging_steps", "2", "--peak_tflops", "1"]
    log = run_script("pretrain.py", *run, "--save_data_order", "--output_dir", str(tmp_path / "out"))
    order = data_order(tmp_path / "out", 0)
    assert len(order) == 4 and len({i for _, batch in order for i in batch}) == 4 * 64  # shuffled, without repeats
    steps = re.findall(r"step (\d+): .*images_per_s ([\d.e+]+), tokens_per_s ([\d.e+]+), mfu ([\d.e+-]+)", log)
    assert [int(step) for step, *_ in steps] == [2, 4]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # FLOPs per token: 6 N + 12 L d T
    flops = 6 * model.num_parameters(exclude_embeddings=True) + 12 * 2 * 32 * 16
    for _, images, tokens, mfu in steps:  # 16 tokens an image (4x4); MFU: tokens/s x FLOPs per token / 1e12 FLOP/s
        assert float(tokens) == pytest.approx(16 * float(images), rel=1e-3)
        assert float(mfu) == pytest.approx(float(tokens) * flops / 1e12, rel=2e-3)
