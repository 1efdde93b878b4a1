"""A training run's files, published all or nothing into the output folder.

Everything a run writes (model.keras, history.json, metrics.json, the plots, training.json) goes
into a hidden staging folder inside --out, and is moved into place only when the run has
succeeded, training.json last (it records model.keras' sha256, which `TrainingRecord.read`
checks, so a set interrupted between two renames is refused rather than mixed): see
`xray_edge.staging`. Ctrl-C or a kill before that leaves the folder as it was; the killed run's
staging folder is removed by the next run in that folder.

A collapsed run publishes only model.collapsed.keras and training.collapsed.json: the previous
run's set, model.keras included, stays whole.
"""

from __future__ import annotations

from pathlib import Path

from xray_edge.errors import XrayEdgeError, first_line
from xray_edge.files import atomic_write_json, check_writable
from xray_edge.staging import Staging
from xray_edge.training_record import TRAINING_RECORD_NAME, TrainingRecord

MODEL = "model.keras"
COLLAPSED_MODEL = "model.collapsed.keras"
COLLAPSED_RECORD = "training.collapsed.json"
EVIDENCE = ("history.json", "metrics.json", "training.png", "samples.png", "roc.png")
OWNED = (MODEL, *EVIDENCE, TRAINING_RECORD_NAME)  # what a run replaces, or removes when it made none
PREFIX = ".train-staging-"


def check_out(out: Path) -> None:
    """XrayEdgeError in one line unless the run's files can be written in `out` (before training)."""
    if out.exists() and not out.is_dir():
        raise XrayEdgeError(f"--out {out}: is a file, not a folder")
    try:
        check_writable(out / MODEL)
    except XrayEdgeError as exc:
        raise XrayEdgeError(f"--out {out}: cannot write the training's files there ({exc})") from None


class TrainOutputs(Staging):
    """The staging folder of one training run inside `out`; discarded unless published."""

    prefix = PREFIX

    def publish(self, record: TrainingRecord) -> None:
        """Write training.json (with model.keras' sha256) and publish the staged set."""
        self._publishing(lambda: (record.write(self.dir), self.publish_files(
            [n for n in OWNED if self.path(n).exists()], TRAINING_RECORD_NAME, OWNED)))

    def publish_collapsed(self, record: TrainingRecord) -> None:
        """Publish only the collapsed model and its record: the previous set stays as it was."""
        self._publishing(lambda: (atomic_write_json(self.path(COLLAPSED_RECORD), record.to_dict()),
                                  self.publish_files([COLLAPSED_MODEL], COLLAPSED_RECORD, ())))

    def _publishing(self, step) -> None:
        try:
            step()
        except OSError as exc:  # a full disk, a folder changed under us: one line, nothing mixed
            raise XrayEdgeError(f"{self.out}: cannot write the training's files "
                                f"({exc.strerror or first_line(exc)})") from None
