"""``matcher calibrate`` and ``matcher thresholds``: derive a score model, show what it sets."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .options import add_command, add_model_pack_options, model_pack


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..calibrate import calibrate, write_json
    from ..face.pipeline import Pipeline

    # Exactly the served pipeline: default detector settings and quality gate.
    pipeline = Pipeline(model_pack(args), threads=args.threads, flip=args.flip_augment)
    model, report = calibrate(Path(args.labels), pipeline, cache_dir=args.cache,
                              bootstrap=args.bootstrap, seed=args.seed, workers=args.workers)
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
    for fmr in (1e-4, 1e-5, 1e-6):
        t = model.threshold_at_fmr(fmr)
        print(f"  FMR {fmr:g}: threshold {t:.4f} ({model.confidence:.0%} upper bound; "
              f"estimate {model.threshold_estimate(fmr):.4f}), FNMR on this data "
              f"{model.fnmr_at(t)[0]:.2%} with one booking photo, "
              f"{model.fnmr_at(t, 'fused')[0]:.2%} with two fused")
    print(f"  data supports per-comparison FMR down to {model.supported_floor:.2g}")
    return 0


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
        "score_model": {"settings_hash": model.settings_hash,
                        "fmr_floor": model.supported_floor,
                        "source": {k: model.document.get("source", {}).get(k) for k in
                                   ("folder", "photos", "identities", "impostor_pairs",
                                    "genuine_pairs")},
                        "created": model.document.get("created")},
    }


def thresholds_table(model, policy) -> str:
    """Markdown: thresholds and FNMR on the calibration data, 1:1 by FMR, 1:N by size."""
    from ..gallery.decision import operating_point_1to1, operating_point_1toN

    def fnmr(t: float, kind: str | None = None) -> str:
        f, lo, hi = model.fnmr_at(t, kind)
        return f"{f:.2%} ({lo:.2%}-{hi:.2%})"

    lines = ["| mode | target | N | FMR per comparison | threshold (confidence) | estimate "
             "| FNMR, one booking photo (95% CI) | FNMR, two fused | supported |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fmr in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
        p = operating_point_1to1(model, fmr, policy.min_threshold, policy.confidence_1to1)
        lines.append(f"| 1:1 | FMR {fmr:g} | | {fmr:.2g} | {p.threshold:.4f} "
                     f"({policy.confidence_1to1:.0%}) | {model.threshold_estimate(fmr):.4f} | "
                     f"{fnmr(p.threshold)} | {fnmr(p.threshold, 'fused')} | "
                     f"{'yes' if p.supported else 'no'} |")
    for n in (10, 100, 1_000, 10_000, 30_000, 40_000, 100_000, 1_000_000):
        p = operating_point_1toN(model, policy.fpir_1toN, n, policy.min_threshold,
                                 policy.confidence_1toN)
        lines.append(f"| 1:N | FPIR {policy.fpir_1toN:g} | {n:,} | {p.comparison_fmr:.2g} | "
                     f"{p.threshold:.4f} ({policy.confidence_1toN:.0%}) | "
                     f"{model.threshold_estimate(p.comparison_fmr):.4f} | {fnmr(p.threshold)} | "
                     f"{fnmr(p.threshold, 'fused')} | {'yes' if p.supported else 'no'} |")
    return "\n".join(lines)


def cmd_thresholds(args: argparse.Namespace) -> int:
    from ..face.models import default_pack
    from ..gallery.decision import DecisionPolicy
    from ..gallery.scoremodel import load_score_model

    model = load_score_model(default_pack().model_id, args.score_model)
    given = {"fmr_1to1": args.fmr, "fpir_1toN": args.fpir}
    policy = DecisionPolicy(**{k: v for k, v in given.items() if v is not None})
    doc = thresholds_document(model, policy, args.gallery_size)
    if args.table:
        print(thresholds_table(model, policy))
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
    p.add_argument("--score-model", type=Path,
                   help="score model JSON (default: the one shipped for the default models)")
    p.set_defaults(func=cmd_thresholds)
