"""``snca subcategory CKPT``: sub-category discovery. For a model trained on coarse labels
(``--label-set coarse``), weighted kNN of the test features against training features that
carry the FINE labels the network never saw."""

from __future__ import annotations

import argparse
import sys

from ..errors import SncaError
from ._protocols import add_source_args, emit, load_source


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "subcategory",
        help="sub-category discovery: kNN against fine labels for a model trained on coarse ones",
        description="Weighted kNN of the test set against the training set labelled with FINE "
        "classes, for a model trained on coarse labels (CIFAR-100 superclasses, Fashion-MNIST "
        "groups, a folder with a fine-to-coarse mapping file). Also reports the coarse accuracy "
        "of the fine predictions and the chance level within the right coarse class.",
    )
    add_source_args(p)
    p.add_argument("--k", type=int, nargs="+", default=[30], help="neighbours (one or more; 30)")
    p.add_argument("--sigma", type=float, default=None, help="vote temperature (default: the checkpoint's temperature, else 0.05)")
    p.add_argument("--coarse-map", default=None, help="folder datasets: file of 'fine_class coarse_class' lines (default DIR/coarse.txt)")
    p.set_defaults(func=run)


def _coarse_mapping(src, gallery_fine, coarse_map):
    """Coarse class of each fine class (None when the dataset has no coarse labels)."""
    from ..protocols.subcategory import DIGIT_COARSE_GROUPS, groups_to_mapping

    if src.dataset in ("mnist", "mnist5k"):
        mapping, _ = groups_to_mapping(DIGIT_COARSE_GROUPS, list(gallery_fine.classes))
        return mapping
    try:
        coarse = src.build("train", label_set="coarse", coarse_map=coarse_map)
    except SncaError:
        return None  # a dataset without coarse labels: report fine accuracy only
    return [int(c) for c in coarse.coarse_of_fine.tolist()]


def run(args: argparse.Namespace) -> int:
    from ..protocols.subcategory import knn_accuracy

    src = load_source(args)
    sigma = args.sigma if args.sigma is not None else float(src.config.get("temperature", 0.05))
    if min(args.k) < 1:
        raise SncaError(f"k must be >= 1, got {min(args.k)}")
    if src.kind != "pixels" and src.config.get("label_set", "fine") != "coarse":
        print(
            "note: this checkpoint was trained on fine labels, so this is plain kNN accuracy, not "
            "sub-category discovery (train with --label-set coarse)",
            file=sys.stderr,
        )
    gallery = src.build("train")
    test = src.build("test")
    mapping = _coarse_mapping(src, gallery, args.coarse_map)
    g = src.features(gallery)
    q = src.features(test)
    res = knn_accuracy(
        g, gallery.fine_targets, q, test.fine_targets, k=list(args.k), sigma=sigma,
        num_classes=len(gallery.fine_classes), fine_to_coarse=mapping,
    )
    rows = [r.to_dict() for r in res.values()]
    result = {"source": src.what, "dataset": src.dataset, "num_gallery": len(gallery),
              "num_queries": len(test), "fine_classes": len(gallery.fine_classes), "results": rows}
    lines = [
        f"sub-category kNN: {src.what} on {src.dataset}, {len(test)} queries against {len(gallery)} "
        f"fine-labelled training images ({len(gallery.fine_classes)} fine classes)",
        f"{'k':>4} {'sigma':>7} {'fine top-1':>11} {'fine top-5':>11} {'coarse top-1':>13} {'chance in coarse':>17}",
    ]
    for r in rows:
        coarse = f"{100 * r['coarse_top1']:.2f}" if "coarse_top1" in r else "n/a"
        chance = f"{100 * r['chance_within_coarse']:.2f}" if "chance_within_coarse" in r else "n/a"
        lines.append(f"{r['k']:>4} {r['sigma']:>7.3g} {100 * r['top1']:>11.2f} {100 * r['top5']:>11.2f} {coarse:>13} {chance:>17}")
    emit(result, args.json, lines)
    return 0
