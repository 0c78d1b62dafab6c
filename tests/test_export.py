"""`metalearn export`: the weights alone in safetensors, the config as metadata, and eval scores the file."""

import json
import re

import pytest
from safetensors import safe_open

from helpers.runs import overrides_for


def accuracy_line(out: str) -> str:
    return re.search(r"test accuracy \S+% ± \S+ \(\d+ episodes", out).group(0)


@pytest.mark.parametrize("algo", ["metasgd", "reptile"])  # learned inner rates; plain values (step) in the state
def test_an_exported_model_scores_like_its_run(cli, tiny_overrides, tmp_path, algo):
    run = tmp_path / "run"
    cli("train", *overrides_for(algo, tiny_overrides), "train.steps=2", f"hydra.run.dir={run}", cwd=tmp_path)
    out = tmp_path / "shared" / "model.safetensors"
    cli("export", f"run={run}", "checkpoint=best", f"out={out}", cwd=tmp_path)
    with safe_open(str(out), framework="pt") as handle:
        metadata, names = handle.metadata(), set(handle.keys())
    assert json.loads(metadata["config"])["algo"]["name"] == algo and metadata["checkpoint"] == "best.pt"
    assert not any(name.startswith(("optimizer", "scheduler")) for name in names)
    if algo == "metasgd":
        assert any(name.startswith("inner_lr/") for name in names)

    from_run = cli("eval", f"run={run}", cwd=tmp_path).stdout
    from_file = cli("eval", f"run={out}", cwd=tmp_path).stdout
    assert accuracy_line(from_file) == accuracy_line(from_run) and "model.safetensors)" in from_file
    (record,) = [json.loads(line) for line in (out.parent / "evals.jsonl").read_text().splitlines()]
    assert record["checkpoint"] == "model.safetensors" and record["step"] == 2


def test_export_and_eval_refuse_what_is_not_theirs(cli, tmp_path):
    (tmp_path / "not-a-run").mkdir()
    refused = cli("export", f"run={tmp_path / 'not-a-run'}", cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "is not a metalearn run folder" in refused.stderr
    stranger = tmp_path / "other.safetensors"
    stranger.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    result = cli("eval", f"run={stranger}", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "not a metalearn export" in result.stderr and "Traceback" not in result.stderr
