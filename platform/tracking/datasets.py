"""The run's prompt sets as MLflow dataset inputs (context Training and Evaluation), logged once per run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

from ..prompt_files import REMOTE_PROMPT_SETS, cache_dir, prompt_path, read_prompt_file


@dataclass(frozen=True)
class PromptSet:
    """A list of prompts a run uses, logged as one of its MLflow dataset inputs."""

    context: str  # "training" or "evaluation" (MLflow's mlflow.data.context tag)
    name: str  # the prompt file's name, or the config key that lists them
    source: str  # the file's path or public URL, or "config" for a list in the config
    prompts: tuple[str, ...]


def prompt_sets(cfg) -> list[PromptSet]:
    """The training and held-out prompt sets of a run config, as the driver reads them (files are
    read now; a public set's source is its URL, its text the cached copy). Call after
    `check_paths`, which fetches public sets and makes relative paths absolute."""
    tr, sets = cfg.trainer, []
    for context, key, prompts, file in (("training", "trainer.prompts", tr.prompts, tr.prompt_file),
                                        ("evaluation", "trainer.eval_prompts", tr.eval_prompts, tr.eval_prompt_file),
                                        ("validation", "trainer.val_prompts", tr.val_prompts, tr.val_prompt_file)):
        if prompts:
            sets.append(PromptSet(context, key, "config", tuple(prompts)))
        elif file:
            field_name = key.replace("prompts", "prompt_file")
            path = prompt_path(file, field_name)
            fetched = file in REMOTE_PROMPT_SETS and path == cache_dir() / file
            source = REMOTE_PROMPT_SETS[file][0] if fetched else str(path)
            sets.append(PromptSet(context, path.name, source, tuple(read_prompt_file(file, field_name))))
    return sets


def log_prompt_sets(client, run_id: str, sets: Sequence[PromptSet]) -> None:
    """Log each prompt set as a dataset input (one `prompt` column) unless the run already has it:
    a resumed run reopens the same MLflow run, and MLflow would list a second copy."""
    if not sets:
        return
    import mlflow.data
    import pandas as pd
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_SOURCE_NAME

    def context(inp) -> Optional[str]:
        return next((t.value for t in inp.tags if t.key == MLFLOW_DATASET_CONTEXT), None)

    run = client.get_run(run_id)
    have = {(i.dataset.name, i.dataset.digest, context(i)) for i in (run.inputs.dataset_inputs if run.inputs else [])}
    new = []
    for item in sets:
        from_config = CodeDatasetSource({MLFLOW_SOURCE_NAME: f"run config: {item.name}"})
        source = from_config if item.source == "config" else item.source
        with warnings.catch_warnings():  # MLflow's own: a local path "can be interpreted in multiple ways"
            warnings.simplefilter("ignore")  # (both of them LocalArtifactDatasetSource), pandas 4 deprecations
            dataset = mlflow.data.from_pandas(pd.DataFrame({"prompt": list(item.prompts)}), source=source,
                                              name=item.name)
        if (dataset.name, dataset.digest, item.context) not in have:
            new.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, item.context)]))
    if new:
        _log_inputs(client, run_id, new)


def _log_inputs(client, run_id: str, inputs: list, tries: int = 3) -> None:
    """`client.log_inputs`, retried when a concurrent run won the race to create the same dataset row:
    MLflow's store looks a dataset up, then inserts it, so two sweep trials logging the same prompt set
    into one experiment at once can fail with a UNIQUE constraint; on the retry the row exists."""
    from mlflow.exceptions import MlflowException

    for attempt in range(tries):
        try:
            return client.log_inputs(run_id, datasets=inputs)
        except MlflowException as err:
            if attempt == tries - 1 or "UNIQUE constraint" not in str(err):
                raise
