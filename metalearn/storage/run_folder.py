"""Run folders: refusing to overwrite one, and composing a run's config again from its saved overrides.

`metalearn train resume=<run>` and `metalearn eval run=<run>` replay the
overrides a run was started with (.hydra/overrides.yaml) before the new ones,
so the run's own config is composed again and any override given now wins.
"""

import os
import shutil
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from metalearn.config.migrate import migrate
from metalearn.errors import MetalearnError
from metalearn.export.format import exported_overrides, is_export
from metalearn.storage.atomic import atomic_text
from metalearn.storage.checkpoint import NEXT_BEST, checkpoint_path


def refuse_existing_run(run_dir: Path) -> None:
    """A new run never lands in a folder that already holds one."""
    if checkpoint_path(run_dir, "last").exists():
        raise MetalearnError(
            f"{run_dir} already holds a run (checkpoints/last.pt). Continue it with "
            f"`metalearn train resume={run_dir}`, or choose another hydra.run.dir."
        )


# Settings a run may go on with changed (as with resume=): how long it trains, where it runs and logs.
MAY_DIFFER = ("resume", "existing_run", "train.steps", "train.max_minutes", "device", "loggers", "hooks", "eval")


def finishes_existing_run(cfg, run_dir: Path, in_sweep: bool) -> bool:
    """Whether this run goes on from the last.pt its folder holds (existing_run=resume, or auto in a sweep): a
    sweep run again into its folder, a requeued job. The folder must hold this run: the same settings but those
    a resume may change; another run's folder is an error, and its record (.hydra) is put back as it was."""
    from omegaconf import OmegaConf

    from metalearn.storage.checkpoint import load_checkpoint

    mode = cfg.get("existing_run", "auto")
    if mode == "auto":
        mode = "resume" if in_sweep else "refuse"
    last = checkpoint_path(run_dir, "last")
    if mode != "resume" or not last.exists():
        return False
    saved = load_checkpoint(last)
    now = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    differ = config_differences(saved["config"], now)
    if differ:
        restore_record(Path(run_dir), saved)
        raise MetalearnError(
            f"{run_dir} already holds another run ({'; '.join(differ[:3])}): nothing was changed. Give this one "
            f"another folder (hydra.sweep.dir, hydra.run.dir), or continue that one with "
            f"`metalearn train resume={run_dir}`."
        )
    return True


def config_differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """`key: saved -> now` for each setting that differs, but those a resume may change (MAY_DIFFER)."""
    found = []
    for key in sorted(set(saved) | set(now)):
        name = f"{prefix}{key}"
        if name in MAY_DIFFER or name.startswith(PORTABLE_DATA_KEYS):
            continue
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += config_differences(old, new, f"{name}.")
        elif old != new:
            found.append(f"{name}: {old} there, {new} here")
    return found


def restore_record(run_dir: Path, saved: dict) -> None:
    """.hydra/config.yaml and overrides.yaml as the checkpoint knows them: Hydra rewrote them for a sweep's job
    before the job could see whose folder it is."""
    record = run_dir / ".hydra"
    atomic_text(record / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(saved["config"])))
    if isinstance(saved.get("overrides"), list):
        atomic_text(record / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(saved["overrides"])))


# What a run holds before its first step: Hydra's record, the log, and the lock of the process that runs it.
UNSTARTED_RUN = {".hydra", "train.log", ".lock"}
# The longest name of one folder on most filesystems (bytes), where the filesystem does not say.
NAME_MAX = 255


class NewRunFolder:
    """The folder of a new run, and what of it existed before: a run refused before it started leaves the
    folder as it was, the parent folders made for it included, and nothing that existed before is removed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.made = [p for p in (self.folder, *self.folder.parents) if not p.exists()]  # the deepest first
        self.before = {p.name for p in self.folder.iterdir()} if self.folder.is_dir() else set()
        self.owned = False  # set once this process holds the folder's lock: until then, others may write there

    def discard(self) -> None:
        if self.owned and self.folder.is_dir():
            added = {p.name for p in self.folder.iterdir()} - self.before
            if not added <= UNSTARTED_RUN:
                return  # the run started: keep all of it
            for name in added:
                path = self.folder / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        for folder in self.made:
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                return  # it holds something of another process's: it and its parents stay


def refuse_long_names(folder: Path) -> None:
    """A folder name the filesystem cannot take is refused by name, not by a traceback from mkdir."""
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), Path("/"))
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = NAME_MAX
    for part in folder.parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise MetalearnError(
                f"the run folder name {part[:60]}... is {size} bytes, more than the {limit} a folder name can "
                f"have here. Nothing was made; choose a shorter hydra.run.dir (with ${{hydra.job.override_dirname}}, "
                f"leave keys out of it with hydra.job.config.override_dirname.exclude_keys=[data.root,...])."
            )


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def find_override(args: list[str], key: str):
    values = [a.split("=", 1)[1] for a in args if "=" in a and override_key(a) == key]
    return values[-1] if values else None


# Keys that mean the same for every dataset; the others (data.split,
# data.classes) belong to one dataset and are not carried to another.
PORTABLE_DATA_KEYS = ("data.root", "data.cache_dir", "data.download")
# Hydra's own overrides a run needs again to compose its config: where its plugin YAMLs are.
REPLAYED_HYDRA_KEYS = ("hydra.searchpath",)


def saved_overrides(run_dir: str) -> list[str]:
    """The overrides a run was started with, renamed keys migrated, or an error if the folder is not a run.

    The config search path the run was started with (hydra.searchpath) comes along too.
    """
    if is_export(run_dir):  # a file `metalearn export` wrote keeps its run's overrides
        return migrate(exported_overrides(Path(run_dir)))
    folder = Path(run_dir)
    saved_path = folder / ".hydra" / "overrides.yaml"
    if not folder.is_dir():
        raise MetalearnError(f"run folder {folder} does not exist.")
    if not saved_path.is_file():
        raise MetalearnError(
            f"{folder} is not a metalearn run folder: it has no .hydra/overrides.yaml "
            f"(give the folder that `metalearn train` printed at the end)."
        )
    saved = written_overrides(OmegaConf.load(saved_path))
    hydra_record = folder / ".hydra" / "hydra.yaml"
    if hydra_record.is_file():
        hydra_overrides = written_overrides(OmegaConf.load(hydra_record).hydra.overrides.get("hydra", []))
        saved += [o for o in hydra_overrides if override_key(o) in REPLAYED_HYDRA_KEYS]
    return migrate(saved)


def written_overrides(overrides) -> list[str]:
    """Saved overrides as written: `hydra.run.dir=runs/${seed}` is text to replay, not an interpolation to resolve."""
    return [str(o) for o in OmegaConf.to_container(OmegaConf.create(overrides), resolve=False)]


def replay_run_overrides(run_dir: str, args: list[str], drop: tuple) -> list[str]:
    """The run's saved task overrides, then `args`; a key given in `args` wins.

    Switching dataset (`data=mnist` on an Omniglot run) keeps the run's task
    shape and data folders but not its dataset-specific keys.
    """
    saved = saved_overrides(run_dir)
    if find_override(args, "data") is not None:
        saved = [o for o in saved if not override_key(o).startswith("data.") or override_key(o) in PORTABLE_DATA_KEYS]
    merged: dict[str, str] = {}
    for override in saved + [a for a in args if "=" in a and not a.startswith("-")]:
        key = override_key(override)
        if key not in drop and (not key.startswith("hydra.") or key in REPLAYED_HYDRA_KEYS):
            merged.pop(key, None)
            merged[key] = override
    flags = [a for a in args if "=" not in a or a.startswith("-")]
    hydra_args = [
        a
        for a in args
        if "=" in a and override_key(a).startswith("hydra.") and override_key(a) not in REPLAYED_HYDRA_KEYS
    ]
    return flags + list(merged.values()) + hydra_args


def run_list(value: str) -> list[str]:
    """`run=<folder>` or `run=[<folder>,<folder>,...]` as a list of folders."""
    value = value.strip()
    if not (value.startswith("[") and value.endswith("]")):
        return [value.strip("'\"")]
    members = [m.strip().strip("'\"") for m in value[1:-1].split(",") if m.strip()]
    if not members:
        raise MetalearnError("run=[] names no run folder: give one folder, or several as run=[a,b,c].")
    return members


def record_resume(run_dir: Path, overrides: list[str], config: dict, step: int) -> None:
    """A resume was accepted: the run's record becomes the overrides it now runs with, and the resume is logged.

    .hydra/overrides.yaml and config.yaml are replaced atomically; .hydra/resumes.yaml keeps every resume
    (when, from which step, with which overrides and which of them changed).
    """
    record = Path(run_dir) / ".hydra"
    kept = [o for o in overrides if override_key(o) not in ("resume",) and not override_key(o).startswith("hydra.")]
    before = saved_overrides(str(run_dir)) if (record / "overrides.yaml").is_file() else []
    changed = [o for o in kept if o not in before]
    history = OmegaConf.load(record / "resumes.yaml") if (record / "resumes.yaml").is_file() else OmegaConf.create([])
    entry = {"time": datetime.now().isoformat(timespec="seconds"), "from_step": step, "changed": changed}
    atomic_text(record / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(kept)))
    atomic_text(record / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    atomic_text(record / "resumes.yaml", OmegaConf.to_yaml(OmegaConf.create([*history, {**entry, "overrides": kept}])))


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Half-written checkpoints left by a process killed while writing (.<name>.pt.<pid>.tmp)."""
    folder = Path(run_dir) / "checkpoints"
    stale = sorted([*folder.glob(".*.tmp"), *(folder / NEXT_BEST).glob(".*.tmp")])
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
