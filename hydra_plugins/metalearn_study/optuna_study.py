"""The sweeper of `hparams_search=...`: hydra-optuna-sweeper's, except that a study no trial completed ends
on one line that says where to look, not on optuna's traceback ("No trials are completed yet").

Hydra loads sweepers only from the hydra_plugins package, hence this module's place. It imports the
Optuna sweeper when a study starts, so Hydra's plugin scan works without the sweep extra.
"""

from typing import List

from hydra.plugins.sweeper import Sweeper


class OptunaStudy(Sweeper):
    def __init__(self, **settings) -> None:
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

        self.optuna = OptunaSweeper(**settings)

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.sweep_dir = config.hydra.sweep.dir
        self.optuna.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:
        from metalearn.errors import RunFailed

        try:
            return self.optuna.sweep(arguments)
        except ValueError as err:
            if "No trials are completed" not in str(err):
                raise
            raise RunFailed(
                f"metalearn: error: no trial of the study completed; each trial's train.log under "
                f"{self.sweep_dir} says why it failed."
            ) from None
