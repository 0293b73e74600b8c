"""The hostile-input corpus through every entry point: each file converted or skipped, counted exactly."""

import numpy as np
import pytest
from PIL import Image

from conftest import fast_config
from hostile import build_corpus
from latent_vae.data import open_source
from latent_vae.images import ImageReadError
from latent_vae.training import train


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
            with pytest.raises(ImageReadError, match=corpus.skipped_at_decode[key]):
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
