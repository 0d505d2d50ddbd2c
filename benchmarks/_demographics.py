"""Demographic differentials on lfw-dev (issue 21): one threshold for everyone, the false-
match and false non-match rates inside each group, and what thresholds that hold in the
worst group would cost. Called by the accuracy suite (_accuracy_lfw.lfw_accuracy); run
alone for its own report and picture:

    python -m benchmarks._demographics [--quick] [--lfw DIR] --out DIR
    python -m benchmarks._demographics --labels-out DIR   # lfw-dev labels with a group column

The grouping. LFW carries no demographic labels, so people are grouped by their *names*
(a heuristic, not a label; ``name_group``): "east_asian_name" when the name has the form of
a Chinese, Korean or Japanese name (the surname lists below, in the position the name order
puts a surname, or a family name followed by a hyphenated Korean/Chinese given name),
"other" for everyone else. On lfw-dev it puts 119 people in the first group. Its limits:

* A name is not a face nor an ancestry: Chinese-, Japanese- and Korean-American or -British
  people with such a surname are in (Connie_Chung, Kurt_Suzuki, Debra_Yang), East Asian
  people with Western or unlisted names are out (a Japanese surname list is never complete:
  the list below was completed from the lfw-dev names that a Japanese-syllable check picked
  out, each a real Japanese surname), and married names mislead both ways.
* Surnames shared with English (Lee, Young, Long, Park, Moon, Song, Kang, Jung, ...) count
  only where the name order shows a surname (family-first with a hyphenated given name, or
  given-first with a split given name: Wen_Ho_Lee, Jong_Wook_Lee); Spike_Lee and
  Kim_Weeks stay out. One false hit was checked by hand and is listed (NOT_EAST_ASIAN).
* Southeast Asian, Central Asian (Kazakh: the Khorgos case) and other groups are not
  separated: the "other" group is everyone else, mostly European and American.
* LFW's East Asian people are public figures with one or two news photos each (265 photos
  of 119 people): 29 k within-group impostor pairs resolve FMR to about 1e-4, not the
  promised 1e-5.

The figures: the population's thresholds (the shipped score model), the same model with
within-group models fitted to these templates (matcher.calibrate.groups.attach_groups: what
``matcher calibrate`` adds with a group column; the population part stays the shipped one),
group_report's per-group rates with identity-bootstrap intervals, a placebo (random groups
of the same size drawn from "other": how far chance alone moves a group's FMR), the
coverage run MIN_GROUP_PEOPLE is derived from, and the FNMR / FNIR price of the worst-group
thresholds, measured and through the open-set protocol.
"""
from __future__ import annotations

import re

import numpy as np

from matcher.calibrate.fit import MIN_RESOLVED_PAIRS, fit_score_model
from matcher.calibrate.groups import GROUP_CONFIDENCE, MIN_GROUP_PEOPLE, attach_groups
from matcher.calibrate.pairs import capped_rows, kind_pairs, score_pairs
from matcher.calibrate.report import group_report
from matcher.errors import InvalidInput
from matcher.face.pipeline import Pipeline
from matcher.gallery.decision import operating_point_1to1, operating_point_1toN
from matcher.gallery.scoremodel import FUSED, SINGLE

from . import _openset as ops
from ._lfw import Verification, det_band, embedded_lfw, load_lfw, with_ci
from .harness import Report

EAST_ASIAN, OTHER = "east_asian_name", "other"

# Pinyin, Wade-Giles, Cantonese and Hokkien spellings of common Chinese surnames.
CHINESE = set("""
Wang Li Zhang Liu Chen Yang Huang Zhao Wu Zhou Xu Sun Ma Zhu Hu Guo He Lin Gao Luo Zheng
Liang Xie Song Tang Han Feng Deng Cao Peng Zeng Xiao Tian Dong Pan Yuan Cai Jiang Yu Du Ye
Cheng Wei Su Lu Ding Ren Shen Yao Zhong Cui Tan Fan Liao Shi Jin Jia Xia Fu Fang Zou Xiong
Bai Meng Qin Qiu Hou Yin Xue Yan Duan Lei Long Tao Mao Hao Gu Gong Shao Wan Qian Dai Mo Kong
Xiang Chang Chan Wong Cheung Lau Leung Ho Ng Tsang Chow Lam Yip Kwok Tse Chiang Hsieh Chou
Hsu Tsai Kuo Yeh Lo Koo Tung Teo Goh Lim Ong Chiu Chu Chung Soong Tsao Hsiao Lien Kuan
""".split())
# Common Korean surnames (Revised and McCune-Reischauer spellings).
KOREAN = set("""
Kim Lee Park Choi Jung Jeong Chung Kang Cho Jo Yoon Yun Jang Lim Han Oh Seo Suh Shin Kwon
Hwang Ahn Song Ryu Yoo Hong Jeon Ko Moon Yang Son Bae Baek Roh Ro Noh Ha Nam Heo Yu Kwak
Sung Chun Rhee Ban Ham Myung
""".split())
# Common Japanese surnames, and (last two lines) the lfw-dev ones a syllable check found.
JAPANESE = set("""
Sato Suzuki Takahashi Tanaka Watanabe Ito Yamamoto Nakamura Kobayashi Kato Yoshida Yamada
Sasaki Yamaguchi Matsumoto Inoue Kimura Hayashi Shimizu Yamazaki Yamasaki Mori Abe Ikeda
Hashimoto Yamashita Ishikawa Nakajima Maeda Fujita Ogawa Goto Okada Hasegawa Murakami Kondo
Ishii Saito Sakamoto Endo Aoki Fujii Nishimura Fukuda Ota Miura Fujiwara Okamoto Matsuda
Nakagawa Nakano Harada Ono Tamura Takeuchi Kaneko Wada Nakayama Ishida Ueda Morita Hara
Shibata Sakai Kudo Yokoyama Miyazaki Miyamoto Uchida Takagi Ando Taniguchi Ohno Maruyama
Imai Takada Fujimoto Takeda Murata Ueno Sugiyama Masuda Sugawara Hirano Otsuka Chiba Kubo
Matsui Iwasaki Sakurai Kinoshita Noguchi Matsuo Nomura Kikuchi Sano Onishi Sugimoto Arai
Koizumi Obuchi Hosokawa Kawaguchi Tanigaki Oshima Koike Kawabata Nakasone Hata Miyazawa
Okuda Ozawa Takenaka Kawakami Nagano Noda Nakata Kitajima Katayama Hagiwara Ishiba Izawa
Hiranuma Motegi Matsuura Haraguchi Kamei Tokuyama Inamoto Sorimachi Kanzaki Hayami Masumoto
Tabei Gomi Kawabuchi Oguchi Oshitani Hasuike Chimura Morigami Urushima Okudo Shinseki Ohata
""".split())
SURNAMES = CHINESE | KOREAN | JAPANESE
GIVEN_NAMES_TOO = {"Kim", "Lee", "Jo", "Young", "Chan", "Ho"}   # also English given names
SURNAMES_TOO = {"Lee", "Long", "Young", "Moon", "Park", "Song", "Oh", "Ha", "Ko", "Lim", "Han",
                "Lo", "Ma", "Mo", "Yu", "Ban", "Ham", "Ro", "Nam", "Son", "Jung", "Kang"}
# Family name, then a hyphenated two-syllable given name: Kim_Dae-jung, Chen_Shui-bian.
HYPHENATED_GIVEN = re.compile(r"^[A-Z][a-z]{1,5}_[A-Z][a-z]+-[a-z]+$")
# Checked by hand: the rules put them in, the person is not (an Indonesian name).
NOT_EAST_ASIAN = {"Dai_Bachtiar"}


def name_group(name: str) -> str:
    """EAST_ASIAN or OTHER for an LFW name (``First_Last``); see the module docstring."""
    if name in NOT_EAST_ASIAN:
        return OTHER
    words = name.split("_")
    first, last = words[0], words[-1]
    if HYPHENATED_GIVEN.match(name):
        return EAST_ASIAN
    if len(words) >= 2 and first in SURNAMES and (
            "-" in words[1] or (len(words) == 2 and first not in GIVEN_NAMES_TOO)):
        return EAST_ASIAN                                  # family name first
    if len(words) >= 2 and last in SURNAMES and (last not in SURNAMES_TOO or len(words) >= 3):
        return EAST_ASIAN                                  # given name first
    return OTHER


# -- the benchmark --------------------------------------------------------------------

PLACEBO_DRAWS = (100, 1_000)          # quick, full
PLACEBO_THRESHOLD_DRAWS = 100         # full runs only (a tail fit each)
COVERAGE_SIZES = (10, 20, 30, 50)
COVERAGE_DRAWS = 200
COVERAGE_EXPECTED_PAIRS = 5


def demographics(report: Report, lfw, open_set=None) -> dict:
    """Record the per-group figures and checks of lfw-dev; returns what the plot needs.

    lfw: _lfw.Lfw (label noise merged); open_set: its OpenSet (built if None)."""
    quick = lfw.quick
    # As `matcher calibrate` sees lfw-dev (label noise dropped as pairs, not merged into one
    # identity as the rest of the suite does), so the thresholds here are the ones a
    # calibration with a group column would ship.
    raw = embedded_lfw(lfw.folder, Pipeline(threads=1), quick)
    rows = capped_rows(raw.identities, raw.usable())
    x, ids = raw.templates[rows], raw.identities[rows]
    groups = {str(n): name_group(str(n)) for n in np.unique(np.concatenate([ids, lfw.names]))}
    members = sorted(n for n, g in groups.items() if g == EAST_ASIAN)
    report.param(demographics={
        "grouping": "name heuristic (benchmarks/_demographics.py: surname lists and name "
                    "order), not a label; limits in the module docstring",
        "people": {g: sum(v == g for v in groups.values()) for g in (EAST_ASIAN, OTHER)},
        "east_asian_names": members,
        "min_group_people": MIN_GROUP_PEOPLE,
        "group_confidence": GROUP_CONFIDENCE,
        "population_model": "the shipped score model; within-group models fitted to these "
                            "templates (matcher.calibrate.groups.attach_groups), label noise "
                            "dropped as matcher calibrate drops it; DET and open set on the "
                            "suite's merged identities"})
    source = lfw.model.document.get("source", {})
    drop, apart = source.get("label_noise_dropped", []), source.get("look_alikes_apart", [])
    bootstrap = 50 if quick else 200
    model, skipped = attach_groups(lfw.model, x, ids, groups, drop=drop, apart=apart,
                                   worst_group=True, group_confidence=GROUP_CONFIDENCE,
                                   bootstrap=bootstrap)
    out = {"model": model, "skipped": skipped, "policy": lfw.policy}
    report.param(demographics_not_reported=skipped)
    rep = group_report(model, x, ids, groups, lfw.policy, drop=drop, apart=apart,
                       skipped=skipped, bootstrap=bootstrap)
    out["report"] = rep
    _record_points(report, rep)
    _sensitivity(report, model, lfw.policy)
    if EAST_ASIAN in model.groups:
        out["placebo"] = _placebo(report, lfw, x, ids, groups, drop, quick)
    if not quick:
        out["coverage"] = _coverage(report, x, ids, groups)
    out["cost"] = _cost(report, lfw, model, groups, open_set)
    merged = capped_rows(lfw.embedded.identities, lfw.embedded.usable())
    xm, idm = lfw.embedded.templates[merged], lfw.embedded.identities[merged]
    out["det"] = {name: det_band(Verification(_pairs(xm, idm, groups, name), lfw.names), lfw.W)
                  for name in ["all", *model.groups]}
    if not quick:
        _checks(report, model, rep, lfw.policy)
    return out


def _pairs(x, ids, groups, name):
    mask = np.ones(len(ids), bool) if name == "all" else np.array(
        [groups[str(i)] == name for i in ids])
    return score_pairs(x[mask], ids[mask])


def _key(row: dict) -> str:
    n = f"_n{row['gallery_size']}" if row["gallery_size"] else ""
    return f"{row['mode'].replace(':', 'to')}{n}_{row['kind']}"


def _record_points(report: Report, rep: dict) -> None:
    """One figure per group, operating point and threshold (population / worst group)."""
    for row in rep["points"]:
        for name, entry in row["rates"].items():
            for label in row["threshold"]:
                r = entry[label]
                tag = f"demo_{_key(row)}_{name}_{label}"
                ci = r["fmr_ci95"]
                model = (f"; its tail fit {r['fmr_model']:.2g} (bound {r['fmr_model_upper']:.2g})"
                         if "fmr_model" in r else "")
                headline = (name == EAST_ASIAN and row["mode"] == "1:1"
                            and row["kind"] == SINGLE)
                report.figure(f"{tag}_fmr", r["fmr"], "rate", summary=headline,
                              resolved=r["resolved"],
                              note=f"{row['target']}, threshold {row['threshold'][label]:.4f}: "
                                   f"{r['false_matches']} of {r['impostor_pairs']:,} within-"
                                   f"group pairs (95% CI {ci[0]:.2g}..{ci[1]:.2g}); "
                                   f"{'resolved' if r['resolved'] else 'NOT resolved'}{model}")
                lo, hi = r["fnmr_ci95"]
                report.figure(f"{tag}_fnmr", r["fnmr"], "rate", summary=headline,
                              note=f"{r['genuine_pairs']} genuine pairs; 95% CI "
                                   f"{lo:.3g}..{hi:.3g}")
        diff = row["differential"]
        if diff.get("max_over_min_measured") is not None:
            report.figure(f"demo_{_key(row)}_differential", diff["max_over_min_measured"], "x",
                          note=f"highest group FMR over lowest at the population threshold; "
                               f"highest: {diff['highest_fmr']}")


def _sensitivity(report: Report, model, policy) -> None:
    """How each group's 1:1 threshold at the promised FMR depends on the method: the tail
    fit's point estimate, the median of the identity resamples (the worst-group rule's
    default) and their 95 % bound; with the look-alike pairs kept (1:1) and apart (1:N)."""
    out = {}
    for variant, source in (("look-alikes kept", model), ("look-alikes apart",
                                                          model.for_search)):
        for name, g in source.groups.items():
            f = policy.fmr_1to1
            out[f"{name}, {variant}"] = {
                "estimate": round(g.threshold_estimate(f), 4),
                "median": round(g.threshold_at_fmr(f, 0.5, SINGLE), 4),
                "bound_95": round(g.threshold_at_fmr(f, 0.95, SINGLE), 4),
                "fmr_floor": g.fmr_floor}
    report.param(demographics_group_thresholds_at_fmr_1to1=out)


def _placebo(report: Report, lfw, x, ids, groups, drop, quick: bool) -> dict:
    """Random groups of the East-Asian group's size drawn from "other": their within-group
    FMR at the population's thresholds, against the East-Asian group's (a permutation
    test: is the differential more than chance?)."""
    draws = PLACEBO_DRAWS[0 if quick else 1]
    bad = {frozenset((d["a"], d["b"])) for d in drop}
    thresholds = {f"fmr_{f:g}": operating_point_1to1(lfw.model, f, lfw.policy.min_threshold,
                                                     lfw.policy.confidence_1to1,
                                                     SINGLE).threshold
                  for f in (1e-3, 1e-4, lfw.policy.fmr_1to1)}

    def rates(mask: np.ndarray) -> np.ndarray:
        p = score_pairs(x[mask], ids[mask])
        keep = np.array([frozenset((p.identity_names[a], p.identity_names[b])) not in bad
                         for a, b in zip(p.tail_a, p.tail_b, strict=True)], bool)
        total = p.impostor_pairs - int((~keep).sum())
        return np.array([(p.tail[keep] >= t).sum() / total for t in thresholds.values()])

    of = np.array([groups[str(i)] for i in ids])
    target = rates(of == EAST_ASIAN)
    others = np.unique(ids[of == OTHER])
    k = len(np.unique(ids[of == EAST_ASIAN]))
    rng = np.random.default_rng(0)
    null = np.array([rates(np.isin(ids, rng.choice(others, k, replace=False)))
                     for _ in range(draws)])
    out = {}
    for j, (label, t) in enumerate(thresholds.items()):
        p_value = float((null[:, j] >= target[j]).mean())
        report.figure(f"demo_placebo_{label}_east_asian_fmr", target[j], "rate",
                      summary=True,
                      note=f"at the population 1:1 threshold {t:.4f}; random {k}-person "
                           f"groups from '{OTHER}': median {np.median(null[:, j]):.2g}, 95th "
                           f"percentile {np.quantile(null[:, j], 0.95):.2g}; {p_value:.3f} of "
                           f"{draws} reach the East-Asian group's rate")
        report.figure(f"demo_placebo_{label}_p_value", p_value, "fraction")
        out[label] = {"threshold": t, "group": float(target[j]), "null": null[:, j],
                      "p_value": p_value}
    if not quick:
        out["threshold"] = _placebo_thresholds(report, lfw, x, ids, of, others, k, bad)
    return out


def _placebo_thresholds(report: Report, lfw, x, ids, of, others, k: int, bad) -> dict:
    """The worst-group rule's false alarm: the 1:1 threshold random groups of the East-
    Asian group's size (no differential but chance) would set at the rule's confidence,
    against the East-Asian group's and the population's."""
    f, c = lfw.policy.fmr_1to1, GROUP_CONFIDENCE
    drop = [{"a": a, "b": b} for a, b in (tuple(pair) for pair in bad)]

    def group_threshold(mask: np.ndarray) -> float:
        pairs = kind_pairs(x[mask], ids[mask], drop)[SINGLE]
        return fit_score_model(pairs, "placebo", "placebo").threshold_at_fmr(
            f, c)

    population = operating_point_1to1(lfw.model, f, lfw.policy.min_threshold,
                                      lfw.policy.confidence_1to1, SINGLE).threshold
    group = group_threshold(of == EAST_ASIAN)
    rng = np.random.default_rng(2)
    null = []
    for _ in range(PLACEBO_THRESHOLD_DRAWS):
        try:
            null.append(group_threshold(np.isin(ids, rng.choice(others, k, replace=False))))
        except InvalidInput:  # too few high pairs for a tail fit: the group is not reported
            continue
    null = np.asarray(null)
    raised = float((null > population + 0.02).mean())
    report.figure("demo_placebo_group_threshold_east_asian", group, "cosine", summary=True,
                  note=f"the East-Asian group's 1:1 threshold at FMR {f:g}, confidence "
                       f"{c:g} (population {population:.4f}); {len(null)} random {k}-person "
                       f"groups from '{OTHER}': median {np.median(null):.4f}, 90th percentile "
                       f"{np.quantile(null, 0.9):.4f}, {(null >= group).mean():.3f} reach it")
    report.figure("demo_placebo_group_threshold_raised", raised, "fraction",
                  note=f"random {k}-person groups whose threshold would raise everyone's by "
                       "more than 0.02: the rule's false alarm at this group size")
    return {"population": population, "group": group, "null": null}


def _coverage(report: Report, x, ids, groups) -> dict:
    """The derivation of MIN_GROUP_PEOPLE: random groups of k people from "other"; at the
    threshold where a k-person group expects COVERAGE_EXPECTED_PAIRS false matches, how
    often the 95 % identity-bootstrap interval of its FMR covers the population's rate."""
    of = np.array([groups[str(i)] for i in ids])
    x, ids = x[of == OTHER], ids[of == OTHER]
    names, person = np.unique(ids, return_inverse=True)
    photos = np.bincount(person)
    everyone = score_pairs(x, ids, tail_keep=-1.0)
    desc = np.sort(everyone.tail)[::-1]
    rng = np.random.default_rng(1)
    out = {}
    for k in COVERAGE_SIZES:
        counts = [rng.choice(photos, k, replace=False) for _ in range(COVERAGE_DRAWS)]
        expected_pairs = float(np.mean([(c.sum() ** 2 - (c ** 2).sum()) / 2 for c in counts]))
        rank = int(COVERAGE_EXPECTED_PAIRS / expected_pairs * everyone.impostor_pairs)
        t = float(desc[rank])
        rate = float((desc >= t).sum() / everyone.impostor_pairs)
        covered = []
        for _ in range(COVERAGE_DRAWS):
            mask = np.isin(person, rng.choice(len(names), k, replace=False))
            p = score_pairs(x[mask], ids[mask], tail_keep=-1.0)
            m = len(p.identity_names)
            W = np.vstack([np.ones(m), rng.multinomial(m, np.full(m, 1 / m), size=200)])
            per = W * p.photos_per_identity
            total = (per.sum(1) ** 2 - (per ** 2).sum(1)) / 2
            hot = p.tail >= t
            fmr = (W[:, p.tail_a[hot]] * W[:, p.tail_b[hot]]).sum(1) / total
            lo, hi = np.quantile(fmr[1:], [0.025, 0.975])
            covered.append(lo <= rate <= hi)
        out[k] = float(np.mean(covered))
        report.figure(f"demo_group_size_coverage_k{k}", out[k], "fraction",
                      note=f"{COVERAGE_DRAWS} random {k}-person groups; population FMR "
                           f"{rate:.2g} at {t:.4f} (~{COVERAGE_EXPECTED_PAIRS} expected pairs "
                           f"in a group of {expected_pairs:.0f} pairs); MIN_GROUP_PEOPLE = "
                           f"{MIN_GROUP_PEOPLE}")
    return out


def _cost(report: Report, lfw, model, groups, open_set) -> dict:
    """What the worst-group thresholds cost: 1:N FNIR (and FPIR) through the open-set
    protocol at N = its gallery, overall and by the probe's group, and the FNIR to expect
    at larger N from the model (FNMR of the booking kind at the 1:N threshold)."""
    o = open_set or ops.open_set_of(lfw)
    r, g = o.ranked, len(o.people)
    population = model.with_worst_group(False)
    of_person = np.array([groups[str(n)] for n in lfw.names])
    out = {"open_set": {}, "expected": []}
    for label, m in (("population", population), ("worst_group", model)):
        t = operating_point_1toN(m, lfw.policy.fpir_1toN, g, lfw.policy.min_threshold,
                                 lfw.policy.confidence_1toN).threshold
        for who in ("all", *model.groups):
            keep = (np.ones(len(r.top1), bool) if who == "all"
                    else of_person[r.probe_person] == who)
            sub = ops.Ranked(r.top1[keep], r.top1_person[keep], r.top2[keep],
                             r.probe_person[keep], r.mated[keep])
            if not sub.mated.any() or sub.mated.all():
                continue
            fnir, fpir = ops.rates(sub, t, lfw.policy.margin, lfw.W)
            a, b = with_ci(fnir), with_ci(fpir)
            mated, non = int(sub.mated.sum()), int((~sub.mated).sum())
            report.figure(f"demo_1toN_n{g}_{who}_{label}_fnir", a["point"], "rate",
                          summary=who == "all",
                          note=f"open set, threshold {t:.4f}; {mated} mated probes of this "
                               f"group; 95% CI {a['lo']:.3g}..{a['hi']:.3g}")
            report.figure(f"demo_1toN_n{g}_{who}_{label}_fpir", b["point"], "rate",
                          note=f"{non} non-mated probes of this group against the whole "
                               f"gallery; 95% CI {b['lo']:.3g}..{b['hi']:.3g}")
            out["open_set"][who, label] = {"threshold": t, "fnir": a, "fpir": b,
                                           "mated": mated, "nonmated": non}
    for n in (1_000, 10_000, 40_000):
        for label, m in (("population", population), ("worst_group", model)):
            t = operating_point_1toN(m, lfw.policy.fpir_1toN, n, lfw.policy.min_threshold,
                                     lfw.policy.confidence_1toN).threshold
            for kind, booking in ((SINGLE, "one"), (FUSED, "two")):
                f, lo, hi = model.fnmr_at(t, kind)
                report.figure(f"demo_expected_fnir_n{n}_{booking}_photo_{label}", f, "rate",
                              note=f"threshold {t:.4f}; 95% CI {lo:.3g}..{hi:.3g}")
                out["expected"].append({"n": n, "label": label, "booking": booking,
                                        "threshold": t, "fnir": f})
    return out


def _checks(report: Report, model, rep: dict, policy) -> None:
    """Full runs only: a 600-person quick run has no group large enough to judge."""
    report.check("demo_east_asian_group_reported", EAST_ASIAN in model.groups,
                 f"groups reported: {sorted(model.groups)}")
    lower = [f"{row['target']} {row['kind']}" for row in rep["points"]
             if row["threshold"]["worst_group"] < row["threshold"]["population"] - 1e-12]
    report.check("demo_worst_group_never_lowers_a_threshold", not lower, "; ".join(lower))
    over = []
    for row in rep["points"]:
        for name, entry in row["rates"].items():
            r = entry["worst_group"]
            if r["resolved"] and r["fmr"] > row["comparison_fmr"]:
                over.append(f"{name} {row['target']} {row['kind']}: {r['fmr']:.3g}")
    report.check("demo_within_group_fmr<=target_where_resolved", not over,
                 "; ".join(over) or f"every group that resolves its target (>= "
                                     f"{MIN_RESOLVED_PAIRS} expected pairs) holds it at the "
                                     "worst-group thresholds")


# -- the picture ------------------------------------------------------------------------

COLOURS = {"all": "k", EAST_ASIAN: "tab:red", OTHER: "tab:blue"}


def plot_demographics(axes, d: dict) -> None:
    """axes: 3 matplotlib axes; d: what ``demographics`` returned."""
    _plot_det(axes[0], d)
    _plot_fmr(axes[1], d)
    _plot_cost(axes[2], d)


def _plot_det(ax, d: dict) -> None:
    one = next(r for r in d["report"]["points"] if r["mode"] == "1:1" and r["kind"] == SINGLE)
    for name, c in d["det"].items():
        colour = COLOURS.get(name, "tab:grey")
        ax.loglog(c["fmr"], c["fnmr"], color=colour, label=f"{name} (within-group pairs)")
        ax.fill_between(c["fmr"], np.maximum(c["lo"], 1e-4), np.maximum(c["hi"], 1e-4),
                        color=colour, alpha=0.15, lw=0)
        if name not in one["rates"]:
            continue
        for label, marker in (("population", "o"), ("worst_group", "s")):
            r = one["rates"][name].get(label)
            if r is not None:
                ax.plot([max(r["fmr"], 1e-8)], [max(r["fnmr"], 1e-4)], marker, color=colour,
                        mfc="none" if label == "worst_group" else colour, ms=7)
    ax.axvline(one["comparison_fmr"], color="grey", ls="--", lw=1,
               label=f"promised FMR {one['comparison_fmr']:g}")
    ax.set_xlabel("FMR (pairs within the group)")
    ax.set_ylabel("FNMR")
    ax.set_title("1:1 DET by group, 95% band (o population threshold, "
                 "\u25a1 worst-group threshold)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _plot_fmr(ax, d: dict) -> None:
    """Within-group FMR at the population 1:1 thresholds, with the placebo's spread."""
    placebo = d.get("placebo")
    if not placebo:
        ax.set_title("no group large enough for the placebo (quick run)")
        return
    labels = [k for k in placebo if k != "threshold"]
    for j, label in enumerate(labels):
        p = placebo[label]
        null = np.maximum(p["null"], 1e-7)
        ax.boxplot([null], positions=[j], widths=0.5, showfliers=False)
        ax.plot([j], [max(p["group"], 1e-7)], "o", color=COLOURS[EAST_ASIAN], ms=8)
        ax.annotate(f"p={p['p_value']:.3f}", (j, max(p["group"], 1e-7)), fontsize=7,
                    xytext=(6, 4), textcoords="offset points")
    ax.set_xticks(range(len(labels)), [f"t for {lab.replace('_', ' ')}\n"
                                       f"({placebo[lab]['threshold']:.3f})" for lab in labels],
                  fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("within-group FMR (zeros at 1e-7)")
    ax.set_title(f"{EAST_ASIAN} (red) vs random groups of its size (boxes)", fontsize=9)


def _plot_cost(ax, d: dict) -> None:
    """FNMR (1:1, one and two booking photos) and FNIR (1:N, expected) at the population and
    worst-group thresholds."""
    labels, pop, worst = [], [], []
    for row in d["report"]["points"]:
        if row["mode"] != "1:1":
            continue
        r = row["rates"]["all"]
        labels.append(f"1:1 FNMR, {'one photo' if row['kind'] == SINGLE else 'two fused'}")
        pop.append(r["population"]["fnmr"])
        worst.append(r.get("worst_group", r["population"])["fnmr"])
    for n in (1_000, 10_000, 40_000):
        for booking in ("one", "two"):
            rows = {e["label"]: e["fnir"] for e in d["cost"]["expected"]
                    if e["n"] == n and e["booking"] == booking}
            labels.append(f"1:N FNIR N={n:,}, {booking} photo(s)")
            pop.append(rows["population"])
            worst.append(rows.get("worst_group", rows["population"]))
    y = np.arange(len(labels))
    ax.barh(y - 0.2, pop, 0.4, label="population thresholds", color="tab:grey")
    ax.barh(y + 0.2, worst, 0.4, label="worst-group thresholds", color="tab:red")
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("miss rate on lfw-dev (all people)")
    ax.set_title("what the worst-group thresholds cost", fontsize=9)
    ax.legend(fontsize=7)


def write_grouped_labels(folder, out):
    """``out``/labels.csv: lfw-dev's rows with a group column, and ``out``/images linked
    to lfw-dev's (the photos are never copied). Returns the labels path."""
    import csv
    from pathlib import Path

    from matcher.calibrate.embedding import read_labels

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = out / "images"
    if not images.exists():
        images.symlink_to(Path(folder).resolve() / "images")
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file", "identity", "group"])
        writer.writerows((file, who, name_group(who)) for file, who in read_labels(folder))
    return out / "labels.csv"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import time
    from pathlib import Path

    from ._faces import lfw_dir
    from .harness import machine_info

    parser = argparse.ArgumentParser(prog="python -m benchmarks._demographics",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--lfw", type=Path, default=None, metavar="DIR")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--labels-out", type=Path, metavar="DIR",
                        help="only write DIR/labels.csv (file,identity,group by name_group) "
                             "beside a link to lfw-dev's images, for `matcher calibrate "
                             "--labels DIR`, and stop")
    args = parser.parse_args(argv)
    if args.lfw is not None:
        os.environ["MATCHER_LFW_DIR"] = str(args.lfw)
    folder = lfw_dir()
    if folder is None:
        parser.error("lfw-dev not found: pass --lfw DIR")
    if args.labels_out is not None:
        print(write_grouped_labels(folder, args.labels_out))
        return 0
    report = Report("demographics", args.quick)
    started = time.perf_counter()
    d = demographics(report, load_lfw(report, folder, args.quick))
    _, axes = report.plot(1, 3, figsize=(20, 6))
    plot_demographics(axes.ravel(), d)
    report.save(args.out, machine_info(), time.perf_counter() - started)
    failed = [c for c in report.failed]
    for c in failed:
        print(f"check failed: {c.name}: {c.detail}")
    print(f"{args.out / 'demographics.json'}, {args.out / 'demographics.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
