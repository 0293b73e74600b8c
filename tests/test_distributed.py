"""Two processes (torchrun, CPU/gloo) compute what one process computes with the combined batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from conftest import fast_config
from latent_vae.train.loop import train

records = []

class Spy(torch.optim.Adam):
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        grads = [p.grad.clone() if p.grad is not None else None for p in params]
        out = super().step(closure)
        records.append({{"grads": grads, "params": [p.detach().clone() for p in params]}})
        return out

torch.optim.Adam = Spy
out, batch = sys.argv[1], sys.argv[2]
train(fast_config(f"train.batch_size={{batch}}", *sys.argv[3:]), out)
torch.save(records, os.path.join(out, f"records-{{os.environ.get('RANK', '0')}}.pt"))
"""

OVERRIDES = ["train.max_steps=2", "gan.start=0", "gan.lecam_weight=0.1", "regularizer.kl.weight=1e-3"]


def launch(tmp_path: Path, nproc: int, batch: int, *extra: str) -> list:
    out = tmp_path / f"run{nproc}"
    script = tmp_path / "spy_train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    command = [sys.executable, str(script), str(out), str(batch), *OVERRIDES, *extra]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--standalone", *command[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"records-{r}.pt") for r in range(nproc)]


def assert_gradients_close(single: list, multi: list) -> None:
    """Equal up to float summation order, relative to the largest gradient of the model
    (some gradients, e.g. attention key biases, are exactly zero in theory and pure rounding noise)."""
    scale = max(g.abs().max().item() for g in single)
    for g1, g2 in zip(single, multi):
        assert (g1 - g2).abs().max().item() <= 1e-5 * scale


@pytest.mark.multiprocess
def test_two_processes_match_one_process_with_the_combined_batch(tmp_path):
    one = launch(tmp_path, 1, 4)[0]
    rank0, rank1 = launch(tmp_path, 2, 2)
    assert len(one) == len(rank0) == 4  # 2 steps x (autoencoder, discriminator)
    # First step: identical starting weights, so the all-reduced gradients must equal the
    # single-process gradients of the 4-image batch (up to float summation order).
    for single, multi in zip(one[:2], rank0[:2]):
        assert_gradients_close(single["grads"], multi["grads"])
    # Every rank holds bit-identical weights after every step.
    for r0, r1 in zip(rank0, rank1):
        assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
