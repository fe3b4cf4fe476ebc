"""The model card of a registered version, written from its contract, never by hand.

After the MONAI bundle's model card: what the model is for and not for, the data it learned from
and its licence, the input it expects, its figures (validation with intervals; another site's, and
for a site version its lineage), its known limits and the code that made it. It is logged as
``model_card.md`` in the run that registered the version and becomes the version's description in
the registry. It holds no local path and no patient identifier: only what the contract holds.
"""

from __future__ import annotations

import math

from pneumo.contract import Figures, ModelContract

INTENDED_USE = (
    "A second reader for frontal (PA/AP) chest X-rays of children aged 1 to 5: it flags images likely to "
    "show pneumonia for a radiologist to look at first. It is not a diagnosis and must not replace a "
    "radiologist's reading."
)
TRAINING_DATA = (
    "Kermany, Goldbaum et al., Cell 2018 (Kaggle `paultimothymooney/chest-xray-pneumonia`, version 2): "
    "pediatric chest X-rays from Guangzhou Women and Children's Medical Center; licence CC BY 4.0. "
    "Trained on the training folder with a patient-grouped validation split carved from it."
)
KNOWN_LIMITS = (
    "Other hospitals: on differently acquired images the ranking is weaker and the threshold does not carry "
    "over; adapt it (`adapt`) or calibrate it (`evaluate -P calibrate=true`) on the site's own labelled images.",
    "Adults: never seen; its figures say nothing about them.",
    "Lateral views and adults' films: never seen; the input gate knows only what the training hospital's frontal "
    "pediatric films look like, so such a film may pass it and get a confident answer.",
    "What the input gate catches (the answer is UNCERTAIN, never NORMAL or PNEUMONIA): blank frames, noise, "
    "photographs, text pages, checkerboards, inverted films and films rotated by 90 or 270 degrees. Upside-down "
    "(180 degrees) and mirrored films are not reliably caught.",
    "Only pneumonia against normal: other findings (effusion, masses, lines, tubes) are not recognised.",
    "Probabilities are calibrated where the calibration was fitted (below). At another hospital they are not: "
    "a validation calibration can make them more confident there, not less. Recalibrate on the site's own "
    "labelled images (`evaluate -P calibrate=true`, or `adapt`).",
)


# Figures of the calibration and the input gate, where a Figures holds them (see pneumo.training.fit_trust).
TRUST_FIGURES = {
    "ece": "expected calibration error, raw score",
    "ece_calibrated": "expected calibration error, calibrated (as served)",
    "ood_pass_rate": "share passing the input gate",
}


def _number(value: float, digits: int = 3) -> str:
    return "undefined" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _figures_table(figures: Figures) -> list[str]:
    rows = [
        f"On {figures.on}: {figures.n_images} images"
        + (f" of {figures.n_patients} patients" if figures.n_patients else "")
        + ".",
        "",
        "| figure | value | 95% interval (patient-grouped bootstrap) |",
        "|---|---|---|",
    ]
    for name in ("roc_auc", "sensitivity", "specificity", "ppv", "npv"):
        if name not in figures.metrics:
            continue
        interval = figures.intervals.get(name)
        bounds = f"[{_number(interval[1])}, {_number(interval[2])}]" if interval else "not computed"
        rows.append(f"| {name.replace('_', ' ')} | {_number(figures.metrics[name])} | {bounds} |")
    for name, words in TRUST_FIGURES.items():
        if name in figures.metrics:
            rows.append(f"| {words} | {_number(figures.metrics[name])} | not computed |")
    return rows + [""]


def _trust_lines(contract: ModelContract) -> list[str]:
    """What the card says of the calibration and the input gate."""
    lines = []
    fitted = contract.calibration
    if fitted is None:
        lines.append("- Calibration: none; `probability` is the raw score.")
    else:
        lines.append(
            f"- Calibration: Platt scaling fitted on {fitted.fitted_on} ({fitted.n_images} images); "
            f"expected calibration error there {_number(fitted.ece_before)} raw, {_number(fitted.ece_after)} "
            "calibrated (out of fold). The served `probability` and `threshold` are calibrated; the labels are "
            "those of the raw threshold."
        )
    gate = contract.input_gate
    if gate is None:
        lines.append("- Input gate: none (logged before it existed); `in_distribution` is empty.")
    else:
        lines.append(
            f"- Input gate: fitted on {gate.n_fitted} training images; {_number(100 * gate.validation_pass_rate, 1)}% "
            f"of {gate.n_calibrated} validation X-rays pass. An image that fails is answered UNCERTAIN."
        )
    return lines


def model_card(
    contract: ModelContract,
    name: str,
    version: str,
    status: str,
    code_version: str,
    evaluation: Figures | None = None,
) -> str:
    """The markdown model card of version ``version`` of ``name``.

    Args:
        contract: The version's contract.
        name: Registered model name.
        version: Its version number.
        status: Its alias and why (``champion: ...``, ``not promoted: ...``).
        code_version: The git commit of the code that trained it (MLflow's ``mlflow.source.git.commit``).
        evaluation: Figures of the evaluation that registered it, when it was on other images than
            validation (the official test split: another hospital's acquisition).
    """
    spec = contract.input_spec
    lines = [
        f"# {name} version {version}",
        "",
        f"**Status**: {status}",
        "",
        "## Intended use",
        "",
        INTENDED_USE,
        "",
        "## Training data and licence",
        "",
        TRAINING_DATA,
        "",
        "## Input contract",
        "",
        f"- One image per row, base64 of a JPEG, PNG or DICOM file; decoded to {spec.image_size} x {spec.image_size} "
        f"{'grayscale' if spec.channels == 1 else 'RGB'}, border crop {spec.crop:g}, equalisation `{spec.equalize}`.",
        f"- Answer: `label` ({', '.join(contract.class_names)} or UNCERTAIN), `probability` of pneumonia, "
        "`threshold`, `in_distribution`, `ood_score`.",
        f"- Operating threshold {contract.threshold:.4f} on the raw score: {contract.threshold_rule}.",
        *_trust_lines(contract),
        "",
        "## Figures",
        "",
        *_figures_table(contract.validation),
    ]
    if evaluation is not None:
        lines += ["Another acquisition, reported only (never used to choose this model or its threshold):", ""]
        lines += _figures_table(evaluation)
    if contract.lineage is not None and contract.site is not None:
        lineage, site = contract.lineage, contract.site
        lines += [
            "## Site version: lineage and site figures",
            "",
            f"- Made by {lineage.method} of `{lineage.parent_version or lineage.parent_uri}` "
            f"(training run {lineage.parent_run_id or 'unknown'}).",
            f"- Site sample: manifest digest `{lineage.site_manifest_digest}`, {site.n_pneumonia} pneumonia images; "
            f"target sensitivity {site.target_sensitivity}.",
            "",
            *_figures_table(site.figures),
        ]
        if site.parent_figures is not None:
            lines += ["The parent on the same images:", "", *_figures_table(site.parent_figures)]
    lines += ["## Known limits", "", *(f"- {limit}" for limit in KNOWN_LIMITS), ""]
    lines += [
        "## Provenance",
        "",
        f"- Trained by entry point `{contract.entry_point}` in MLflow run `{contract.run_id}`.",
        f"- Code version: {code_version or 'unknown (not run from a git checkout)'}.",
        f"- Contract version {contract.version}.",
        "",
    ]
    return "\n".join(lines)
