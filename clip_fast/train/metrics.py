"""What the reference trainer writes as it runs: ``metrics.csv``, ``log.txt``, ``metrics.png``."""
from __future__ import annotations

import csv
import os
import resource
from typing import List, Optional

import torch

METRIC_FIELDS = ("step", "epoch", "loss", "logit_scale", "temperature", "lr", "samples_per_s",
                 "peak_mem_mb", "elapsed_s", "zs_top1", "zs_top5", "zs_heldout_top1")
# metrics.csv's columns for a model with a learned logit bias (--loss siglip).
METRIC_FIELDS_WITH_BIAS = METRIC_FIELDS[:5] + ("logit_bias",) + METRIC_FIELDS[5:]


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on a GPU, peak RSS of this process on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class MetricsLog:
    """metrics.csv (one row per logged step) and log.txt, written by rank 0 only.

    ``with_bias``: the model has a logit bias, logged in a ``logit_bias`` column;
    ``extra_fields``: more columns after the standard ones (the nested sizes' accuracies).
    """

    def __init__(self, run_dir: str, resume_step: Optional[int], enabled: bool,
                 with_bias: bool = False, extra_fields: tuple = ()):
        self.enabled = enabled
        self.fields = (METRIC_FIELDS_WITH_BIAS if with_bias else METRIC_FIELDS) + tuple(extra_fields)
        self.path = os.path.join(run_dir, "metrics.csv")
        self.log_path = os.path.join(run_dir, "log.txt")
        self.rows: List[dict] = []
        if not enabled:
            return
        if resume_step is not None and os.path.isfile(self.path):
            # Keep the rows up to the checkpoint; later ones are redone after the resume.
            with open(self.path, newline="") as fh:
                self.rows = [r for r in csv.DictReader(fh)
                             if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: row.get(k, "") for k in self.fields}
        self.rows.append(row)
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.fields).writerow(row)

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        print(msg, flush=True)
        with open(self.log_path, "a") as fh:
            fh.write(msg + "\n")


def plot_metrics(rows: List[dict], path: str) -> Optional[str]:
    """Loss, temperature and zero-shot accuracy against step, as a PNG (matplotlib Agg)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # matplotlib is optional
        return f"no plot ({type(exc).__name__}: {exc})"

    def series(key):
        pts = [(int(r["step"]), float(r[key])) for r in rows if str(r.get(key, "")) != ""]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(*series("loss"))
    axes[0].set_title("contrastive loss")
    axes[1].plot(*series("temperature"))
    axes[1].set_title("temperature (1 / logit scale)")
    for key, label in (("zs_top1", "top-1"), ("zs_top5", "top-5"),
                       ("zs_heldout_top1", "top-1, held-out templates")):
        axes[2].plot(*series(key), marker="o", label=label)
    axes[2].set_title("zero-shot accuracy (test)")
    axes[2].legend(loc="lower right")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return None

