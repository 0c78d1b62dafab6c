"""The configuration: schemas of the run's keys (schema) and of components (settings), composition
(compose), checks (validate) and the renamed keys old runs still use (migrate)."""
