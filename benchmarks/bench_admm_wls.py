"""Reproduce the WLS figure of arXiv:2409.13451 on our reconstruction (strategies/admm_wls.py):
MSD ‖w_n − w*‖² per iteration for FedAvg, FedADMM (two noisy receptions, stored dual), the
noise-robust dual-free variant and its continual-update variant, at two link-noise levels and two
scheduling probabilities, averaged over Monte-Carlo runs.

    .venv/bin/python benchmarks/bench_admm_wls.py [--iterations 600] [--runs 20]

Writes benchmarks/results/admm_wls.{csv,png}, copies the PNG to benchmarks/figures/, and prints
the steady-state MSD (mean of the last 20% of iterations), its ratio to FedADMM's, and the
iterations each curve needs to come within 2× of its own steady state.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import time
from pathlib import Path

import numpy as np
from admm_wls import WlsSettings, make_wls_problem, simulate

HERE = Path(__file__).resolve().parent
CURVES = {  # label -> (algorithm, continual)
    "FedAvg": ("fedavg", False),
    "FedADMM (stored dual)": ("fedadmm", False),
    "noise-robust (dual-free)": ("noise_robust", False),
    "noise-robust + continual": ("noise_robust", True),
}
NOISE_STDS = (0.01, 0.1)  # σ_d = σ_u
SELECTION_PROBS = (0.3, 0.7)


def run(iterations: int, runs: int, rho: float) -> dict[tuple[float, float, str], np.ndarray]:
    problem = make_wls_problem(clients=20, features=8, samples=30, seed=0)
    curves = {}
    for std in NOISE_STDS:
        for prob in SELECTION_PROBS:
            for label, (algorithm, continual) in CURVES.items():
                settings = WlsSettings(algorithm=algorithm, continual=continual, rho=rho, selection_prob=prob,
                                       downlink_std=std, uplink_std=std, iterations=iterations)
                traces = [simulate(problem, settings.model_copy(update={"seed": seed})).msd for seed in range(runs)]
                curves[(std, prob, label)] = np.mean(traces, axis=0)
    return curves


def write_csv(curves, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["noise_std", "selection_prob", "algorithm", "iteration", "msd"])
        for (std, prob, label), msd in curves.items():
            writer.writerows([std, prob, label, n + 1, f"{value:.6e}"] for n, value in enumerate(msd))


def plot(curves, path: Path, runs: int, rho: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(NOISE_STDS), len(SELECTION_PROBS), figsize=(11, 8), sharex=True, sharey=True)
    for row, std in enumerate(NOISE_STDS):
        for col, prob in enumerate(SELECTION_PROBS):
            axis = axes[row][col]
            for label in CURVES:
                msd = curves[(std, prob, label)]
                axis.semilogy(np.arange(1, len(msd) + 1), msd, label=label, linewidth=1.2)
            axis.set_title(f"σ_d = σ_u = {std},  P = {prob}")
            axis.grid(True, which="both", alpha=0.3)
            if row == len(NOISE_STDS) - 1:
                axis.set_xlabel("iteration")
            if col == 0:
                axis.set_ylabel("MSD ‖w − w*‖²")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"Federated WLS (K=20, L=8, ρ={rho}), mean of {runs} runs — reconstruction of arXiv:2409.13451")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summarise(curves) -> None:
    print(f"{'σ':>5} {'P':>4}  {'algorithm':26} {'steady MSD':>11} {'vs FedADMM':>10} {'iters to 2x':>11}")
    for std in NOISE_STDS:
        for prob in SELECTION_PROBS:
            baseline = curves[(std, prob, "FedADMM (stored dual)")]
            base_steady = baseline[-len(baseline) // 5 :].mean()
            for label in CURVES:
                msd = curves[(std, prob, label)]
                steady = msd[-len(msd) // 5 :].mean()
                reach = int(np.argmax(msd < 2 * steady)) + 1
                print(f"{std:>5} {prob:>4}  {label:26} {steady:11.3e} {steady / base_steady:10.2f} {reach:11d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--runs", type=int, default=20, help="Monte-Carlo runs (seeds) per curve")
    parser.add_argument("--rho", type=float, default=10.0)
    args = parser.parse_args()
    started = time.perf_counter()
    curves = run(args.iterations, args.runs, args.rho)
    results, figures = HERE / "results", HERE / "figures"
    results.mkdir(exist_ok=True)
    figures.mkdir(exist_ok=True)
    write_csv(curves, results / "admm_wls.csv")
    plot(curves, results / "admm_wls.png", args.runs, args.rho)
    shutil.copyfile(results / "admm_wls.png", figures / "admm_wls.png")
    summarise(curves)
    print(f"wrote {results / 'admm_wls.csv'}, {results / 'admm_wls.png'} and {figures / 'admm_wls.png'} "
          f"in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
