"""`wsi-mil audit`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wsi_mil.cli.common import EXIT_OK, DefaultsFormatter, add_output_options, add_settings, settings_of, setup_logging
from wsi_mil.config import AuditConfig

NAME = "audit"
#: the settings this command takes (its flags, recipe section, help and checks come from them)
SETTINGS = (AuditConfig, "audit")


def add_parser(sub: Any) -> None:
    """The ``audit`` sub-command: its flags and help."""
    au = sub.add_parser(
        "audit", help="audit a finished run: subgroups, operating points, every error, duplicates, label sources",
        description="Run the audit of train-mil / train-image / train-volume again on a finished run folder: per-subgroup "
                    "AUC, sensitivity and specificity with CIs (--subgroups; numeric columns banded by quartiles, small "
                    "subgroups flagged, the largest gap stated), sensitivity at fixed specificity and the reverse, PPV / "
                    "NPV at --prevalence, every false negative and false positive with its probability, patient and "
                    "heatmap (errors.csv, gallery.png), near-duplicate images (or slides, with --features) across the "
                    "run's splits, and disagreeing label sources (--label-sources). Writes RUN/audit/ (or --out): "
                    "audit.json, report.md, errors.csv, gallery.png. Exit status: 0 done; 2 bad options or inputs.",
        formatter_class=DefaultsFormatter,
    )
    au.add_argument("run", type=Path, help="output folder of train-mil, train-image or train-volume")
    au.add_argument("--manifest", type=Path, required=True, help="the manifest the run was trained on (its columns give the subgroups)")
    au.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/audit)")
    au.add_argument("--features", type=Path, default=None, help="features/ folder of the run's slides (near-duplicate slides)")
    add_output_options(au)
    add_settings(au, AuditConfig, "audit")


def run(args: argparse.Namespace) -> int:
    from wsi_mil.commands.audit import run_audit

    setup_logging(args.verbose)
    settings_of(args, AuditConfig, "audit")
    audit = run_audit(args.run, args.manifest, out_dir=args.out, subgroups=args.subgroups, prevalence=args.prevalence,
                      label_sources=args.label_sources, features=args.features, n_boot=args.bootstrap)
    ev = audit["evaluation"]
    e = ev["errors"]
    print(f"audit of {args.run} ({ev['set']}, {ev['n']} labelled): {len(e['false_negatives'])} false negative(s), "
          f"{len(e['false_positives'])} false positive(s)")
    if audit.get("duplicates"):
        d = audit["duplicates"]
        print(f"near-duplicates: {len(d['pairs'])} pair(s), {len(d['leaks'])} across sets under different patients")
    if audit.get("label_sources"):
        print(f"label sources disagree on {audit['label_sources']['n_conflicts']} row(s)")
    for col, rep in (ev.get("subgroups") or {}).items():
        gap = rep["largest_gap"].get("auc")
        print(f"subgroups by {col}: {len(rep['groups'])}" + (f"; largest AUC gap {gap['gap']:.3f} ({gap['lowest']} vs "
                                                              f"{gap['highest']})" if gap else ""))
    from wsi_mil.eval.shortcuts import notes_of, warnings_of

    for line in warnings_of(audit.get("shortcuts") or {}):
        print(f"WARNING: {line}")
    for line in notes_of(audit.get("shortcuts") or {}):
        print(f"note: {line}")
    print(f"report: {(args.out or args.run / 'audit') / 'report.md'}")
    return EXIT_OK
