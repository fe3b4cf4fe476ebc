"""Summarise ``benchmarks/ablation.py`` results: one row per lever, mean ± sd over seeds.

Validation columns (the split every choice is made on) come first, then the acquisition-shift
stress views of validation, then the test split, which is only reported. Post-hoc rows reuse
the saved scores: test-time augmentation and threshold rules.

    python benchmarks/ablation_report.py [--out outputs/ablation]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

REPO = Path(__file__).resolve().parents[1]


def at_threshold(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity at a threshold."""
    predicted = probabilities >= threshold
    return float(predicted[labels == 1].mean()), float((~predicted[labels == 0]).mean())


def best_specificity(labels: np.ndarray, probabilities: np.ndarray, sensitivity: float = 0.98) -> float:
    """Specificity at the best threshold reaching ``sensitivity`` (an oracle, for diagnosis only)."""
    fpr, tpr, _ = roc_curve(labels, probabilities)
    return float(1 - fpr[np.argmax(tpr >= sensitivity)])


def threshold_for(labels: np.ndarray, probabilities: np.ndarray, target: float) -> float:
    _, tpr, thresholds = roc_curve(labels, probabilities, drop_intermediate=False)
    return float(min(thresholds[np.flatnonzero(tpr >= target)[0]], 1.0))


def row(scores: dict, tta: bool = False, rule: str = "stored") -> dict:
    """Figures of one run; ``tta`` averages the saved views, ``rule`` re-picks the threshold on validation."""
    val, test = scores["val_probabilities"], scores["test_probabilities"]
    if tta:
        val = np.vstack([val[None], scores["val_tta"]]).mean(axis=0)
        test = np.vstack([test[None], scores["test_tta"]]).mean(axis=0)
    vl, tl = scores["val_labels"], scores["test_labels"]
    threshold = float(scores["threshold"])
    if tta or rule != "stored":
        target = {"stored": 0.97, "sens0.98": 0.98, "sens0.95": 0.95}.get(rule, 0.97)
        threshold = threshold_for(vl, val, target)
    out = {"val_auc": roc_auc_score(vl, val), "threshold": threshold}
    if "val_stress" in scores:
        stress = scores["val_stress"]
        labels = np.tile(vl, len(stress))
        out["stress_auc"] = roc_auc_score(labels, stress.ravel())
        out["stress_sens"], out["stress_spec"] = at_threshold(labels, stress.ravel(), threshold)
    out["test_auc"] = roc_auc_score(tl, test)
    out["test_sens"], out["test_spec"] = at_threshold(tl, test, threshold)
    out["test_best_spec"] = best_specificity(tl, test)
    return out


COLUMNS = ("val_auc", "stress_auc", "stress_spec", "threshold", "test_auc", "test_sens", "test_spec", "test_best_spec")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "outputs" / "ablation"))
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--detail", help="also print each seed of this variant with 95%% patient-grouped intervals")
    args = parser.parse_args()
    out = Path(args.out)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    groups: dict[str, list[dict]] = defaultdict(list)
    walls: dict[str, list[float]] = defaultdict(list)
    for record in records:
        path = out / "scores" / f"{record['variant']}-{record['seed']}.npz"
        scores = dict(np.load(path))
        groups[record["variant"]].append(row(scores))
        groups[record["variant"] + " +TTA"].append(row(scores, tta=True))
        groups[record["variant"] + " (threshold at val sens 0.98)"].append(row(scores, rule="sens0.98"))
        walls[record["variant"]].append(record["wall_seconds"])
    print("| variant | seeds | " + " | ".join(COLUMNS) + " | wall s |")
    print("|---" * (len(COLUMNS) + 3) + "|")
    for name, rows in groups.items():
        cells = [summary([r.get(c, np.nan) for r in rows], 4 if c.endswith("auc") else 3) for c in COLUMNS]
        wall = f"{np.mean(walls[name]):.0f}" if name in walls else ""
        print(f"| {name} | {len(rows)} | " + " | ".join(cells) + f" | {wall} |")
    if args.detail:
        detail(out, records, args.detail, Path(args.data_dir))


def detail(out: Path, records: list[dict], variant: str, data_dir: Path) -> None:
    """Per seed: validation and test figures at the stored threshold, with patient-grouped 95% intervals."""
    from pneumo.data import patient_id
    from pneumo.metrics import bootstrap_intervals

    training_ids = {patient_id(p.name) for p in (data_dir / "train").glob("*/*")}

    def cell(interval: tuple[float, float, float]) -> str:
        return f"{interval[0]:.3f} [{interval[1]:.3f}, {interval[2]:.3f}]"

    print(f"\n{variant}: per seed, at the stored threshold, 95% patient-grouped bootstrap intervals")
    print(
        "| seed | threshold | val ROC AUC | val sensitivity | val specificity | test ROC AUC | test sensitivity |"
        " test specificity | test best specificity at sensitivity ≥ 0.98 | test ROC AUC without shared ids |"
    )
    print("|---" * 10 + "|")
    for record in records:
        if record["variant"] != variant:
            continue
        scores = dict(np.load(out / "scores" / f"{variant}-{record['seed']}.npz"))
        threshold = float(scores["threshold"])
        cells = []
        for split in ("val", "test"):
            labels, probabilities = scores[f"{split}_labels"], scores[f"{split}_probabilities"]
            intervals = bootstrap_intervals(labels, probabilities, threshold, scores[f"{split}_patients"], 2000)
            cells += [cell(intervals[m]) for m in ("roc_auc", "sensitivity", "specificity")]
        labels, probabilities = scores["test_labels"], scores["test_probabilities"]
        keep = ~np.isin(scores["test_patients"], list(training_ids))
        without_shared = roc_auc_score(labels[keep], probabilities[keep])
        best = best_specificity(labels, probabilities)
        row = " | ".join(cells)
        print(
            f"| {record['seed']} | {threshold:.3f} | {row} | {best:.3f} | {without_shared:.3f} ({keep.sum()} images) |"
        )


def summary(values: list[float], digits: int = 3) -> str:
    """``mean ± sd`` over seeds (sample standard deviation), or a dash when undefined."""
    values = np.asarray(values, dtype=float)
    if np.isnan(values).all():
        return "–"
    spread = np.nanstd(values, ddof=1) if np.isfinite(values).sum() > 1 else 0.0
    return f"{np.nanmean(values):.{digits}f} ± {spread:.{digits}f}"


if __name__ == "__main__":
    main()
