"""The README's quickstart is what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.strip().splitlines()]


def test_quickstart_has_exactly_two_commands_and_ci_runs_the_second():
    train, test = quickstart_commands()
    assert train == "pip install -e . && latent-vae train"
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines()


def test_the_configuration_reference_states_what_a_run_without_config_adds():
    from latent_vae.config import QUICKSTART

    reference = " ".join((ROOT / "README.md").read_text().split("## Configuration reference", 1)[1].split())
    assert " ".join(QUICKSTART) in reference
