"""The hostile-input corpus through every entry point: each file converted or skipped, counted exactly."""

import json
import warnings

import numpy as np
import pytest
from conftest import fast_config
from hostile import build_corpus, png_header_only

from latent_vae.data.images import check_header, load_image
from latent_vae.data.sources import open_source
from latent_vae.errors import ImageReadError
from latent_vae.train.loop import train


@pytest.fixture
def corpus(tmp_path):
    return build_corpus(tmp_path / "hostile")


def test_every_file_is_converted_or_skipped_with_its_reason(corpus):
    source, failures = open_source(str(corpus.root))
    reasons = {f.key: f.reason for f in failures}
    assert "symlink loop" in " ".join(reasons.values())
    file_failures = {k: v for k, v in reasons.items() if "symlink loop" not in v}
    assert set(file_failures) == set(corpus.skipped_at_scan)
    for key, fragment in corpus.skipped_at_scan.items():
        assert fragment in file_failures[key], (key, file_failures[key])
    keys = [source.key(i) for i in range(len(source))]
    assert sorted(keys) == sorted([*corpus.converted, *corpus.skipped_at_decode])
    for i, key in enumerate(keys):
        if key in corpus.skipped_at_decode:
            with pytest.raises(ImageReadError, match=corpus.skipped_at_decode[key] or None):
                source.read(i)
            continue
        image = source.read(i)
        assert image.mode == "RGB" and image.size == corpus.converted[key], key
        assert np.asarray(image).std() > 0 or key == "one_pixel.png"


def test_training_on_the_corpus_skips_and_counts_exactly(corpus, tmp_path):
    readable = len(corpus.converted) + len(corpus.skipped_at_decode)
    steps = -(-readable // 2) + 1  # batch 2: every file is drawn at least once
    summary = train(fast_config(f"data.path={corpus.root}", f"train.max_steps={steps}"), tmp_path / "run")
    assert summary.steps == steps
    listed = dict(line.split("\t", 1) for line in (tmp_path / "run" / "skipped_inputs.txt").read_text().splitlines())
    expected = set(corpus.skipped)
    assert {k for k in listed if "symlink loop" not in listed[k]} == expected
    assert summary.failed_inputs == len(expected) + 1  # + the symlink loop, reported as a folder problem


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from latent_vae.config import ModelConfig
    from latent_vae.models.loading import build_autoencoder

    folder = tmp_path_factory.mktemp("model") / "tiny-kl"
    build_autoencoder(ModelConfig(preset="tiny-kl")).save_pretrained(folder)
    return folder


def test_encode_on_the_corpus_converts_skips_and_counts_exactly(corpus, tiny_model, tmp_path):
    import datasets

    from latent_vae.encode.run import encode_dataset

    summary = encode_dataset(str(tiny_model), str(corpus.root), tmp_path / "latents", resolution=32, progress=False)
    expected_failures = set(corpus.skipped)
    assert (summary.encoded, summary.failed) == (len(corpus.converted), len(expected_failures) + 1)  # + loop
    assert summary.read == summary.encoded + summary.failed
    failures = [json.loads(line) for line in summary.failures_path.read_text().splitlines()]
    assert {f["id"] for f in failures if f["index"] is not None} == expected_failures
    assert any("symlink loop" in f["reason"] for f in failures if f["index"] is None)
    rows = datasets.load_from_disk(str(tmp_path / "latents"))
    assert sorted(rows["id"]) == sorted(corpus.converted)
    by_id = {row["id"]: row for row in rows}
    for key, size in corpus.converted.items():
        assert tuple(by_id[key]["original_size"]) in (size, size[::-1]), key  # (w, h) or (h, w) order
        assert by_id[key]["upscaled"] == (min(size) < 32), key


def test_eval_on_the_corpus_converts_skips_and_counts_exactly(corpus, tiny_model):
    from latent_vae.evaluate.evaluation import evaluate
    from latent_vae.evaluate.options import EvalOptions
    from latent_vae.models.loading import load_autoencoder

    source, scan_failures = open_source(str(corpus.root))
    result = evaluate(load_autoencoder(str(tiny_model)), source,
                      EvalOptions(resolution=32, lpips=(), fid=False, num_workers=0, progress=False),
                      failures=scan_failures)
    summary = result.summary()
    assert summary["inputs"]["evaluated"] == len(corpus.converted)
    assert summary["inputs"]["upscaled"] == sum(min(size) < 32 for size in corpus.converted.values())
    skipped = {entry["key"] for entry in summary["skipped_inputs"] if "symlink loop" not in entry["reason"]}
    assert skipped == set(corpus.skipped)
    assert sorted(row["key"] for row in result.per_image) == sorted(corpus.converted)


@pytest.mark.parametrize("row_id", ["../../etc/passwd", "/abs/path.png", "a/../../b.jpg", "..", "nested/ok.png"])
def test_ids_from_a_dataset_never_name_a_path_outside_the_output_directory(tmp_path, row_id):
    from latent_vae.encode.decode import preview_name

    name = preview_name(7, row_id)
    assert "/" not in name and not name.startswith(".")
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_a_bomb_is_refused_even_when_another_thread_reset_the_warning_filters(tmp_path, monkeypatch):
    """Warning filters are process-global: during a threaded folder scan, one thread leaving
    ``catch_warnings`` can undo another's "error" filter. The pixel limit must hold regardless."""
    path = tmp_path / "bomb_warning.png"
    path.write_bytes(png_header_only(10_000, 10_000))  # over PIL's limit, under twice it: PIL only warns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monkeypatch.setattr(warnings, "simplefilter", lambda *args, **kwargs: None)  # our filter, undone
        for read in (check_header, load_image):
            with pytest.raises(ImageReadError, match="decompression bomb"):
                read(path)
