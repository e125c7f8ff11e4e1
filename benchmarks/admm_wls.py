"""Federated weighted least squares (WLS) under random scheduling and noisy links: the derivation
vehicle of "Noise-Robust and Resource-Efficient ADMM-based Federated Learning" (Lari, Arablouei,
Gogineni, Werner; arXiv:2409.13451), as numeric kernels for tests and the paper-figure benchmark.

DERIVED FROM arXiv:2409.13451's DESCRIPTION, NOT ITS EQUATIONS (the full text was not at hand).
What is the paper's: the WLS problem over a federated network with random client scheduling and
additive link noise; eliminating the dual variable so a scheduled client uses ONE noisy copy of
the global model per iteration instead of two; unscheduled clients continuing local updates.
What is our reconstruction (docs/algorithms.md §4.3-4.4, to diff against the paper's equations):
  - `fedadmm`: consensus ADMM whose dual step uses a second noisy reception of the new global
    model (§4.3), the baseline the paper improves on;
  - `noise_robust_explicit_dual`: the server-first ordering (Zhou & Li, arXiv:2204.10607) where the
    primal and dual steps share the received model (§4.4, first two equations);
  - `noise_robust`: the same iteration with the dual eliminated, λ_k = p_k − R_k w_k (§4.4);
  - `continual=True`: unscheduled clients keep iterating with the last model they received;
  - `fedavg`: local gradient steps from the received model, mean of this iteration's uploads.
Notation: f_k(w) = ½‖y_k − X_k w‖²_{Ψ_k}, R_k = X_kᵀΨ_kX_k, p_k = X_kᵀΨ_k y_k,
w* = (Σ R_k)⁻¹ Σ p_k; MSD_n = ‖w_n − w*‖².
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

WlsAlgorithm = Literal["fedavg", "fedadmm", "noise_robust", "noise_robust_explicit_dual"]


@dataclass(frozen=True)
class WlsProblem:
    """Every client's normal equations (R_k, p_k); float64."""

    R: np.ndarray  # (K, L, L)
    p: np.ndarray  # (K, L)

    @property
    def clients(self) -> int:
        return self.R.shape[0]

    @property
    def features(self) -> int:
        return self.R.shape[1]

    @property
    def solution(self) -> np.ndarray:
        """The centralised WLS solution w* = (Σ R_k)⁻¹ Σ p_k."""
        return np.linalg.solve(self.R.sum(axis=0), self.p.sum(axis=0))


def make_wls_problem(
    clients: int = 20, features: int = 8, samples: int = 30, seed: int = 0, label_noise: float = 0.1
) -> WlsProblem:
    """Gaussian regressors, a Gaussian true model, label noise, random diagonal Ψ_k in [0.5, 1.5]
    (the toy of docs/algorithms.md §4.4 / §6.4.1)."""
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal(features)
    R = np.empty((clients, features, features))
    p = np.empty((clients, features))
    for k in range(clients):
        X = rng.standard_normal((samples, features))
        y = X @ truth + label_noise * rng.standard_normal(samples)
        psi = rng.uniform(0.5, 1.5, samples)
        R[k] = X.T @ (psi[:, None] * X)
        p[k] = X.T @ (psi * y)
    return WlsProblem(R, p)


class WlsSettings(BaseModel):
    """One simulated run: algorithm, penalty, scheduling, link noise, length, seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    algorithm: WlsAlgorithm = "noise_robust"
    continual: bool = Field(False, description="Unscheduled clients keep updating locally.")
    rho: float = Field(10.0, gt=0, description="ADMM penalty ρ.")
    selection_prob: float = Field(1.0, gt=0, le=1, description="Each client is scheduled w.p. P per iteration.")
    downlink_std: float = Field(0.0, ge=0, description="σ_d of the AWGN on every received global model.")
    uplink_std: float = Field(0.0, ge=0, description="σ_u of the AWGN on every received upload.")
    iterations: int = Field(100, ge=1)
    seed: int = 0
    fedavg_steps: int = Field(5, ge=1, description="fedavg: local gradient steps per iteration.")
    fedavg_lr: float | None = Field(None, gt=0, description="fedavg: step size; default 1/max_k ‖R_k‖₂.")

    @model_validator(mode="after")
    def _continual_needs_a_local_model(self) -> WlsSettings:
        if self.continual and self.algorithm in ("fedavg", "fedadmm"):
            raise ValueError(f"continual: not defined for algorithm {self.algorithm!r}")
        return self


@dataclass
class WlsTrace:
    """Per-iteration MSD, plus (when recorded) the global model, local models and duals."""

    msd: np.ndarray
    global_models: list[np.ndarray] = field(default_factory=list)
    local_models: list[np.ndarray] = field(default_factory=list)
    duals: list[np.ndarray] = field(default_factory=list)


class WlsFederation:
    """The state of one simulated run; `step()` advances one iteration (one scheduling draw)."""

    def __init__(self, problem: WlsProblem, settings: WlsSettings):
        self.problem = problem
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)
        K, L = problem.clients, problem.features
        rho = settings.rho
        self.solve = np.linalg.inv(problem.R + rho * np.eye(L))  # (R_k + ρI)⁻¹
        self.local = np.zeros((K, L))
        self.last_received = np.zeros((K, L))
        # The dual kept in memory: none once eliminated; p_k − R_k w_k,0 in the explicit form (§4.4).
        self.dual: np.ndarray | None = {
            "fedadmm": np.zeros((K, L)),
            "noise_robust_explicit_dual": problem.p.copy(),
        }.get(settings.algorithm)
        if settings.algorithm == "fedadmm":
            self.uploads = np.zeros((K, L))
        else:  # §4.4 initialisation u_k = w_k,0 + (p_k − R_k w_k,0)/ρ with w_k,0 = 0
            self.uploads = problem.p / rho
        self.global_model = self.uploads.mean(axis=0)
        self.fedavg_lr = settings.fedavg_lr or 1.0 / max(np.linalg.norm(problem.R[k], 2) for k in range(K))

    def implied_dual(self) -> np.ndarray:
        """p_k − R_k w_k: the dual as a function of the local model (exact for the §4.4 iteration)."""
        return self.problem.p - np.einsum("kij,kj->ki", self.problem.R, self.local)

    def _noisy(self, values: np.ndarray, std: float) -> np.ndarray:
        return values + std * self.rng.standard_normal(values.shape) if std else values.copy()

    def _primal(self, clients: np.ndarray, received: np.ndarray) -> np.ndarray:
        """argmin_w f_k(w) + λ_kᵀ(w − w̃_k) + (ρ/2)‖w − w̃_k‖², for the given clients."""
        P, R = self.problem.p[clients], self.problem.R[clients]
        rho = self.settings.rho
        if self.dual is None:  # dual eliminated: p_k − λ_k = R_k w_k
            rhs = np.einsum("kij,kj->ki", R, self.local[clients]) + rho * received
        else:
            rhs = P - self.dual[clients] + rho * received
        return np.einsum("kij,kj->ki", self.solve[clients], rhs)

    def _local_update(self, clients: np.ndarray, received: np.ndarray) -> None:
        """One ADMM local step (primal, then the explicit dual where one is kept) with `received`."""
        new_local = self._primal(clients, received)
        if self.settings.algorithm == "noise_robust_explicit_dual":
            self.dual[clients] += self.settings.rho * (new_local - received)
        self.local[clients] = new_local

    def step(self) -> None:
        settings, problem = self.settings, self.problem
        K = problem.clients
        scheduled = np.flatnonzero(self.rng.random(K) < settings.selection_prob)
        idle = np.setdiff1d(np.arange(K), scheduled)
        broadcast = np.broadcast_to(self.global_model, (len(scheduled), problem.features))
        received = self._noisy(broadcast, settings.downlink_std)
        if settings.algorithm == "fedavg":
            local = received.copy()
            for _ in range(settings.fedavg_steps):
                gradient = np.einsum("kij,kj->ki", problem.R[scheduled], local) - problem.p[scheduled]
                local -= self.fedavg_lr * gradient
            if len(scheduled):
                self.global_model = self._noisy(local, settings.uplink_std).mean(axis=0)
            return
        self._local_update(scheduled, received)
        self.last_received[scheduled] = received
        # u_k = w_k + λ_k/ρ: the kept dual (fedadmm: not yet updated, §4.3 step 3), else p_k − R_k w_k.
        dual = self.implied_dual()[scheduled] if self.dual is None else self.dual[scheduled]
        uploads = self.local[scheduled] + dual / settings.rho
        self.uploads[scheduled] = self._noisy(uploads, settings.uplink_std)
        self.global_model = self.uploads.mean(axis=0)
        if settings.algorithm == "fedadmm":  # §4.3 step 5: a second noisy reception for the dual
            broadcast = np.broadcast_to(self.global_model, (len(scheduled), problem.features))
            second = self._noisy(broadcast, settings.downlink_std)
            self.dual[scheduled] += settings.rho * (self.local[scheduled] - second)
        if settings.continual and len(idle):
            self._local_update(idle, self.last_received[idle])


def simulate(problem: WlsProblem, settings: WlsSettings, record: bool = False) -> WlsTrace:
    """Run `settings.iterations` iterations; MSD is measured after each one."""
    federation = WlsFederation(problem, settings)
    solution = problem.solution
    trace = WlsTrace(msd=np.empty(settings.iterations))
    for n in range(settings.iterations):
        federation.step()
        trace.msd[n] = float(np.sum((federation.global_model - solution) ** 2))
        if record:
            trace.global_models.append(federation.global_model.copy())
            trace.local_models.append(federation.local.copy())
            trace.duals.append(federation.implied_dual() if federation.dual is None else federation.dual.copy())
    return trace


def iterations_to(trace: WlsTrace, problem: WlsProblem, relative_msd: float) -> int | None:
    """First iteration (1-based) with ‖w − w*‖²/‖w*‖² below `relative_msd`, or None."""
    below = np.flatnonzero(trace.msd / float(np.sum(problem.solution**2)) < relative_msd)
    return int(below[0]) + 1 if len(below) else None
