"""``matcher calibrate`` and ``matcher thresholds``: derive a score model, show what it sets."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .options import add_command, add_model_pack_options, model_pack


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..calibrate.run import calibrate, write_json
    from ..face.pipeline import Pipeline

    # Exactly the served pipeline: default detector settings and quality gate.
    pipeline = Pipeline(model_pack(args), threads=args.threads, flip=args.flip_augment)
    model, report = calibrate(Path(args.labels), pipeline, cache_dir=args.cache,
                              bootstrap=args.bootstrap, seed=args.seed, workers=args.workers,
                              worst_group=args.worst_group,
                              group_confidence=args.group_confidence or None,
                              min_group_people=args.min_group_people)
    model.save(Path(args.out))
    report_path = Path(args.report) if args.report else Path(args.out).with_suffix(
        ".report.json")
    write_json(report_path, report)
    src = model.document["source"]
    print(f"score model for {model.model_id} (settings {model.settings_hash}) -> {args.out}")
    print(f"  {src['photos']} photos of {src['identities']} people; "
          f"{src['genuine_pairs']} genuine and {src['impostor_pairs']} impostor pairs; "
          f"{len(src['label_noise_dropped'])} identity pairs dropped as label noise "
          f"(listed in {report_path})")
    population = model.with_worst_group(False)
    for fmr in (1e-4, 1e-5, 1e-6):
        t = model.threshold_at_fmr(fmr)
        how = (f"{model.confidence:.0%} upper bound; estimate "
               f"{population.threshold_estimate(fmr):.4f}")
        if model.worst_group:  # the population's bound, raised to the worst group's
            how = (f"worst group; population {population.threshold_at_fmr(fmr):.4f}, "
                   f"{how}")
        print(f"  FMR {fmr:g}: threshold {t:.4f} ({how}), FNMR on this data "
              f"{model.fnmr_at(t)[0]:.2%} with one booking photo, "
              f"{model.fnmr_at(t, 'fused')[0]:.2%} with two fused")
    print(f"  data supports per-comparison FMR down to {model.supported_floor:.2g}")
    if "groups" in report:
        _print_groups(report["groups"], report_path)
    return 0


def _print_groups(groups: dict, report_path: Path) -> None:
    """The 1:1 rows of the group report: one threshold, the rates in each group."""
    rule = ("on" if groups["worst_group"] else "off")
    print(f"  groups ({groups['column']} column): {len(groups['reported'])} reported "
          f"(>= {groups['min_people']} people), worst-group rule {rule}; per-group rates "
          f"with 95% intervals in {report_path}")
    for name, why in groups["not_reported"].items():
        print(f"    {name}: not reported ({why})")
    for row in groups["points"]:
        if row["mode"] != "1:1":
            continue
        for label, t in row["threshold"].items():
            print(f"  1:1 {row['target']} ({row['kind']}), {label} threshold {t:.4f}:")
            for name, entry in row["rates"].items():
                r = entry[label]
                resolved = "" if r["resolved"] else " (not resolved: too few pairs)"
                print(f"    {name}: FMR {r['fmr']:.2g} ({r['false_matches']} of "
                      f"{r['impostor_pairs']:,} pairs){resolved}, FNMR {r['fnmr']:.2%}")


def thresholds_document(model, policy, gallery_size: int) -> dict:
    """What the service uses for this policy and gallery size (``matcher thresholds``)."""
    from ..gallery.decision import operating_point_1to1, operating_point_1toN

    one = operating_point_1to1(model, policy.fmr_1to1, policy.min_threshold,
                               policy.confidence_1to1)
    many = operating_point_1toN(model, policy.fpir_1toN, gallery_size, policy.min_threshold,
                                policy.confidence_1toN)
    return {
        "model_id": model.model_id,
        "one_to_one": {"fmr": one.target, "threshold": round(one.threshold, 6),
                       "confidence": policy.confidence_1to1, "supported": one.supported},
        "one_to_many": {"fpir": many.target, "gallery_size": gallery_size,
                        "confidence": policy.confidence_1toN,
                        "comparison_fmr": many.comparison_fmr,
                        "threshold": round(many.threshold, 6), "supported": many.supported,
                        "max_supported_gallery_size": many.max_gallery_size,
                        "margin": policy.margin},
        "groups": {"worst_group": model.worst_group, "group_confidence": model.group_confidence,
                   "names": sorted(model.groups)} if model.groups else None,
        "score_model": {"settings_hash": model.settings_hash,
                        "fmr_floor": model.supported_floor,
                        "source": {k: model.document.get("source", {}).get(k) for k in
                                   ("folder", "photos", "identities", "impostor_pairs",
                                    "genuine_pairs")},
                        "created": model.document.get("created")},
    }


def group_table(model, policy, sizes: tuple[int, ...] = (100, 1_000, 10_000)) -> str:
    """Markdown: per group, FMR and FNMR at one threshold for everyone (NIST IR 8280's
    view): the population's threshold and, beside it, the worst-group one the model sets.

    FMR "measured" is the group's own count of impostor pairs at or above the threshold;
    "model" its fitted tail (estimate and upper bound at the threshold's confidence). A
    group's data resolves a rate down to a few pairs in its impostor pairs: below, the
    model is the figure, extrapolated."""
    from ..gallery.decision import operating_point_1to1, operating_point_1toN
    from ..gallery.scoremodel import FUSED, SINGLE

    population = model.with_worst_group(False)
    lines = ["| mode | target | kind | group | impostor pairs | threshold | FMR measured "
             "| FMR model (bound) | FNMR (95% CI) | group resolves target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    # (mode, target, per-comparison FMR, gallery size (None for 1:1), kind)
    points: list[tuple[str, str, float, int | None, str]] = [
        ("1:1", f"FMR {policy.fmr_1to1:g}", policy.fmr_1to1, None, k) for k in (SINGLE, FUSED)]
    points += [("1:N", f"FPIR {policy.fpir_1toN:g}, N={n:,}", policy.fpir_1toN / n, n, SINGLE)
               for n in sizes]
    for mode, target, fmr, n, kind in points:
        for label, m in (("population", population), ("worst group", model)):
            if label == "worst group" and not model.worst_group:
                continue
            if n is None:  # 1:1
                t = operating_point_1to1(m, fmr, policy.min_threshold,
                                         policy.confidence_1to1, kind).threshold
                c, source = policy.confidence_1to1, m
            else:
                t = operating_point_1toN(m, policy.fpir_1toN, n, policy.min_threshold,
                                         policy.confidence_1toN).threshold
                c, source = policy.confidence_1toN, m.for_search
            for name, r in source.group_rates(t, kind, c).items():
                if r.get("kind_missing"):
                    continue
                lo, hi = r["fnmr_ci95"]
                lines.append(
                    f"| {mode} | {target} | {kind} | {name} | {r['impostor_pairs']:,} | "
                    f"{t:.4f} ({label}) | {r['fmr_measured']:.2g} | {r['fmr_estimate']:.2g} "
                    f"({r['fmr_upper']:.2g}) | {r['fnmr']:.2%} ({lo:.2%}-{hi:.2%}) | "
                    f"{'yes' if fmr * r['impostor_pairs'] >= 3 else 'no'}"
                    f"{'' if fmr >= r['fmr_floor'] else ', beyond its floor'} |")
    return "\n".join(lines)


def thresholds_table(model, policy) -> str:
    """Markdown: thresholds and FNMR on the calibration data, 1:1 by FMR and booking kind,
    1:N by the number of travellers booked now."""
    from ..gallery.decision import operating_point_1to1, operating_point_1toN
    from ..gallery.scoremodel import FUSED, SINGLE

    def fnmr(t: float, kind: str) -> str:
        f, lo, hi = model.fnmr_at(t, kind)
        return f"{f:.2%} ({lo:.2%}-{hi:.2%})"

    lines = ["| mode | target | N | FMR per comparison | threshold, one booking photo "
             "| threshold, two fused | FNMR, one photo (95% CI) | FNMR, two fused (95% CI) "
             "| supported |", "|---|---|---|---|---|---|---|---|---|"]
    for fmr in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
        one, two = (operating_point_1to1(model, fmr, policy.min_threshold,
                                         policy.confidence_1to1, kind)
                    for kind in (SINGLE, FUSED))
        lines.append(f"| 1:1 ({policy.confidence_1to1:.0%} bound) | FMR {fmr:g} | | "
                     f"{fmr:.2g} | {one.threshold:.4f} | {two.threshold:.4f} | "
                     f"{fnmr(one.threshold, SINGLE)} | {fnmr(two.threshold, FUSED)} | "
                     f"{'yes' if one.supported else 'no'} |")
    for n in (10, 100, 1_000, 10_000, 30_000, 40_000, 100_000, 1_000_000):
        p = operating_point_1toN(model, policy.fpir_1toN, n, policy.min_threshold,
                                 policy.confidence_1toN)
        lines.append(f"| 1:N ({policy.confidence_1toN:.0%} bound) | FPIR "
                     f"{policy.fpir_1toN:g} | {n:,} | {p.comparison_fmr:.2g} | "
                     f"{p.threshold:.4f} | {p.threshold:.4f} | {fnmr(p.threshold, SINGLE)} | "
                     f"{fnmr(p.threshold, FUSED)} | {'yes' if p.supported else 'no'} |")
    return "\n".join(lines)


def cmd_thresholds(args: argparse.Namespace) -> int:
    from ..face.models import default_pack
    from ..gallery.decision import DecisionPolicy
    from ..gallery.scoremodel import load_score_model

    model = load_score_model(default_pack().model_id, args.score_model)
    given = {"fmr_1to1": args.fmr, "fpir_1toN": args.fpir,
             "confidence_1toN": args.confidence_1ton}
    policy = DecisionPolicy(**{k: v for k, v in given.items() if v is not None})
    if args.no_worst_group:
        model = model.with_worst_group(False)
    doc = thresholds_document(model, policy, args.gallery_size)
    if args.table:
        print(thresholds_table(model, policy))
        if model.groups:
            print(f"\nWithin-group rates (worst-group rule "
                  f"{'on' if model.worst_group else 'off'}; docs/demographics.md):\n")
            print(group_table(model, policy))
    elif args.json:
        json.dump(doc, sys.stdout)
        print()
    else:
        one, many = doc["one_to_one"], doc["one_to_many"]
        print(f"1:1  FMR {one['fmr']:g}: threshold {one['threshold']:.4f}")
        print(f"1:N  FPIR {many['fpir']:g} at N={many['gallery_size']}: threshold "
              f"{many['threshold']:.4f} ({'supported' if many['supported'] else 'NOT supported'}"
              f" by the calibration data; up to N={many['max_supported_gallery_size']})")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "calibrate")
    p.add_argument("--labels", required=True,
                   help="folder with labels.csv (file,identity) and the photos it names")
    p.add_argument("--out", required=True, help="score model JSON to write")
    p.add_argument("--report", help="label-noise report JSON (default: beside --out)")
    p.add_argument("--bootstrap", type=int, default=200, help="identity resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, help="reuse/keep the embedded photos in this folder")
    p.add_argument("--workers", type=int, default=2, help="photos analysed at once")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per call")
    p.add_argument("--worst-group", action=argparse.BooleanOptionalAction, default=None,
                   help="with a 'group' column in labels.csv (nationality, say): every "
                        "threshold also holds in the worst group, one threshold for "
                        "everyone (default: on where groups are given; docs/demographics.md)")
    p.add_argument("--group-confidence", type=float, default=0.5,
                   help="confidence of each group's bound under --worst-group (at most the "
                        "threshold's own; 0: the threshold's own). Default 0.5, each group's "
                        "median; the 95%% bound is reported beside it")
    p.add_argument("--min-group-people", type=int, default=30,
                   help="people a group needs to be reported and to set thresholds")
    add_model_pack_options(p)  # the pack to calibrate, as 'matcher serve' takes it
    p.set_defaults(func=cmd_calibrate)

    p = add_command(subparsers, "thresholds")
    p.add_argument("--json", action="store_true")
    p.add_argument("--table", action="store_true",
                   help="a markdown table over FMR targets and gallery sizes")
    p.add_argument("--gallery-size", type=int, default=1,
                   help="N of one 1:N search: travellers whose booking window is open "
                        "(one fused template each; default 1)")
    p.add_argument("--fmr", type=float, help="1:1 target FMR (default: the service's)")
    p.add_argument("--fpir", type=float, help="1:N target FPIR (default: the service's)")
    p.add_argument("--confidence-1ton", type=float, metavar="LEVEL",
                   help="confidence of the 1:N bound (default: the service's)")
    p.add_argument("--no-worst-group", action="store_true",
                   help="show the population thresholds of a score model made with the "
                        "worst-group rule (what the service would use without it)")
    p.add_argument("--score-model", type=Path,
                   help="score model JSON (default: the one shipped for the default models)")
    p.set_defaults(func=cmd_thresholds)
