"""A grid over pruning methods on a simulated two-node cluster (ray.cluster_utils.Cluster).

The head node holds only the trial drivers; each of two worker nodes offers one trial's worth
of a custom resource, so two concurrent trials must land on different nodes."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from sweep.config import load_config
from sweep.results import EPOCHS_FILE, TRIALS_FILE, results_dir
from sweep.runner import run_sweep

pytestmark = pytest.mark.ray

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=1, resources={"trial_slot": 2}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster, [n.node_id for n in nodes]
    ray.shutdown()
    cluster.shutdown()


def test_trials_run_on_both_nodes(two_nodes, tmp_path):
    cluster, worker_nodes = two_nodes
    cfg = load_config(
        TINY,
        [
            "resources.cpus_per_worker=0.5",
            "resources.custom_per_worker={trial_slot: 1}",
            "train.base_samples=256",  # long enough that concurrent trials overlap in time
            # Pruning method as a grid axis (issue 7): each mask is computed once and shared.
            "grid.method=[magnitude, wanda]",
            "grid.sparsity=[0.5]",
            "prune.calibration.samples=16",
        ],
    )
    assert run_sweep(cfg, tmp_path, address=cluster.address, dry_run=False) == 0
    sweep_dir = tmp_path / cfg.name
    trials = pq.read_table(results_dir(sweep_dir) / TRIALS_FILE).to_pylist()
    epochs = pq.read_table(results_dir(sweep_dir) / EPOCHS_FILE).to_pylist()
    assert len(trials) == 4 and all(t["status"] == "completed" for t in trials)
    assert len(epochs) == 4 * 3
    used = {r["node_id"] for r in epochs}
    assert used == set(worker_nodes), used  # never the head, and both worker nodes
    assert {(t["method"], t["batch_size"]) for t in trials} == {
        (m, b) for m in ("magnitude", "wanda") for b in (2, 4)
    }
    assert {r["method"] for r in epochs} == {"magnitude", "wanda"}
    files = sorted(p.name for p in (sweep_dir / "prep" / "masks").iterdir())
    # Once per mask, each with its recipe record and its baseline (measured once, shared by the
    # batch sizes); no pruned weights (neither method changes them).
    assert files == [f"{m}-s0.5{ext}" for m in ("magnitude", "wanda")
                     for ext in (".baseline.json", ".json", ".safetensors")]
    for r in epochs:
        assert r["sparsity_actual"] == pytest.approx(0.5, abs=1e-3)
