"""A mistake on the command line is one line naming it, exit 2, whatever the launcher; a key
outside the schema is refused with or without `+` (Hydra itself adds a `+key` silently)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from dsl_dist.config import ConfigError
from dsl_dist.config.compose import compose_job


@pytest.mark.parametrize("override", ["train.epoch=1", "+train.epoch=1"])
def test_a_typo_is_refused_naming_the_nearest_key(override: str) -> None:
    with pytest.raises(ConfigError) as refused:
        compose_job([override])
    assert str(refused.value) == ("unknown config key 'train.epoch' "
                                  "(did you mean 'train.epochs'?)")


def test_known_keys_compose() -> None:
    assert compose_job(["train.epochs=3"]).train.epochs == 3


@pytest.mark.parametrize("launcher", [["-m", "dsl_dist.commands", "train", "--nproc", "2"],
                                      ["-m", "dsl_dist.train"]])
def test_every_launcher_reports_a_typo_in_one_line_with_exit_2(launcher: list[str]) -> None:
    done = subprocess.run([sys.executable, *launcher, "+train.epoch=1"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "'train.epoch'" in lines[0] and "train.epochs" in lines[0], lines
