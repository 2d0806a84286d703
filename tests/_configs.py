"""Paths of the tiny model configs (tests/fixtures/configs): what tests pass as `--model-config` and read with
the trainers' own `resolve_config`, so a tiny model is built exactly as a user's config json would be."""

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "fixtures" / "configs"
UC2_TINY = str(CONFIGS / "uc2_tiny.json")
CCLM_TINY = str(CONFIGS / "cclm_tiny.json")
