"""Ray Train fault tolerance: a worker that fails mid-run is restarted from the last checkpoint
(FailureConfig(max_failures)) and the run finishes with the same result as an unbroken one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from alignprop.platform.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False)
    yield
    ray.shutdown()


def test_failed_worker_restarts_from_checkpoint_and_matches(local_ray, tmp_path):
    from mlflow import MlflowClient

    from alignprop.platform.launch import launch

    common = ["ray.num_workers=1", "ray.resources_per_worker={CPU: 0.98}", "trainer.max_steps=3",
              "trainer.ckpt_every=1",
              "trainer.eval_every=0", "sampling.num_steps=4", "truncation.k=3", f"ray.storage_path={tmp_path}/ray",
              f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    broken = launch(load_config("tiny-cpu", [*common, "ray.max_failures=1", "trainer.fail_at_step=2",
                                             "tracking.run_name=broken"]))
    clean = launch(load_config("tiny-cpu", [*common, "tracking.run_name=clean"]))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(broken.mlflow_run_id).info.status == "FINISHED"
    # Step 1 was logged once, then the failed attempt died in step 2; the restart resumed at step 1.
    assert sorted(m.step for m in client.get_metric_history(broken.mlflow_run_id, "loss")) == [1, 2, 3]
    a = load_file(f"{broken.checkpoint_path}/pytorch_lora_weights.safetensors")
    b = load_file(f"{clean.checkpoint_path}/pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
