"""Property-based: a checkpoint or an exported file that is damaged, or holds something else than metalearn
wrote, either still works or ends in one `metalearn: error:` line, never a traceback.

Checkpoints go through `metalearn eval`, `metalearn export` and `metalearn train resume=`; exported files
through `metalearn eval run=<file>`.
"""

import io
import json
import shutil

import pytest
import torch
from helpers.cli import metalearn_in_process
from helpers.runs import tiny_exported_run
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

FUZZ = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,  # the same examples on every machine
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A finished tiny MAML run, its best checkpoint exported, and the overrides that find the tiny data."""
    base = tmp_path_factory.mktemp("files")
    data = [f"data.root={tiny_data['root']}", f"data.cache_dir={tiny_data['cache']}"]
    # what an exported file leaves to the machine that scores it: its data, and a tiny evaluation
    here = [*data, "eval.episodes=1", "device=cpu"]
    run, exported = tiny_exported_run(tiny_data, base)
    return {"run": run, "export": exported, "here": here}


def works_or_one_error_line(result) -> None:
    event("works" if result.returncode == 0 else "refused")  # pytest --hypothesis-show-statistics
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("metalearn: error: ")]
        assert len(errors) == 1, result.stderr


def pickled(payload) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


# Values of the wrong kind for any entry: what a hand-made or foreign file holds.
WRONG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 3),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.sampled_from(["model", "step", "x"]), st.integers(0, 3), max_size=2),
    st.sampled_from([(2, 3), (5056,), (0,)]).map(lambda shape: torch.zeros(shape, dtype=torch.uint8)),
    st.sampled_from([(2, 3), (4,)]).map(torch.ones),
)
# Entries of a checkpoint to remove or replace, nested ones as paths.
ENTRIES = [
    ("step",),
    ("algo",),
    ("algo", "model"),
    ("algo", "model", "features.0.0.weight"),
    ("algo", "inner_lr"),
    ("sampler",),
    ("sampler", "next_episode"),
    ("sampler", "generator"),
    ("sampler", "replay_buffer"),
    ("torch_rng",),
    ("best_val_accuracy",),
    ("window",),
    ("window", "steps"),
    ("train_classes",),
    ("config",),
    ("kept_best",),
    ("hooks",),
    ("format",),
    ("version",),
]


REMOVED = object()  # a change that removes the entry


def changed(payload: dict, changes) -> dict:
    """A copy of a checkpoint payload with entries (paths) replaced, or removed (REMOVED), at any depth."""
    payload = {k: dict(v) if isinstance(v, dict) else v for k, v in payload.items()}
    payload["algo"] = {**payload["algo"], "model": dict(payload["algo"]["model"])}
    for path, value in changes:
        node = payload
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if value is REMOVED:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return payload


def checkpoint_bytes(real: bytes, payload: dict):
    """Random bytes or a truncated real checkpoint, a foreign pickle, or the real payload with entries changed."""
    change = st.tuples(st.sampled_from(ENTRIES), st.one_of(st.just(REMOVED), WRONG))
    return st.one_of(
        st.one_of(st.binary(max_size=300), st.integers(0, len(real) - 1).map(lambda n: real[:n])),
        st.one_of(WRONG, st.lists(WRONG, max_size=3)).map(pickled),
        st.lists(change, min_size=1, max_size=2).map(lambda changes: pickled(changed(payload, changes))),
    )


def real_checkpoint(run):
    path = run / "checkpoints" / "best.pt"
    return path.read_bytes(), torch.load(path, weights_only=True)


@FUZZ
@given(data=st.data(), command=st.sampled_from(["eval", "export", "resume"]))
def test_any_checkpoint_works_or_is_one_error_line(trained, tmp_path_factory, data, command):
    real, payload = real_checkpoint(trained["run"])
    content = data.draw(checkpoint_bytes(real, payload))
    run = tmp_path_factory.mktemp("checkpoint") / "run"
    shutil.copytree(trained["run"], run)
    which = "last" if command == "resume" else "best"
    (run / "checkpoints" / f"{which}.pt").write_bytes(content)
    if command == "eval":
        args = ["eval", f"run={run}"]
    elif command == "export":
        args = ["export", f"run={run}", f"out={run.parent}"]
    else:
        args = ["train", f"resume={run}"]
    works_or_one_error_line(metalearn_in_process(*args, cwd=run.parent, check=False))


JSON_OF_ANY_KIND = st.one_of(
    st.none(), st.integers(-2, 3), st.text(max_size=4), st.lists(st.integers(0, 3), max_size=2), st.just({})
).map(json.dumps)
# A weight of another shape or kind than the model's.
OTHER_TENSORS = st.builds(
    torch.zeros,
    st.sampled_from([(3,), (0,), (1, 2, 3)]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool, torch.complex64]),
)
ENTRY_NAMES = ["format", "version", "config", "overrides", "values", "step", "train_classes"]


def export_bytes(real: bytes, metadata: dict, tensors: dict):
    """Random bytes, a truncated export, or a sound safetensors file with metadata entries missing or replaced."""
    names = st.sampled_from(ENTRY_NAMES)
    entry_values = st.one_of(JSON_OF_ANY_KIND, st.text(max_size=6), st.sampled_from(['{"model": 1}', "[1]", "-1"]))

    def with_metadata(dropped, replaced, weights):
        kept = {k: v for k, v in {**metadata, **replaced}.items() if k not in dropped}
        return save({**tensors, **weights}, metadata=kept)

    return st.one_of(
        st.binary(max_size=300),
        st.integers(0, len(real) - 1).map(lambda n: real[:n]),
        st.builds(
            with_metadata,
            st.sets(names, max_size=2),
            st.dictionaries(names, entry_values, max_size=2),
            st.dictionaries(st.sampled_from(sorted(tensors)), OTHER_TENSORS, max_size=1),
        ),
    )


@FUZZ
@given(data=st.data())
def test_any_exported_file_works_or_is_one_error_line(trained, tmp_path_factory, data):
    real = trained["export"].read_bytes()
    with safe_open(str(trained["export"]), framework="pt") as handle:
        metadata = handle.metadata()
    content = data.draw(export_bytes(real, metadata, load_file(str(trained["export"]))))
    shared = tmp_path_factory.mktemp("export") / "model.safetensors"
    shared.write_bytes(content)
    result = metalearn_in_process("eval", f"run={shared}", *trained["here"], cwd=shared.parent, check=False)
    works_or_one_error_line(result)


def test_a_checkpoint_without_an_entry_names_it(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    _, payload = real_checkpoint(run)
    torch.save(changed(payload, [(("step",), REMOVED), (("window",), [1])]), run / "checkpoints" / "best.pt")
    for args in (["eval", f"run={run}"], ["export", f"run={run}"]):
        result = metalearn_in_process(*args, cwd=tmp_path, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert "best.pt is a damaged metalearn checkpoint: no step (a count); its window is not" in result.stderr


@pytest.mark.parametrize(
    "command, entry, value, problem",
    [
        ("resume", ("torch_rng",), torch.zeros(3, dtype=torch.uint8), "its torch_rng is not torch's random state"),
        ("resume", ("window",), {}, "its window is not the metrics window"),
        ("resume", ("sampler", "generator"), torch.zeros(5056), "its sampler's generator is not a random state"),
        ("resume", ("sampler", "next_episode"), "seven", "its sampler's next_episode is not a count"),
        ("resume", ("step",), "1", "its step is not a count"),
        ("top1", ("kept_best",), [5], "its kept_best is not a list of {step, val_accuracy}"),
        ("eval", ("step",), -1, "its step is not a count"),
    ],
)
def test_a_checkpoint_entry_of_the_wrong_kind_is_one_error(trained, tmp_path, command, entry, value, problem):
    """Each is a traceback where the entry is used (resume: training one more step), unless refused on load."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    _, payload = real_checkpoint(run)
    which = "last" if command == "resume" else "best"
    torch.save(changed(payload, [(entry, value)]), run / "checkpoints" / f"{which}.pt")
    args = {
        "resume": ["train", f"resume={run}", "train.steps=2"],
        "top1": ["eval", f"run={run}", "checkpoint=top1"],
        "eval": ["eval", f"run={run}"],
    }[command]
    result = metalearn_in_process(*args, cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{which}.pt is a damaged metalearn checkpoint: {problem}" in result.stderr


def test_an_export_rewritten_with_its_own_tensors_still_works(trained, tmp_path):
    """The fuzzing above rewrites exports this way: a sound rewrite must still score."""
    shared = tmp_path / "model.safetensors"
    with safe_open(str(trained["export"]), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(load_file(str(trained["export"])), str(shared), metadata=metadata)
    result = metalearn_in_process("eval", f"run={shared}", *trained["here"], cwd=tmp_path, check=False)
    assert result.returncode == 0 and "test accuracy" in result.stdout, result.stderr


@pytest.mark.parametrize("entry, value", [(("algo", "optimizer"), []), (("algo", "inner_lr"), 5)])
def test_a_resume_whose_training_state_does_not_fit_is_one_error(trained, tmp_path, entry, value):
    """The weights fit, the optimizer or learned state does not: the file and the mismatch are named."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    _, payload = real_checkpoint(run)
    if entry[-1] not in payload["algo"]:
        pytest.skip(f"this algorithm's state has no {entry[-1]}")
    torch.save(changed(payload, [(entry, value)]), run / "checkpoints" / "last.pt")
    result = metalearn_in_process("train", f"resume={run}", "train.steps=2", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "last.pt does not fit this configuration" in result.stderr
