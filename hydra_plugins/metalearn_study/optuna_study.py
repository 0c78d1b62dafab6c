"""The sweeper of `hparams_search=...`: hydra-optuna-sweeper's, except that a study no trial completed ends
on one line that says where to look, not on optuna's traceback ("No trials are completed yet"), and that its
storage is opened first (study_storage): a damaged one ends on one line, and trials left running by a stopped
process are marked failed.

Hydra loads sweepers only from the hydra_plugins package, hence this module's place. It imports the
Optuna sweeper when a study starts, so Hydra's plugin scan works without the sweep extra.
"""

from hydra.plugins.sweeper import Sweeper


class OptunaStudy(Sweeper):
    def __init__(self, **settings) -> None:
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

        self.optuna = OptunaSweeper(**settings)
        self.storage, self.study_name = settings.get("storage"), settings.get("study_name")

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.sweep_dir = config.hydra.sweep.dir
        self.optuna.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        from metalearn.errors import RunFailed

        if isinstance(self.storage, str):
            from hydra_plugins.metalearn_study.study_storage import open_storage

            self.optuna.sweeper.storage = open_storage(self.storage, self.study_name)
        try:
            return self.optuna.sweep(arguments)
        except ValueError as err:
            if "Cannot overwrite study direction" in str(err):  # the name is taken by another study in the storage
                raise RunFailed(
                    f"metalearn: error: study {self.study_name} in {self.storage} optimizes in another direction "
                    f"({err}): choose another hydra.sweeper.study_name, or another hydra.sweeper.storage."
                ) from None
            if "No trials are completed" not in str(err):
                raise
            raise RunFailed(
                f"metalearn: error: no trial of the study completed; each trial's train.log under "
                f"{self.sweep_dir} says why it failed."
            ) from None
