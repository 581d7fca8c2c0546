"""A worker on a node that did not prepare the sweep pulls every prepared file its trial
reads from the object store (trainers.worker.localize), the pruned weights of a method that
changes them (SparseGPT) and the recipe and shared baseline among them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from trainers.spec import Prepared
from trainers.worker import localize


class PullingStore:
    """Records what is pulled; answers with the file's path on "this node"."""

    def __init__(self, node: Path):
        self.node, self.pulled = node, []

    def ensure(self, path: Path) -> Path:
        self.pulled.append(str(path))
        return self.node / path.name


@dataclasses.dataclass(frozen=True)
class Spec:
    prepared: Prepared


def test_every_prepared_file_is_pulled(tmp_path):
    prep = Prepared(model_dir="/s/model", train_tokens="/s/prep/t.safetensors",
                    eval_windows="/s/prep/w.safetensors", masks="/s/prep/masks/m.safetensors",
                    dense_perplexity=10.0, weights="/s/prep/masks/m.weights.safetensors",
                    recipe="/s/prep/masks/m.json",
                    eval_sets=(("a", "/s/prep/w.safetensors"), ("b", "/s/prep/w-b.safetensors")),
                    baseline="/s/prep/masks/m.baseline.json")
    store = PullingStore(tmp_path)
    got = localize(Spec(prep), store).prepared
    files = [prep.model_dir, prep.train_tokens, prep.eval_windows, prep.masks, prep.weights,
             prep.recipe, prep.baseline, "/s/prep/w-b.safetensors"]
    assert set(store.pulled) == set(files)
    for key in ("model_dir", "train_tokens", "eval_windows", "masks", "weights", "recipe", "baseline"):
        assert getattr(got, key) == str(tmp_path / Path(getattr(prep, key)).name), key
    assert got.eval_sets == (("a", str(tmp_path / "w.safetensors")), ("b", str(tmp_path / "w-b.safetensors")))
    # A recipe without pruned weights pulls nothing for them.
    store = PullingStore(tmp_path)
    assert localize(Spec(dataclasses.replace(prep, weights=None)), store).prepared.weights is None
    assert prep.weights not in store.pulled
