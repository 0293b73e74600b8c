"""Encoding sharded inputs (issue 17): webdataset tar and parquet shards written here with hostile
members, a streaming 🤗 dataset; one input shard is one output shard; every readable sample
exactly once, every bad one reported by shard and key; --max-samples, --shard-slice; a killed
2-process job finished by 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from diffusers import AutoencoderKL
from shards import write_shards

from latent_vae.encode.hub import dataset_card
from latent_vae.encode.run import encode_dataset
from latent_vae.encode.streaming import samples_per_shard
from latent_vae.errors import ConfigError
from latent_vae.interop.export import save_diffusers_model
from latent_vae.presets import PRESETS

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_diffusers_model(AutoencoderKL(**PRESETS["tiny-kl"].kwargs).eval(),
                                tmp_path_factory.mktemp("kl") / "model")


def encode(model, out, data=None, **options):
    options = {"resolution": 16, "patch_size": 1, "num_workers": 0, "progress": False, "batch_size": 3,
               "output_format": "parquet", **options}
    return encode_dataset(model, data, out, **options)


def parquet_rows(out):
    table = pq.read_table(str(out / "data"))
    return table.column("id").to_pylist(), table


def failures(out):
    return {f["id"]: f["reason"] for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_every_readable_sample_once_and_every_bad_one_named(tmp_path, kl_dir, fmt):
    data = write_shards(tmp_path / "shards", shards=3, per_shard=7, fmt=fmt)
    out = tmp_path / "latents"
    options = {"key_column": "key"} if fmt == "parquet" else {}
    summary = encode(kl_dir, out, shards=[str(tmp_path / "shards")], num_workers=2, **options)
    assert (summary.read, summary.encoded, summary.failed) == (21, 12, 9)
    ids, table = parquet_rows(out)
    assert ids == data.good  # in shard order, then sample order: no duplicate, no gap
    assert sorted(failures(out)) == sorted(data.bad) and all(failures(out).values())
    # one output shard per input shard, and the sample's other members kept
    assert len(list((out / "data").glob("train-*-of-000003.parquet"))) == 3
    assert table.column("shard").to_pylist() == [data.shards.index(i.split("#")[0]) for i in ids]
    assert all("sample" in json.loads(f).get("txt" if fmt == "tar" else "caption", "sample")
               for f in table.column("fields").to_pylist())
    assert table.column("latent_shape").to_pylist()[0] == [4, 2, 2]
    card = dataset_card(out, "data/*.parquet")  # what --push-to-hub uploads: no local path in it
    assert "# Latents of 3 shards" in card and str(tmp_path) not in card and "| rows | 12 of 21 inputs" in card


def test_max_samples_takes_the_same_first_samples_of_every_shard(tmp_path, kl_dir):
    data = write_shards(tmp_path / "shards", shards=3, per_shard=7, hostile=False)
    assert [samples_per_shard(10, 3, j) for j in range(3)] == [4, 3, 3]
    summary = encode(kl_dir, tmp_path / "latents", shards=[str(tmp_path / "shards")], max_samples=10)
    assert (summary.read, summary.encoded) == (10, 10)
    per_shard = [data.good[j * 7:j * 7 + n] for j, n in enumerate((4, 3, 3))]
    assert parquet_rows(tmp_path / "latents")[0] == [i for part in per_shard for i in part]


def test_shard_slices_share_one_output_and_the_last_completes_it(tmp_path, kl_dir):
    data = write_shards(tmp_path / "shards", shards=5, per_shard=4)
    out, shards = tmp_path / "latents", [str(tmp_path / "shards" / "data-{000000..000004}.tar")]
    first = encode(kl_dir, out, shards=shards, shard_slice="1/2")
    assert first.pending_shards == 3 and not (out / "summary.json").exists()  # shards 1 and 3 done
    with pytest.raises(ConfigError, match="--overwrite cannot be combined with --shard-slice"):
        encode(kl_dir, out, shards=shards, shard_slice="0/2", overwrite=True)
    last = encode(kl_dir, out, shards=shards, shard_slice="0/2")
    assert last.pending_shards == 0 and (last.encoded, last.failed) == (len(data.good), len(data.bad))
    assert parquet_rows(out)[0] == data.good


def test_a_streaming_dataset_is_encoded_shard_by_shard(tmp_path, kl_dir):
    data = write_shards(tmp_path / "parquet", shards=2, per_shard=6, fmt="parquet")
    out = tmp_path / "latents"
    summary = encode(kl_dir, out, data=str(tmp_path / "parquet"), streaming=True, key_column="key")
    assert (summary.encoded, summary.failed) == (len(data.good), len(data.bad))
    keys = [i.split("#")[1] for i in parquet_rows(out)[0]]
    assert keys == [g.split("#")[1] for g in data.good]


def descendants(pid: int) -> list:
    """The process ids below ``pid`` (children, grandchildren ...), from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


KILLABLE = """
import sys, time, torch
torch.set_num_threads(1)
from latent_vae.encode.hub import dataset_card
from latent_vae.encode.run import encode_dataset
from latent_vae.models.loading import load_autoencoder
model, shards, out, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
vae = load_autoencoder(model)
vae.encoder.register_forward_pre_hook(lambda module, args: time.sleep(delay))  # a slow encoder
s = encode_dataset(vae, None, out, shards=[shards], resolution=16, patch_size=1, batch_size=2, num_workers=0,
                   output_format="webdataset", progress=False)
print("counts", s.read, s.encoded, s.failed, s.resumed)
"""


@pytest.mark.multiprocess
def test_killed_two_process_job_is_finished_by_one_process(tmp_path, kl_dir):
    import tarfile

    data = write_shards(tmp_path / "shards", shards=6, per_shard=4)
    out, script = tmp_path / "latents", tmp_path / "encode.py"
    script.write_text(KILLABLE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    job = subprocess.Popen([*torchrun, str(kl_dir), str(tmp_path / "shards"), str(out), "0.4"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while len(list((out / "shards").glob("*.json"))) < 2 and time.time() < deadline and job.poll() is None:
        time.sleep(0.1)
    for pid in [job.pid, *descendants(job.pid)]:  # the launcher and both ranks (in sessions of their own), mid-run
        os.kill(pid, signal.SIGKILL)
    job.wait()
    done = len(list((out / "shards").glob("*.json")))
    assert 2 <= done < 6 and not (out / "summary.json").exists(), job.stderr.read().decode()[-3000:]

    rerun = subprocess.run([sys.executable, str(script), str(kl_dir), str(tmp_path / "shards"), str(out), "0"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    read, encoded, failed, resumed = map(int, rerun.stdout.split("counts")[1].split())
    assert (read, encoded, failed) == (24, len(data.good), len(data.bad)) and resumed == 4 * done, rerun.stderr[-3000:]
    ids = []
    for shard in sorted((out / "data").glob("*.tar")):
        with tarfile.open(shard) as tar:
            ids += [json.loads(tar.extractfile(m).read())["id"] for m in tar.getmembers() if m.name.endswith(".json")]
    assert ids == data.good and sorted(failures(out)) == sorted(data.bad)
