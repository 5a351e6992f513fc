"""What a run shows in MLflow: captioned, upscaled evaluation grids under readable names; MLflow's
user/source/git tags; the prompt sets as dataset inputs (once); the experiment's model-training kind.
Fast (no Ray): one sqlite store for the module. The look in a browser: `tests/ui_check.py`."""

from __future__ import annotations

import getpass
import subprocess

import numpy as np
import pytest
import torch

from alignprop.platform.tracking import PromptSet, Tracker, image_grid, open_run, prompt_sets
from alignprop.platform.tracking.runs import EXPERIMENT_KIND_TAG, TRAINING_KIND
from alignprop.platform.tracking.tracker import TILE_PX, _wrap
from conftest import REPO


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(autouse=True)
def artifacts_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a new experiment's artifacts go to ./mlruns of the cwd


def _dark_pixels(region: np.ndarray) -> int:
    return int((region.max(axis=-1) < 128).sum())


def test_image_grid_upscales_tiles_nearest_and_writes_each_prompt_under_its_tile():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grid = image_grid(images, ["a cat", "a horse", "a whale", "a bee"], min_tile=TILE_PX, gap=4)
    plain = image_grid(images, min_tile=TILE_PX, gap=4)
    tile = TILE_PX
    assert tile >= 256 and plain.shape == (tile, 4 * tile + 3 * 4, 3)  # 4 px gaps between tiles
    assert grid.shape[0] > tile and grid.shape[1] == plain.shape[1]  # a caption band under the row
    first = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(grid[:tile, :tile], first.repeat(tile // 32, axis=0).repeat(tile // 32, axis=1))
    for i in range(4):  # text (dark pixels on white) under every tile
        assert _dark_pixels(grid[tile:, i * (tile + 4):i * (tile + 4) + tile]) > 20
    big = image_grid(torch.rand(2, 3, 512, 512), ["x", "y"], min_tile=TILE_PX)
    assert big.shape[1] == 2 * 512  # already large enough: not scaled
    assert image_grid(images).shape == (32, 4 * 32, 3)  # the defaults: as sampled, side by side


def test_long_prompts_wrap_to_three_lines_within_the_tile():
    from PIL import ImageFont

    font = ImageFont.load_default(size=18)
    text = "a watercolour painting of a very small bee sitting on a large yellow sunflower at dawn, " * 3
    lines = _wrap(text + "supercalifragilisticexpialidociousandevenlonger", font, 248, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= 248 for line in lines)
    assert _wrap("a photo of a cat", font, 248, max_lines=3) == ["a photo of a cat"]
    # a word wider than a line is cut
    assert all(font.getlength(x) <= 100 for x in _wrap("x" * 80, font, 100, max_lines=9))


def test_eval_grid_is_the_artifact_eval_samples_step_n_with_no_internal_image_log(uri):
    from mlflow import MlflowClient

    run_id = open_run(uri, "readable-images", "img-run", {"a": 1}, "name: x\n")
    tracker = Tracker(uri, run_id, enabled=True)
    for step in (10, 2):
        tracker.log_image(torch.rand(2, 3, 32, 32), "eval/samples", step, captions=["a cat", "a dog"])
    client = MlflowClient(uri)
    names = sorted(f.path for f in client.list_artifacts(run_id, "eval/samples"))  # by name, as the UI's tree
    assert names == ["eval/samples/step_0002.png", "eval/samples/step_0010.png"], "names sort in step order"
    # no key/step image log (its UI card is covered by params)
    assert "images" not in [f.path for f in client.list_artifacts(run_id)]
    from PIL import Image

    with Image.open(client.download_artifacts(run_id, "eval/samples/step_0002.png")) as png:
        assert png.width == 2 * TILE_PX + 4 and png.height > TILE_PX


def test_a_new_run_carries_user_source_and_git_commit_and_the_experiment_the_training_kind(uri, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setattr("sys.argv", ["/somewhere/.venv/bin/alignprop", "train", "--config", "tiny-cpu",
                                     "trainer.eval_prompts=[a cat, a dog]"])
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    run_id = open_run(uri, "readable-tags", "tag-run", {"a": 1}, "name: x\n")
    client = MlflowClient(uri)
    tags = client.get_run(run_id).data.tags
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.name"] == "alignprop train"  # the UI shows a LOCAL source's last path part
    assert tags["alignprop.command"] == "alignprop train --config tiny-cpu 'trainer.eval_prompts=[a cat, a dog]'"
    assert tags["mlflow.source.type"] == "LOCAL"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # the suite runs from a git checkout (CI): the code's commit
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    else:
        assert "mlflow.source.git.commit" not in tags
    assert client.get_experiment_by_name("readable-tags").tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND

    client.create_experiment("chosen-by-hand", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    client.create_experiment("made-before")
    open_run(uri, "chosen-by-hand", "r1", {}, "")
    open_run(uri, "made-before", "r2", {}, "")
    assert client.get_experiment_by_name("chosen-by-hand").tags[EXPERIMENT_KIND_TAG] == "genai_development"
    assert client.get_experiment_by_name("made-before").tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND


def test_prompt_sets_are_dataset_inputs_logged_once_across_reopening_the_run(uri):
    from mlflow import MlflowClient

    sets = [PromptSet("training", "simple_animals.txt", "/prompts/simple_animals.txt", ("cat", "dog")),
            PromptSet("evaluation", "trainer.eval_prompts", "config", ("a photo of a cat",))]
    run_id = open_run(uri, "readable-data", "data-run", {}, "", datasets=sets)
    client = MlflowClient(uri)
    client.set_terminated(run_id, "FAILED")  # a crash; the rerun reopens the same run
    assert open_run(uri, "readable-data", "data-run", {}, "", datasets=sets) == run_id
    inputs = client.get_run(run_id).inputs.dataset_inputs
    got = sorted((i.dataset.name, [t.value for t in i.tags if t.key == "mlflow.data.context"][0]) for i in inputs)
    assert got == [("simple_animals.txt", "training"), ("trainer.eval_prompts", "evaluation")]
    by_name = {i.dataset.name: i.dataset for i in inputs}
    assert "/prompts/simple_animals.txt" in by_name["simple_animals.txt"].source
    eval_set = by_name["trainer.eval_prompts"]
    assert '"prompt"' in eval_set.schema and eval_set.source_type == "code"

    client.set_terminated(run_id, "FINISHED")
    edited = [PromptSet("training", "simple_animals.txt", "/prompts/simple_animals.txt", ("cat", "dog", "owl"))]
    open_run(uri, "readable-data", "data-run", {}, "", datasets=edited)  # the file changed: a new version is listed
    assert len(client.get_run(run_id).inputs.dataset_inputs) == 3


def test_prompt_sets_of_a_config_name_their_files_urls_or_config_keys(tmp_path, monkeypatch):
    from alignprop.platform.config import PROMPT_DIR, load_config
    from alignprop.platform.prompt_files import REMOTE_PROMPT_SETS

    train, held_out = prompt_sets(load_config("tiny-cpu", paths=False))
    assert (train.context, train.name, train.source) == ("training", "simple_animals.txt",
                                                         str(PROMPT_DIR / "simple_animals.txt"))
    assert train.prompts
    assert (held_out.context, held_out.name, held_out.source) == ("evaluation", "trainer.eval_prompts", "config")
    assert held_out.prompts == ("a photo of a cat", "a photo of a horse", "a photo of a whale", "a photo of a bee")

    monkeypatch.setenv("ALIGNPROP_CACHE", str(tmp_path))  # a public set already fetched: its source is its URL
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "hps_v2_all_eval.txt").write_text("a castle\na dragon\n")
    cfg = load_config("tiny-cpu", ["trainer.eval_prompts=[]", "trainer.eval_prompt_file=hps_v2_all_eval.txt"],
                      paths=False)
    (held_out,) = prompt_sets(cfg)[1:]
    assert (held_out.name, held_out.source, held_out.prompts) == ("hps_v2_all_eval.txt",
                                                                  REMOTE_PROMPT_SETS["hps_v2_all_eval.txt"][0],
                                                                  ("a castle", "a dragon"))


def test_trials_logging_the_same_prompt_set_at_once_all_succeed(uri):
    """Sweep trials open their runs in one experiment at the same moment; MLflow's store looks a
    dataset up, then inserts it, so all but one lose a UNIQUE-constraint race unless it is retried."""
    import threading

    from mlflow import MlflowClient

    from alignprop.platform.tracking import log_prompt_sets

    client = MlflowClient(uri)
    exp = client.create_experiment("same-set-at-once")
    sets = [PromptSet("training", "trainer.prompts", "config", ("cat", "dog"))]
    runs = [client.create_run(exp).info.run_id for _ in range(8)]
    start, errors = threading.Barrier(len(runs)), []

    def log(run_id):
        start.wait()
        try:
            log_prompt_sets(client, run_id, sets)
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=log, args=(r,)) for r in runs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    assert all(len(client.get_run(r).inputs.dataset_inputs) == 1 for r in runs)
