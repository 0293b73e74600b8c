"""Sharded streams (issue 17): tar and parquet shards written here with hostile members, read
exactly (every sample once, bad ones reported by shard and key), split by rank, restarted exactly."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fast_config
from shards import write_shards

from latent_vae.data.stream_dataset import StreamCursor, StreamLoader, training_data
from latent_vae.data.streams import (
    ShardPosition,
    decode,
    expand_braces,
    list_shards,
    open_stream,
    split_shards,
)
from latent_vae.errors import DataError
from latent_vae.train.checkpoint import list_checkpoints, load_tensors
from latent_vae.train.loop import train as train_run


def read_all(source, shards=None):
    """(ids of decoded samples, {id: reason} of failures), in reading order."""
    good, bad = [], {}
    for shard in shards or source.shards:
        for sample in source.read(shard):
            image, failure = decode(sample)
            if failure is None:
                assert image.mode == "RGB"
                good.append(sample.id)
            else:
                bad[failure.key] = failure.reason
    return good, bad


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("d-{000..002}.tar") == ["d-000.tar", "d-001.tar", "d-002.tar"]
    assert expand_braces("{a,b}/x-{8..10}.tar") == ["a/x-8.tar", "a/x-9.tar", "a/x-10.tar",
                                                    "b/x-8.tar", "b/x-9.tar", "b/x-10.tar"]
    assert expand_braces("s3://bucket/plain.tar") == ["s3://bucket/plain.tar"]
    with pytest.raises(DataError, match="count up"):
        expand_braces("d-{9..1}.tar")
    with pytest.raises(DataError, match="at most"):
        expand_braces("d-{0..99999999999}.tar")  # refused before allocating a list of 10^11 names


def test_shard_lists_are_checked(tmp_path):
    data = write_shards(tmp_path / "tar", shards=3, per_shard=2, hostile=False)
    pattern = str(tmp_path / "tar" / "data-{000000..000002}.tar")
    assert list_shards(pattern) == data.shards
    assert list_shards(str(tmp_path / "tar")) == data.shards  # a folder: its shard files, sorted
    assert list_shards(str(tmp_path / "tar" / "*.tar")) == data.shards
    assert list_shards([data.shards[2], "https://example.com/x.tar"]) == [data.shards[2], "https://example.com/x.tar"]
    with pytest.raises(DataError, match="1 of 4 shards do not exist"):
        list_shards(str(tmp_path / "tar" / "data-{000000..000003}.tar"))
    with pytest.raises(DataError, match="listed twice"):
        list_shards([data.shards[0], data.shards[0]])
    (tmp_path / "tar" / "notes.csv").write_text("x")
    with pytest.raises(DataError, match="neither a tar"):
        list_shards(str(tmp_path / "tar" / "*"))


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_every_sample_read_once_and_every_bad_one_reported(tmp_path, fmt):
    data = write_shards(tmp_path, shards=3, per_shard=8, fmt=fmt)
    source = open_stream(str(tmp_path / f"data-{{000000..000002}}.{fmt}"), key_column="key")
    good, bad = read_all(source)
    assert good == data.good  # in shard order, none missing, none twice
    assert set(bad) == set(data.bad) and len(good) + len(bad) == data.total == 24
    reasons = {data.bad[key]: reason for key, reason in bad.items()}
    assert "Truncated" in reasons["truncated"] or "truncated" in reasons["truncated"]
    assert "not a recognised image" in reasons["not-an-image"]
    assert "no image" in reasons["missing-image"]


def test_a_broken_shard_is_reported_not_dropped(tmp_path):
    data = write_shards(tmp_path, shards=2, per_shard=6, hostile=False)
    cut = tmp_path / "data-000001.tar"
    third = list(open_stream(str(cut)).read(str(cut)))[1].next.offset
    cut.write_bytes(cut.read_bytes()[:third + 1200])  # inside the image of the third sample
    good, bad = read_all(open_stream(data.shards))
    assert good == data.good[:8]
    (broken,) = [key for key in bad]
    assert broken.startswith(str(cut) + "#") and "shard unreadable" in bad[broken]


def test_compressed_tar_reads_and_restarts(tmp_path):
    data = write_shards(tmp_path, shards=1, per_shard=8)
    with open(data.shards[0], "rb") as plain, gzip.open(tmp_path / "data.tar.gz", "wb") as packed:
        shutil.copyfileobj(plain, packed)
    source = open_stream(str(tmp_path / "data.tar.gz"))
    samples = list(source.read(source.shards[0]))
    assert [s.key for s in samples] == [f"s000-{i:04d}" for i in range(8)]
    assert sum(decode(s)[1] is None for s in samples) == len(data.good)
    again = list(source.read(source.shards[0], samples[4].next))
    assert [s.key for s in again] == [s.key for s in samples[5:]]


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_restart_from_any_position_is_exact(tmp_path, fmt):
    data = write_shards(tmp_path, shards=1, per_shard=9, fmt=fmt)
    source = open_stream(data.shards, key_column="key")
    samples = list(source.read(data.shards[0]))
    assert len(samples) == 9 and samples[-1].next.finished
    for cut in range(9):
        again = list(source.read(data.shards[0], samples[cut].next))
        assert [(s.key, s.image) for s in again] == [(s.key, s.image) for s in samples[cut + 1:]]
    assert list(source.read(data.shards[0], ShardPosition())) == samples


def test_rank_split_covers_every_shard_exactly_once():
    shards = [f"s-{i:03d}.tar" for i in range(11)]
    for world in (1, 2, 3, 4, 11):
        parts = [split_shards(shards, rank, world) for rank in range(world)]
        assert sorted(s for part in parts for s in part) == shards
        assert parts == [split_shards(shards, rank, world) for rank in range(world)]  # deterministic
    with pytest.raises(DataError, match="does not exist"):
        split_shards(shards, 3, 3)


def test_streaming_hf_dataset_reads_every_row(tmp_path):
    data = write_shards(tmp_path / "parquet", shards=3, per_shard=5, fmt="parquet")
    source = open_stream(path=str(tmp_path / "parquet"), key_column="key")
    assert len(source.shards) == 3 and source.exact_resume
    good, bad = read_all(source)
    assert sorted(g.split("#")[1] for g in good) == sorted(g.split("#")[1] for g in data.good)
    assert len(bad) == len(data.bad)
    first = list(source.read(source.shards[1]))
    assert [s.key for s in source.read(source.shards[1], first[1].next)] == [s.key for s in first[2:]]


# --------------------------------------------------------------------------- training from a stream


def stream_config(pattern, *overrides):
    return fast_config(f"data.shards={pattern}", "data.resolution=16", "data.resize=24", *overrides).data


def take_batches(loader, count):
    batches = iter(loader)
    return [next(batches) for _ in range(count)]


def same_batches(a, b):
    return len(a) == len(b) and all(
        torch.equal(x["pixel_values"], y["pixel_values"]) and torch.equal(x["seeds"], y["seeds"])
        and [f.key for f in x["failures"]] == [f.key for f in y["failures"]] for x, y in zip(a, b, strict=True))


def test_every_epoch_reads_every_training_sample_once_across_ranks(tmp_path):
    data = write_shards(tmp_path, shards=5, per_shard=6)
    train, val, failures = training_data(stream_config(str(tmp_path / "*.tar"), "data.val_images=2",
                                                       "data.num_workers=2"))
    held_out = [s.id for s in val.samples]
    assert held_out == data.good[:2] and [f.key for f in failures] == [i for i in data.bad if "s000-0001" in i]
    world, workers = 2, 2
    for epoch in (0, 1):
        read = []
        for rank in range(world):
            batches = train.batches(batch_size=2, seed=3, rank=rank, num_processes=world)
            for local in range(workers):
                start = batches.epoch_start(local, epoch)
                for sample, (sample_epoch, _, _) in batches.sequence(rank * workers + local, start):
                    if sample_epoch != epoch:
                        break
                    read.append(sample.id)
        # training starts shard 0 after the held-out samples s000-0000 and s000-0002 (s000-0001 is bad)
        assert sorted(read) == sorted(i for i in data.good + list(data.bad) if "#s000-000" not in i or i[-1] > "2")


def test_block_shuffle_is_a_permutation_of_the_stream(tmp_path):
    write_shards(tmp_path, shards=2, per_shard=10, hostile=False)
    train, _, _ = training_data(stream_config(str(tmp_path / "*.tar"), "data.shuffle_buffer=4"))
    batches = train.batches(batch_size=2, seed=0, rank=0, num_processes=1)
    ordered = [s.id for s, _ in itertools.islice(batches.sequence(0, StreamCursor()), 12)]
    shuffled = [s.id for s, _ in itertools.islice(batches.samples(0, StreamCursor()), 12)]
    assert shuffled != ordered
    assert all(sorted(shuffled[i:i + 4]) == sorted(ordered[i:i + 4]) for i in range(0, 12, 4))


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_exactly_from_its_saved_position(tmp_path, workers):
    """Batches after a checkpointed position equal the uninterrupted run's, bad samples and crops included,
    across shard ends, epochs and (with 2 workers) the DataLoader's round-robin."""
    write_shards(tmp_path, shards=4, per_shard=7)
    cfg = stream_config(str(tmp_path / "data-{000000..000003}.tar"), f"data.num_workers={workers}",
                        "data.shuffle_buffer=5", "data.val_images=3")
    train, _, _ = training_data(cfg)

    def loader(start=0, state=None):
        return StreamLoader(train.batches(3, 11, 0, 1, start, state), num_workers=workers)

    straight = take_batches(loader(), 16)  # 48 samples: more than one epoch of the 25 training samples
    for stop in (5, 9):
        interrupted = loader()
        take_batches(interrupted, stop)
        state = interrupted.state_dict()
        assert same_batches(take_batches(loader(stop, state), 16 - stop), straight[stop:])
    assert sum(len(b["failures"]) for b in straight) > 0


def test_a_changed_setup_is_not_resumed_silently(tmp_path, caplog):
    write_shards(tmp_path, shards=4, per_shard=4, hostile=False)
    train, _, _ = training_data(stream_config(str(tmp_path / "*.tar")))
    first = StreamLoader(train.batches(2, 0, 0, 1))
    take_batches(first, 3)
    with caplog.at_level("WARNING", logger="latent_vae"):
        train.batches(4, 0, 0, 1, 3, first.state_dict())  # another batch size
    assert "cannot resume exactly (batch_size changed" in caplog.text


def test_training_from_tar_shards_resumes_to_identical_weights(tmp_path):
    """train() on tar shards with hostile members: 3 steps + resume to 6 ends bit-identical to 6 straight
    steps (the stream position travels in the checkpoint's rank file); bad samples are counted."""
    write_shards(tmp_path / "shards", shards=3, per_shard=8)
    common = [f"data.shards={tmp_path / 'shards'}", "data.shuffle_buffer=6", "gan.start=2", "train.batch_size=3",
              "export.scaling_images=4"]
    straight = train_run(fast_config("train.max_steps=6", *common), tmp_path / "straight")
    first = train_run(fast_config("train.max_steps=3", *common), tmp_path / "resumed")
    resumed = train_run(fast_config("train.max_steps=6", *common), tmp_path / "resumed", resume="latest")
    assert first.steps == 3 and resumed.steps == 6 and straight.failed_inputs > 0
    a = load_tensors(list_checkpoints(tmp_path / "straight" / "checkpoints")[-1] / "autoencoder.safetensors")
    b = load_tensors(list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1] / "autoencoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / "model" / "config.json").is_file()


TWO_PROCESS_RUN = """
import sys
sys.path.insert(0, {tests!r})
from conftest import fast_config
from latent_vae.train.loop import train
train(fast_config(*sys.argv[2:]), sys.argv[1])
"""


@pytest.mark.multiprocess
def test_two_processes_split_the_shards_and_count_every_bad_sample(tmp_path):
    """torchrun, 2 CPU processes: each rank reads its own shards; the bad samples both ranks met are
    counted in summary.json and listed in skipped_inputs.txt (rank 1's are gathered by the main process)."""
    data = write_shards(tmp_path / "shards", shards=4, per_shard=6)
    script = tmp_path / "run.py"
    script.write_text(TWO_PROCESS_RUN.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
               str(out), f"data.shards={tmp_path / 'shards'}", "data.shuffle_buffer=0", "data.resolution=16",
               "data.resize=24", "train.max_steps=4", "export.scaling_images=0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    # 4 steps × batch 2 = 8 images per rank: more than the 6 readable ones of its 2 shards, so every
    # sample of every shard was met, on one rank or the other.
    summary = json.loads((out / "summary.json").read_text())
    listed = dict(line.split("\t", 1) for line in (out / "skipped_inputs.txt").read_text().splitlines())
    assert sorted(listed) == sorted(data.bad) and summary["failed_inputs"] == len(data.bad) == 12


def test_memory_stays_constant_while_streaming_ten_times_the_budget(tmp_path):
    """RSS is sampled after every batch: streaming 10× more sample bytes than the budget (every sample
    carries a 1 MiB member) grows it by less than the budget: nothing accumulates with the dataset."""
    psutil = pytest.importorskip("psutil")
    budget = 48 * 2**20  # RSS growth allowed after warm-up: a shuffle block of 8 MiB, decoding, allocator slack
    write_shards(tmp_path, shards=6, per_shard=80, padding=2**20, hostile=False)  # 480 MiB of samples
    total = sum(p.stat().st_size for p in tmp_path.glob("*.tar"))
    assert total > 10 * budget
    train, _, _ = training_data(stream_config(str(tmp_path / "*.tar"), "data.shuffle_buffer=8",
                                              "data.shuffle_shards=false"))
    batches = iter(StreamLoader(train.batches(8, 0, 0, 1)))
    process = psutil.Process()
    for _ in range(4):  # warm-up: first allocations of the reader, decoder and crops
        next(batches)
    baseline, peak = process.memory_info().rss, 0
    for _ in range(480 // 8 - 4):  # the rest of one epoch
        next(batches)
        peak = max(peak, process.memory_info().rss)
    print(f"streamed {total / 2**20:.0f} MiB; RSS {baseline / 2**20:.0f} MiB after warm-up, peak "
          f"{peak / 2**20:.0f} MiB (+{(peak - baseline) / 2**20:.1f} MiB, budget {budget / 2**20:.0f} MiB)")
    assert peak - baseline < budget


def test_streaming_dataset_trains_and_resumes_exactly(tmp_path):
    """data.streaming=true over a local parquet folder: validation held out, batches resumed exactly."""
    write_shards(tmp_path / "parquet", shards=2, per_shard=7, fmt="parquet")
    cfg = fast_config(f"data.path={tmp_path / 'parquet'}", "data.streaming=true", "data.key_column=key",
                      "data.resolution=16", "data.resize=24", "data.shuffle_buffer=4", "data.val_images=2").data
    train, val, _ = training_data(cfg)
    assert [s.key for s in val.samples] == ["s000-0000", "s000-0002"]

    def loader(start=0, state=None):
        return StreamLoader(train.batches(2, 5, 0, 1, start, state))

    straight = take_batches(loader(), 8)
    interrupted = loader()
    take_batches(interrupted, 3)
    assert same_batches(take_batches(loader(3, interrupted.state_dict()), 5), straight[3:])


def test_a_wrong_image_column_is_one_clear_error_before_training(tmp_path):
    write_shards(tmp_path, shards=2, per_shard=3, fmt="parquet")
    with pytest.raises(DataError, match="has no column 'jpg'.*data.image_column"):
        training_data(stream_config(str(tmp_path / "*.parquet"), "data.image_column=jpg", "data.val_images=0"))


def test_resume_exactly_at_the_end_of_a_streams_only_shard(tmp_path):
    """The saved cursor points past the last sample of the stream's only shard: the resumed stream goes
    on with the next epoch, as the uninterrupted one did."""
    write_shards(tmp_path, shards=1, per_shard=6, hostile=False)
    train, _, _ = training_data(stream_config(str(tmp_path / "*.tar"), "data.shuffle_buffer=3"))

    def loader(start=0, state=None):
        return StreamLoader(train.batches(3, 0, 0, 1, start, state))

    straight = take_batches(loader(), 5)
    interrupted = loader()
    take_batches(interrupted, 2)
    assert interrupted.state_dict()["cursors"]["0"]["offset"] == -1  # the shard's end
    assert same_batches(take_batches(loader(2, interrupted.state_dict()), 3), straight[2:])


def test_url_shards_are_read_through_fsspec(tmp_path):
    """A URL (here file://, read by fsspec like s3:// or hf://) reads and restarts like a path."""
    data = write_shards(tmp_path, shards=2, per_shard=6)
    urls = [f"file://{path}" for path in data.shards]
    source = open_stream(urls[0].replace("000000", "{000000..000001}"))
    assert source.shards == urls
    good, bad = read_all(source)
    assert [g.split("#")[1] for g in good] == [g.split("#")[1] for g in data.good] and len(bad) == len(data.bad)
    samples = list(source.read(urls[1]))
    assert [s.key for s in source.read(urls[1], samples[2].next)] == [s.key for s in samples[3:]]
