"""Encode outputs that cannot be trusted as they lie on disk: shards verified by content (SHA-256
in the manifest), redone when truncated or garbled, never merged; one writer per output folder."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from conftest import write_photo_crops
from diffusers import AutoencoderKL

from latent_vae.encode.run import encode_dataset
from latent_vae.encode.storage import ShardStore
from latent_vae.errors import ConfigError, DataError
from latent_vae.interop.export import save_diffusers_model
from latent_vae.presets import PRESETS


@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_diffusers_model(AutoencoderKL(**PRESETS["tiny-kl"].kwargs).eval(),
                                tmp_path_factory.mktemp("kl") / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_photo_crops(folder, count=8, size=32)
    return folder


def encode(model, data, out, **options):
    options = {"resolution": 32, "num_workers": 0, "progress": False, "shard_size": 2, "batch_size": 2, **options}
    return encode_dataset(model, data, out, **options)


def latents(out):
    rows = datasets.load_from_disk(str(out))
    return rows["id"], np.asarray(rows.with_format("numpy")["latent"], dtype=np.float32)


def test_shards_damaged_on_disk_are_redone_not_merged(tmp_path, kl_dir, images, caplog):
    reference_ids, reference = latents(encode(kl_dir, images, tmp_path / "clean").output_dir)
    out = tmp_path / "latents"
    encode(kl_dir, images, out, keep_shards=True)
    (out / "summary.json").unlink()  # as if killed before the merge finished: a resumable encode
    store = ShardStore(out, 2, 8)
    truncated = store.data_path(0).read_bytes()
    store.data_path(0).write_bytes(truncated[: len(truncated) // 2])
    garbled = bytearray(store.data_path(1).read_bytes())  # same size: a size check passes it
    garbled[-40:] = bytes(40)
    store.data_path(1).write_bytes(bytes(garbled))
    store.manifest_path(2).write_text('{"shard": 2, "rows": ')  # a torn manifest
    assert [store.verify(j) is None for j in range(4)] == [False, False, False, True]

    summary = encode(kl_dir, images, out)
    assert summary.resumed == 2 and (summary.read, summary.encoded, summary.failed) == (8, 8, 0)
    for shard, why in ((0, "SHA-256"), (1, "SHA-256"), (2, "manifest")):
        assert f"redoing shard {shard}" in caplog.text and why in caplog.text
    ids, values = latents(out)
    assert ids == reference_ids and np.allclose(values, reference, atol=1e-5, rtol=0)


def test_a_shard_corrupted_before_the_merge_is_never_merged(tmp_path, kl_dir, images, monkeypatch):
    write = ShardStore.write

    def write_then_corrupt(self, shard, table, failures):
        write(self, shard, table, failures)
        if shard == 3:  # the disk returns other bytes than were written
            data = bytearray(self.data_path(shard).read_bytes())
            data[len(data) // 2] ^= 0xFF
            self.data_path(shard).write_bytes(bytes(data))

    out = tmp_path / "latents"
    monkeypatch.setattr(ShardStore, "write", write_then_corrupt)
    with pytest.raises(DataError, match="shard 3: .*SHA-256.*rerun the same command"):
        encode(kl_dir, images, out)
    assert not (out / "summary.json").exists() and not list(out.glob("data-*.arrow"))
    monkeypatch.setattr(ShardStore, "write", write)
    summary = encode(kl_dir, images, out)
    assert (summary.resumed, summary.encoded) == (6, 8)
    assert datasets.load_from_disk(str(out))["index"] == list(range(8))


LOCK_HOLDER = """
import sys, time
from latent_vae.runtime import try_lock
lock = try_lock(sys.argv[1])
print("locked" if lock else "busy", flush=True)
time.sleep(120)
"""


def test_one_writer_per_output_folder_and_the_lock_dies_with_its_holder(tmp_path, kl_dir, images):
    out = tmp_path / "latents"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out / ".lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match="another encode is writing to .*wait for it to finish"):
            encode(kl_dir, images, out)
        assert not (out / "encode_config.json").exists()  # the refused encode wrote nothing
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait()
    summary = encode(kl_dir, images, out)
    assert summary.encoded == 8 and json.loads((out / "summary.json").read_text())["encoded"] == 8
