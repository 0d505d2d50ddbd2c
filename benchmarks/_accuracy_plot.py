"""The seven lfw-dev panels of the accuracy suite's picture."""
from __future__ import annotations

import numpy as np

from matcher.gallery.scoremodel import gpd_sf

from ._accuracy_lfw import OLD_THRESHOLD


def plot_lfw(axes, lfw: dict) -> None:
    """axes: 7 matplotlib axes; lfw: what _accuracy_lfw.lfw_accuracy returned."""
    one, o = lfw["one_to_one"], lfw["open_set"]
    _scores(axes[0], one)
    _det(axes[1], one, lfw["detector"])
    _tail(axes[2], one, lfw)
    _fnir_fpir(axes[3], o)
    _growth(axes[4], o)
    _design(axes[5], lfw["design"])
    _folds(axes[6], lfw["pairs"])


def _scores(ax, one: dict) -> None:
    ver = one["verification"]
    pairs = ver.pairs
    centres = (pairs.bin_edges[:-1] + pairs.bin_edges[1:]) / 2
    coarse = 40  # 4000 bins of 0.0005 -> 100 of 0.02
    imp = pairs.histogram.reshape(-1, coarse).sum(1)
    x = centres.reshape(-1, coarse).mean(1)
    ax.semilogy(x, imp / imp.sum(), color="tab:red", label=f"impostor ({imp.sum():,} pairs)")
    gen, _ = np.histogram(ver.genuine, bins=pairs.bin_edges[::coarse])
    ax.semilogy(x, gen / gen.sum(), color="tab:green",
                label=f"genuine ({len(ver.genuine):,} pairs)")
    ax.axvline(one["threshold"], color="k", lw=1, label=f"shipped 1:1 {one['threshold']:.3f}")
    ax.axvline(OLD_THRESHOLD, color="k", ls=":", lw=1, label=f"old Gaussian {OLD_THRESHOLD}")
    ax.set_xlim(-0.3, 1.0)
    ax.set_xlabel("cosine")
    ax.set_ylabel("fraction of pairs (log)")
    ax.set_title("lfw-dev scores (<= 10 photos a person)")
    ax.legend(fontsize=7)


def _det(ax, one: dict, curves: dict) -> None:
    # The 640x640 reference curve is there only when its variant was measured, so there
    # may be fewer curves than colours.
    for (label, c), colour in zip(curves.items(), ("tab:blue", "tab:orange"), strict=False):
        ax.loglog(c["fmr"], c["fnmr"], color=colour, label=label)
        ax.fill_between(c["fmr"], np.maximum(c["lo"], 1e-4), np.maximum(c["hi"], 1e-4),
                        color=colour, alpha=0.2, lw=0)
    ax.plot([one["fmr_point"]], [one["fnmr_point"]], "ko",
            label=f"shipped 1:1 threshold {one['threshold']:.3f}")
    ax.axvline(1e-5, color="grey", ls="--", lw=1, label="promised FMR 1e-5")
    ax.set_xlabel("FMR")
    ax.set_ylabel("FNMR")
    ax.set_title("1:1 DET with 95% band (identities resampled)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _tail(ax, one: dict, lfw: dict) -> None:
    ver = one["verification"]
    total = ver.impostor_total(np.ones((1, len(ver.photos))))[0]
    ranks = np.unique(np.geomspace(1, len(ver.tail_desc), 400).astype(int)) - 1
    ax.semilogy(ver.tail_desc[ranks], (ranks + 1) / total, ".", ms=3, color="tab:red",
                label="empirical (this run)")
    model = lfw["model"]
    u, xi, sigma = model.tail
    s = np.linspace(u, 1.0, 200)
    ax.semilogy(s, model.tail_fmr * gpd_sf(s - u, xi, sigma), "k-", lw=1,
                label=f"shipped GPD tail (xi {xi:.3f})")
    upper = np.array([model.fmr_upper_at(x) for x in s])
    ax.semilogy(s, upper, "k--", lw=1, label="its 95% upper bound")
    ax.axvline(one["threshold"], color="tab:blue", lw=1,
               label=f"1:1 threshold {one['threshold']:.3f}")
    for row in lfw["open_set"].growth[-1:] + lfw["open_set"].modelled[-1:]:
        ax.axvline(row["threshold"], color="tab:purple", ls=":", lw=1,
                   label=f"1:N threshold N={row['n']:,}: {row['threshold']:.3f}")
    ax.set_ylim(1e-10, 1e-1)
    ax.set_xlim(0.15, 1.0)
    ax.set_xlabel("score")
    ax.set_ylabel("impostor FMR (pairs >= score)")
    ax.set_title("impostor tail vs the shipped score model")
    ax.legend(fontsize=7)


def _fnir_fpir(ax, o) -> None:
    fpir, fnir = o.curve
    ax.semilogx(fpir, fnir, "b-", label=f"open set, N={len(o.people):,}")
    pts = np.array([(f, o.fnir_at[0, k], *np.quantile(o.fnir_at[1:, k], [0.025, 0.975]))
                    for k, f in enumerate((0.01, 0.003, 0.001))])
    ax.errorbar(pts[:, 0], pts[:, 1], yerr=[pts[:, 1] - pts[:, 2], pts[:, 3] - pts[:, 1]],
                fmt="ko", capsize=3, label="FNIR at FPIR 1e-2 / 3e-3 / 1e-3 (95% CI)")
    ax.set_yscale("log")
    ax.set_ylim(1e-3, 1.0)
    ax.set_xlabel("FPIR (threshold set on the non-mated probes)")
    ax.set_ylabel("FNIR")
    ax.set_title("1:N FNIR vs FPIR")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _growth(ax, o) -> None:
    n = np.array([r["n"] for r in o.growth])
    for key, colour in (("fpir", "tab:red"), ("fnir", "tab:blue")):
        point = np.array([r[key]["point"] for r in o.growth])
        lo = np.array([r[key]["lo"] for r in o.growth])
        hi = np.array([r[key]["hi"] for r in o.growth])
        ax.errorbar(n, np.maximum(point, 1e-5), yerr=[point - lo, hi - point], fmt="o-",
                    color=colour, capsize=3, label=f"measured {key.upper()} (95% CI)")
    m = [(r["n"], r["upper"]) for r in o.modelled]
    if m:
        ax.loglog(*zip(*m, strict=True), "s--", color="tab:red", alpha=0.6,
                  label="modelled FPIR (N x upper FMR)")
    ax.axhline(1e-3, color="grey", ls="--", lw=1, label="promised FPIR 1e-3")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gallery size N")
    ax.set_ylabel("rate (zeros drawn at 1e-5)")
    ax.set_title("at the service's thresholds, as the gallery grows")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _design(ax, rows: list[dict]) -> None:
    y = np.arange(len(rows))
    point = np.array([r["point"] for r in rows])
    err = [point - np.array([r["lo"] for r in rows]), np.array([r["hi"] for r in rows]) - point]
    colours = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green", "d": "tab:purple",
               "e": "tab:red"}
    floor = 1e-3  # zeros drawn here on the log axis
    ax.barh(y, np.maximum(point, floor), xerr=err, color=[colours[r["item"]] for r in rows],
            capsize=2)
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_yticks(y, [f"({r['item']}) {r['label']}" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("FNIR at FPIR 1e-2 (threshold from the data) or at the service threshold "
                  "(service t); 95% CI, zeros at 1e-3")
    ax.set_title("issue 10 item 4: design choices on lfw-dev")


def _folds(ax, pairs: dict) -> None:
    x = np.arange(1, len(pairs["fold_accuracy"]) + 1)
    for acc, dx, label, colour in ((pairs["fold_accuracy"], -0.2, "quality gate on (refused = -1)",
                                    "tab:gray"),
                                   (pairs["fold_accuracy_ungated"], 0.2, "no quality gate",
                                    "tab:blue")):
        ax.bar(x + dx, acc * 100, width=0.4, color=colour,
               label=f"{label}: mean {acc.mean():.2%}")
    ax.axhline(99.70, color="tab:green", ls="--", lw=1, label="published 99.70 % (full LFW)")
    ax.set_ylim(max(80.0, min(pairs["fold_accuracy"].min() * 100 - 1, 99.0)), 100.2)
    ax.set_xticks(x)
    ax.set_xlabel("fold (recovered from pairs.txt order; uneven)")
    ax.set_ylabel("accuracy %")
    ax.set_title("LFW pairs, 10-fold")
    ax.legend(fontsize=7, loc="lower left")
