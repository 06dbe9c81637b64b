"""What a finished sweep leaves on its MLflow parent run: the LR × weight-decay plane, every
trial's learning curve, a table of trials and the best config as a recipe YAML."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

from rn50.config import Config
from rn50.io.tracking import Tracker
from rn50.search_space import trial_run_name


@dataclass
class TrialRecord:
    """One trial's outcome, gathered from Tune's results."""
    trial_id: str
    params: dict
    status: str  # completed | stopped_by_asha | errored
    history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, metric)
    checkpoint: str = ""

    def best(self, mode: str) -> float | None:
        """The trial's best metric value, or None if it never reported."""
        values = [value for _, value in self.history]
        return (max if mode == "max" else min)(values) if values else None


PLOTTED_POINTS_KEY = "rn50:points"  # PNG text chunk: the (x, y) data the scatter drew


def _figure_png(figure, metadata: dict[str, str] | None = None) -> bytes:
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100, metadata=metadata)
    plt.close(figure)
    return buffer.getvalue()


def plane_png(records: list[TrialRecord], metric: str, mode: str,
              x_key: str = "optim.lr", y_key: str = "optim.weight_decay") -> bytes:
    """Scatter of the trials on the (x_key, y_key) plane, log axes, coloured by best metric."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in records
              if r.best(mode) is not None and x_key in r.params and y_key in r.params]
    figure, axis = plt.subplots(figsize=(6, 5))
    if scored:
        points = axis.scatter([r.params[x_key] for r in scored], [r.params[y_key] for r in scored],
                              c=[r.best(mode) for r in scored], cmap="viridis", s=80,
                              edgecolors=["red" if r.status == "stopped_by_asha" else "black"
                                          for r in scored])
        figure.colorbar(points, label=metric)
        axis.set_xscale("log")
        axis.set_yscale("log")
    axis.set_xlabel(x_key)
    axis.set_ylabel(y_key)
    axis.set_title(f"{metric} per trial (red edge: stopped by ASHA)")
    # What was drawn, read back from the plot itself, so a reader (or a test) can check the
    # picture against the trials without guessing from pixels.
    drawn = [[float(x), float(y)] for c in axis.collections for x, y in c.get_offsets()]
    return _figure_png(figure, {PLOTTED_POINTS_KEY: json.dumps(drawn)})


def curves_png(records: list[TrialRecord], metric: str) -> bytes:
    """Every trial's metric against epoch on one chart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5))
    for record in records:
        if record.history:
            epochs, values = zip(*record.history)
            axis.plot(epochs, values, marker="o",
                      label=f"{trial_run_name(record.params)} ({record.status})")
    axis.set_xlabel("epoch")
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    if records:
        axis.legend(fontsize=7)
    return _figure_png(figure)


def trials_table(records: list[TrialRecord], metric: str, mode: str) -> dict[str, list]:
    """Columns for `Tracker.log_table`: one row per trial."""
    keys = sorted({key for record in records for key in record.params})
    table: dict[str, list] = {"trial_id": [], "status": [], "epochs": [], f"best_{metric}": []}
    table.update({key: [] for key in keys})
    for record in records:
        table["trial_id"].append(record.trial_id)
        table["status"].append(record.status)
        table["epochs"].append(len(record.history))
        table[f"best_{metric}"].append(record.best(mode))
        for key in keys:
            table[key].append(record.params.get(key))
    return table


def log_sweep_report(parent: Tracker, records: list[TrialRecord], metric: str, mode: str,
                     best_config: Config) -> None:
    """Log plane, curves, table and best recipe to the parent run."""
    parent.log_bytes(plane_png(records, metric, mode), "lr_wd_plane.png")
    parent.log_bytes(curves_png(records, metric), "learning_curves.png")
    parent.log_bytes(best_config.to_yaml().encode(), "best_recipe.yaml")
    parent.log_table(trials_table(records, metric, mode), "trials.json")
