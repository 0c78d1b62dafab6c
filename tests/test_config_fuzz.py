"""Property-based: any override of any key, with values of wrong types or out of range, is either a run or a
one-paragraph `metalearn: error: ...`, never a traceback."""

from helpers.data import REPO
from helpers.runs import overrides_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from metalearn.config.compose import compose

ALGOS = sorted(p.stem for p in (REPO / "conf" / "algo").glob("*.yaml"))
# Where the tiny data is, and what would start another kind of command: not fuzzed.
FIXED = ("data.root", "data.split", "data.cache_dir", "resume", "_target_", "hooks", "loggers", "data.download")


def leaf_keys(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if OmegaConf.is_dict(value):
            yield from leaf_keys(value, f"{path}.")
        else:
            yield path


KEYS = sorted(
    {key for algo in ALGOS for key in leaf_keys(compose([f"algo={algo}"])) if not key.startswith(FIXED)}
    - {f"data.{k}" for k in ("root", "split", "cache_dir")}
)
# Small magnitudes keep every accepted run tiny; the rest are the values a typo or a wrong guess gives.
VALUES = st.one_of(
    st.integers(-3, 12).map(str),
    st.floats(-10, 10, allow_nan=False).map(lambda f: f"{f:.3g}"),
    st.sampled_from(["0", "-1", "0.0", "inf", "-inf", "nan", "null", "true", "false", "???", "[]", "[1,2]", "{a:1}"]),
    st.from_regex(r"[a-z_]{1,8}", fullmatch=True),
)


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same examples on every machine: a CI time that does not vary
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(algo=st.sampled_from(ALGOS), key=st.sampled_from(KEYS), value=VALUES)
def test_any_override_runs_or_is_one_paragraph_error(cli, tiny_overrides, tmp_path_factory, algo, key, value):
    run = tmp_path_factory.mktemp("fuzz") / "run"
    overrides = [*overrides_for(algo, tiny_overrides), "train.steps=2", f"{key}={value}", f"hydra.run.dir={run}"]
    result = cli("train", *overrides, cwd=run.parent, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("metalearn: error: ")]
        assert len(errors) == 1, result.stderr
