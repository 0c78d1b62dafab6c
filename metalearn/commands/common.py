"""What every command shares: errors as one line, the config composed once, the run folder it resolves."""

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from metalearn.config.compose import compose
from metalearn.errors import MetalearnError, RunFailed

CONFIG_PATH = "pkg://metalearn.conf"
HELP_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "-c")


def has_flags(args: list[str]) -> bool:
    """Hydra's own flags (--help, --cfg, -m ...): answered by Hydra, not prepared here."""
    return any(a.startswith("-") for a in args)


def fail(message: str, code: int = 1) -> None:
    if in_sweep():
        fail_sweep_run(message)
    print(f"metalearn: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def fail_sweep_run(message: str) -> None:
    """One run of a sweep failed: its log says why, and the sweep goes on (an exception, not an exit)."""
    import logging

    from hydra.core.hydra_config import HydraConfig

    logging.getLogger("metalearn").error(message)
    raise RunFailed(f"metalearn: error: run {HydraConfig.get().runtime.output_dir} failed: {message}")


def _out_of_memory(err: BaseException) -> bool:
    import torch

    text = str(err)
    return (
        isinstance(err, getattr(torch, "OutOfMemoryError", ()))
        or "can't allocate memory" in text
        or ("out of memory" in text.lower())
    )


def user_errors_exit(task: Callable[[DictConfig], object]) -> Callable[[DictConfig], object]:
    """A MetalearnError ends the command with its message, not a traceback."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig):
        try:
            return task(cfg)
        except RunFailed:
            raise
        except MetalearnError as err:
            fail(str(err))
        except OSError as err:  # a file that cannot be read or written: say which and why, not a traceback
            where = f" {err.filename}" if err.filename else ""
            fail(f"could not access{where}: {err.strerror or err}. Nothing already saved was changed.")
        except (MemoryError, RuntimeError) as err:
            if not isinstance(err, MemoryError) and not _out_of_memory(err):
                raise
            fail(
                f"out of memory ({one_paragraph(err)[:300]}). Nothing already saved was changed: choose smaller "
                f"settings (train.meta_batch_size, task.ways, eval.batch_size, a smaller model: model.hidden or "
                f"model.channels); for MAML, first order (algo.first_order=true) or fewer algo.inner_steps; "
                f"or another device."
            )

    return wrapper


_DETAIL = (
    "full_key:",
    "reference_type=",
    "object_type=",
    "Set the environment variable HYDRA_FULL_ERROR",
    "Config search path",
    "provider=",
)


def one_paragraph(err: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages (and their causes) as one line, without the internals."""
    lines = []
    while err is not None:
        lines += [
            line.strip() for line in str(err).splitlines() if line.strip() and not line.strip().startswith(_DETAIL)
        ]
        err = err.__cause__
    return " ".join(dict.fromkeys(lines)).rstrip(".") + "."


def composed(args: list[str], config_name: str) -> DictConfig:
    """The command's config with its `hydra` node, composed once before Hydra runs; a bad override is an error."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose(args, config_name, with_hydra=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise MetalearnError(one_paragraph(err)) from None


def resolved_run_dir(cfg: DictConfig) -> Path:
    """hydra.run.dir with its interpolations (${now:...}, ${algo.name}, ${hydra:...}) resolved as Hydra
    resolves them, once: the folder is then given to Hydra as it is, so a second cannot tick over."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import OmegaConfBaseException

    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    try:
        hydra_config.set_config(cfg)  # for ${hydra:...}, as Hydra's run_job does
        return Path(os.path.abspath(str(OmegaConf.select(cfg, "hydra.run.dir"))))
    except OmegaConfBaseException as err:
        given = OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]
        raise MetalearnError(f"hydra.run.dir={given} cannot be resolved: {one_paragraph(err)}") from None
    finally:
        hydra_config.cfg = previous


def main_process() -> bool:
    """Rank 0 of a run on several processes (torchrun), or the one process: the one that writes the run folder."""
    from metalearn.distributed import from_environment

    return from_environment().main
