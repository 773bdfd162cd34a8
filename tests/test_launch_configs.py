"""The accelerate launch configs under examples/accelerate_configs and examples/slurm_pretrain.sh: each config loads
with accelerate's own loader and is what its name says; the SLURM script launches every node with its rank."""

import os
import re
import subprocess

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from conftest import EXAMPLES

from image_gpt_hf import ImageGPTPreTrainedModel

CONFIGS = sorted((EXAMPLES / "accelerate_configs").glob("*.yaml"))
# What a name promises: (a pattern of the file name, the check).
PROMISES = [
    ("cpu", lambda c: c.use_cpu),
    ("gpu", lambda c: not c.use_cpu),
    ("^multi", lambda c: c.num_processes >= 2 and c.distributed_type.value == "MULTI_GPU"),
    ("node", lambda c: c.num_machines == 2 and c.main_process_ip and c.main_process_port and c.rdzv_backend),
    ("node", lambda c: c.machine_rank == 0 and c.num_processes % c.num_machines == 0),
    ("fsdp", lambda c: c.distributed_type.value == "FSDP" and c.fsdp_config["fsdp_reshard_after_forward"]),
    ("fsdp", lambda c: c.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] in ImageGPTPreTrainedModel._no_split_modules),
    ("deepspeed", lambda c: c.distributed_type.value == "DEEPSPEED"),
    ("zero2", lambda c: c.deepspeed_config["zero_stage"] == 2),
    ("zero3", lambda c: c.deepspeed_config["zero_stage"] == 3 and c.deepspeed_config["zero3_save_16bit_model"]),
]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_loads_and_is_what_its_name_says(path):
    config = load_config_from_file(str(path))
    checks = [check for pattern, check in PROMISES if re.search(pattern, path.stem)]
    assert checks, f"{path.name}: no check for what its name promises; add one to PROMISES"
    assert all(check(config) for check in checks), path.name


def test_slurm_script_launches_each_node_with_its_rank(tmp_path):
    script = EXAMPLES / "slurm_pretrain.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    # Stand-ins for SLURM's and accelerate's commands: srun runs the node command as nodes 0 and 1 would.
    fake = {
        "scontrol": 'printf "gpu-a\\ngpu-b\\n"',
        "srun": 'shift; for node in 0 1; do SLURM_NODEID=$node "$@"; done',
        "accelerate": 'echo "$@"',
    }
    for name, body in fake.items():
        (tmp_path / name).write_text(f"#!/bin/bash\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]"}
    env |= {"SLURM_NNODES": "2", "SLURM_CPUS_PER_TASK": "32"}
    result = subprocess.run(["bash", str(script), "--output_dir", "out"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("launch --config_file ") for line in lines)
    for rank, line in enumerate(lines):
        assert f"--num_machines 2 --num_processes 16 --machine_rank {rank} --main_process_ip gpu-a" in line
        assert line.endswith("examples/pretrain.py --output_dir out")
