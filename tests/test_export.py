"""`metalearn export`: the weights alone in safetensors, the config as metadata, and eval scores the file."""

import json
import re
from pathlib import Path

import pytest
from helpers.runs import overrides_for, tiny_exported_run
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def accuracy_line(out: str) -> str:
    return re.search(r"test accuracy \S+% ± \S+ \(\d+ episodes", out).group(0)


# learned inner rates; plain values (step) in the state; R2-D2's learned head; finetune's training-class mean
@pytest.mark.parametrize("algo", ["metasgd", "reptile", "r2d2", "finetune"])
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
    if algo == "r2d2":
        assert {"head/log_lambda", "head/scale", "head/bias"} <= names
    if algo == "finetune":
        assert "base_mean" in names

    from_run = cli("eval", f"run={run}", cwd=tmp_path).stdout
    # the file sets no folder, device or budget of this machine: those are given here
    here = [o for o in tiny_overrides if o.startswith(("data.root=", "data.cache_dir=", "eval.", "device"))]
    from_file = cli("eval", f"run={out}", *here, cwd=tmp_path).stdout
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


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    """A tiny MAML run and its best checkpoint exported: (run folder, the .safetensors file)."""
    return tiny_exported_run(tiny_data, tmp_path_factory.mktemp("exported"))


def rewritten(source: Path, target: Path, metadata: dict = None, drop: tuple = ()) -> Path:
    """A copy of an export with metadata entries replaced (`metadata`) or removed (`drop`)."""
    with safe_open(str(source), framework="pt") as handle:
        kept = {**handle.metadata(), **(metadata or {})}
    save_file(load_file(str(source)), str(target), metadata={k: v for k, v in kept.items() if k not in drop})
    return target


def refused(result, match: str) -> None:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert match in result.stderr, result.stderr


def test_a_shared_file_chooses_no_path_code_or_device_here(cli, exported, tiny_data, tmp_path, monkeypatch):
    """Only the keys of the model and its tasks come from a downloaded file; not where this machine writes."""
    elsewhere = tmp_path / "not-here"
    with safe_open(str(exported[1]), framework="pt") as handle:
        overrides = json.loads(handle.metadata()["overrides"])
    planted = [
        f"data.cache_dir={elsewhere / 'cache'}",
        f"data.root={elsewhere / 'root'}",
        "algo._target_=os.system",
        "device=cuda",
    ]
    shared = rewritten(exported[1], tmp_path / "shared.safetensors", {"overrides": json.dumps(overrides + planted)})
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "my-cache"))
    result = cli("eval", f"run={shared}", f"data.root={tiny_data['root']}", cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    assert not elsewhere.exists() and any((tmp_path / "my-cache").iterdir())
    note = next(line for line in result.stderr.splitlines() if line.startswith("metalearn: note:"))
    for key in ("data.cache_dir", "data.root", "algo._target_", "device"):
        assert key in note
    assert "algo=" not in note and "task.queries" not in note and "model.hidden" not in note


def test_only_the_keys_of_the_model_and_its_tasks_come_from_a_file():
    from metalearn.export.format import model_override

    kept = [
        "algo=maml",
        "experiment=maml_omniglot_5w1s",
        "task.ways=3",
        "+task.train.queries=1",
        "algo.inner_lr=0.1",
        "model.hidden=8",
        "data=folder",
        "data.split=vinyals",
        "data.classes.test=[5,6]",
        "data.image_size=32",
        "data.ways=3",  # an old name of task.ways
        "seed=2",
    ]
    dropped = [
        "data.root=/data",
        "data.cache_dir=/anywhere",
        "data.download=true",
        "data._target_=os.system",
        "algo._target_=os.system",
        "algo.schedule={_target_:os.system}",
        "model.hidden=${oc.env:HOME}",
        "algo=../../elsewhere",
        "hydra.searchpath=[file:///x]",
        "hydra.run.dir=/x",
        "logger=mlflow",
        "loggers.mlflow.tracking_uri=http://x",
        "+hooks.mine._target_=x.Y",
        "hparams_search=maml",
        "device=cuda",
        "device.name=cuda",
        "train.steps=9",
        "eval.episodes=100000",
        "resume=/x",
        "data@_global_=omniglot",
        "",
    ]
    assert [o for o in kept + dropped if model_override(o)] == kept


@pytest.mark.parametrize("out", ["folder", "new-folder/"])
def test_export_into_a_folder_writes_the_checkpoint_there(cli, exported, tmp_path, out):
    run, _ = exported
    (tmp_path / "folder").mkdir()
    result = cli("export", f"run={run}", f"out={tmp_path}/{out}", cwd=tmp_path)
    written = tmp_path / out / "best.safetensors"
    assert written.is_file() and f"to {written}" in result.stdout
    assert [p.name for p in written.parent.iterdir()] == ["best.safetensors"]  # no temporary left


def test_export_where_nothing_can_be_written_is_one_error(cli, exported, tmp_path):
    run, _ = exported
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    refused(cli("export", f"run={run}", f"out={a_file}/model.safetensors", cwd=tmp_path, check=False), "a-file")
    if Path("/proc/self").is_dir():  # a folder no one may create files in, not even root
        result = cli("export", f"run={run}", "out=/proc/model.safetensors", cwd=tmp_path, check=False)
        refused(result, "could not write /proc/model.safetensors")


@pytest.mark.parametrize(
    "metadata, drop, match",
    [
        ({}, ("overrides",), "has no overrides"),
        ({}, ("step", "values"), "has no values, step"),
        ({"step": "two"}, (), "'step' is 'two', not a count"),
        ({"values": "[1, 2]"}, (), "'values' is not a JSON object"),
        ({"config": "{not json"}, (), "'config' is not JSON"),
        ({"overrides": '["task.ways=5", 3]'}, (), "'overrides' is not a list of strings"),
        ({"values": '{"inner_lr": 5}'}, (), "does not fit this configuration"),
        ({"values": '{"model": 5}'}, (), "holds 'model' twice"),
        ({"values": '{"model/features.0.0.bias": 5}'}, (), "holds 'model/features.0.0.bias' twice"),
        ({"values": '{"model/features.0.0.bias/x": 5}'}, (), "holds 'model/features.0.0.bias/x' under a value"),
        ({"values": '{"model/extra": 5}'}, (), "its model weights (model/<parameter>) are missing or not all tensors"),
    ],
)
def test_an_export_without_its_entries_is_one_error(cli, exported, tiny_data, tmp_path, metadata, drop, match):
    damaged = rewritten(exported[1], tmp_path / "damaged.safetensors", metadata, drop)
    result = cli("eval", f"run={damaged}", f"data.root={tiny_data['root']}", cwd=tmp_path, check=False)
    refused(result, match)
    assert str(damaged) in result.stderr


def test_an_export_that_fails_while_writing_keeps_the_file_there(cli, exported, tmp_path, monkeypatch):
    import safetensors.torch

    run, _ = exported
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"the export made before")

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    refused(cli("export", f"run={run}", f"out={out}", cwd=tmp_path, check=False), "No space left on device")
    assert out.read_bytes() == b"the export made before" and [p.name for p in tmp_path.iterdir()] == [out.name]
