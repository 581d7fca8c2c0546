"""The one place that spells SWEEP_DIR's layout.

    SWEEP_DIR/
      sweep.yaml              the resolved config            sweep.json  fingerprint and name
      prep/                   once per sweep: train_tokens, eval_windows (one file per
                              evaluation set), dense.json, masks/ (per recipe: masks,
                              pruned weights, recipe .json, .baseline.json: epoch 0)
      tune/                   Ray Tune's experiment (tuner.pkl, one directory per trial)
      train/train-<trial>/    each trial's Ray Train run and its checkpoints
      results/                epochs.parquet, trials.parquet
      logs/                   sweep.log, <trial>.log, <trial>.progress.json
      export/<trial>/         the best model so far, a Hugging Face directory
      driver.lease            the running driver's lease (sweep/lease.py)
      driver.attempts/        one claim per driver start: the attempt numbers that fence
                              an older driver's workers (trainers/fence.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainers.fence import ATTEMPTS_DIR
from trainers.spec import pattern_label


@dataclass(frozen=True)
class SweepLayout:
    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "sweep.yaml"

    @property
    def state_file(self) -> Path:
        return self.root / "sweep.json"

    @property
    def prep(self) -> Path:
        return self.root / "prep"

    @property
    def train_tokens(self) -> Path:
        return self.prep / "train_tokens.safetensors"

    @property
    def eval_windows(self) -> Path:
        return self.prep / "eval_windows.safetensors"

    def set_windows(self, name: str, primary: str) -> Path:
        """The windows of one evaluation set: the primary's are ``eval_windows`` (so sweeps
        written before several sets existed resume unchanged), the others beside them."""
        return self.eval_windows if name == primary else self.prep / f"eval_windows-{name}.safetensors"

    @property
    def dense(self) -> Path:
        return self.prep / "dense.json"

    @property
    def masks_dir(self) -> Path:
        return self.prep / "masks"

    def mask(self, method: str, pattern: str | None, sparsity: float,
             layerwise: str = "uniform") -> Path:
        """Masks are shared by every batch size and objective of one (method, pattern,
        sparsity, layer-wise rule). Beside them: ``.weights.safetensors`` (the pruned layers'
        weights, for methods that change them), ``.json`` (how they were made) and
        ``.baseline.json`` (the pruned model's evaluation, epoch 0)."""
        parts = [method, pattern_label(pattern), None if layerwise == "uniform" else layerwise,
                 f"s{sparsity:g}"]
        return self.masks_dir / ("-".join(p for p in parts if p) + ".safetensors")

    @staticmethod
    def pruned_weights(mask: Path) -> Path:
        return mask.with_name(mask.name.replace(".safetensors", ".weights.safetensors"))

    @staticmethod
    def recipe(mask: Path) -> Path:
        return mask.with_suffix(".json")

    @staticmethod
    def baseline(mask: Path) -> Path:
        """The pruned model's evaluation on every set (epoch 0), measured once per recipe and
        read by the recipe's trials."""
        return mask.with_name(mask.name.replace(".safetensors", ".baseline.json"))

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @staticmethod
    def train_run_name(trial_id: str) -> str:
        return f"train-{trial_id}"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def sweep_log(self) -> Path:
        return self.logs / "sweep.log"

    def trial_log(self, trial_id: str) -> Path:
        return self.logs / f"{trial_id}.log"

    def progress(self, trial_id: str) -> Path:
        return self.logs / f"{trial_id}.progress.json"

    def export(self, trial_id: str) -> Path:
        return self.exports / trial_id

    @property
    def exports(self) -> Path:
        return self.root / "export"

    @property
    def lease(self) -> Path:
        return self.root / "driver.lease"

    @property
    def attempts(self) -> Path:
        return self.root / ATTEMPTS_DIR

    @staticmethod
    def of(sweep_dir: str | Path) -> SweepLayout:
        return SweepLayout(Path(sweep_dir))
