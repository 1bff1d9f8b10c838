"""Routing losses and the ReMoE adaptive-lambda controller (the paper, Sec. 3.3: Eq. for L_reg with load
balancing, and the controller lambda_{i+1} = lambda_i * alpha^sign(target - S_i)).

Per-layer losses take one layer's (T, E) gates; E and k are the fine-grained E*G and k*G.
The counts in every load-balancing term are constants: no gradient flows through them.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("remoe")


def routed_fraction(gates: torch.Tensor, k: int) -> torch.Tensor:
    """f_e = (tokens routed to e) / (T k), detached."""
    T = gates.shape[0]
    return (gates > 0).sum(dim=0).to(gates.dtype) / (T * k)


def switch_aux_loss(probs: torch.Tensor, gates: torch.Tensor, k: int) -> torch.Tensor:
    """TopK load balancing (Switch form): L_aux = E * sum_e f_e * P_e, P_e = mean_t p_{t,e}."""
    E = probs.shape[1]
    return E * (routed_fraction(gates, k) * probs.mean(dim=0)).sum()


def l1_loss(gates: torch.Tensor) -> torch.Tensor:
    """Plain L1 of one layer: (1/T) sum_t sum_e R_{t,e}."""
    return gates.sum() / gates.shape[0]


def lb_l1_loss(gates: torch.Tensor, k: int) -> torch.Tensor:
    """Load-balancing refined L1 of one layer: (1/T) sum_t sum_e f_e R_{t,e}, f_e = (E/(kT)) #{R_e>0}.

    f_e = E * routed_fraction: the Switch aux-loss formula applied to R instead of softmax probs.
    """
    E, T = gates.shape[1], gates.shape[0]
    f = E * routed_fraction(gates, k)
    return (f * gates).sum() / T


LAMBDA_FLOOR = float(torch.finfo(torch.float32).tiny)  # 1.18e-38, float32's smallest normal number


class LambdaController:
    """lambda_{i+1} = lambda_i * alpha^{sign(target - S_i)}: multiply by alpha while the step's sparsity
    is below target, divide otherwise. lambda lives in float32 whatever the training precision, and is
    checkpointed through state_dict().

    Not in the spec: lambda never goes below LAMBDA_FLOOR. Divided long enough (sparsity above target for
    ~460 steps from 1e-8, e.g. while a collapsed layer holds the mean up), a float32 lambda reaches the
    subnormals, where 2 units (2.8e-45) times 1.2 rounds back to 2 units: lambda would then stay there for
    good, whatever the sparsity. At the floor, x alpha is exact to float32 rounding again."""

    def __init__(self, target: float, lambda0: float = 1e-8, alpha: float = 1.2):
        if not 0.0 <= target < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target}")
        if not lambda0 >= LAMBDA_FLOOR:
            raise ValueError(f"lambda0 must be >= {LAMBDA_FLOOR:.3g} (float32's smallest normal), "
                             f"got {lambda0}")
        if alpha <= 1:
            raise ValueError(f"alpha must be > 1, got {alpha}")
        self.target = float(target)
        self.alpha = torch.tensor(alpha, dtype=torch.float32)
        self._set(torch.tensor(lambda0, dtype=torch.float32))
        self.steps = 0

    def _set(self, lam: torch.Tensor) -> None:
        self.lam = lam
        self._value = float(lam)  # read once per update: the loss's coefficient is then a host float

    @property
    def value(self) -> float:
        return self._value

    def update(self, sparsity: float) -> float:
        """One optimizer step's update from that step's sparsity; returns the new lambda."""
        return self.step(sparsity < self.target)

    def step(self, below_target: bool) -> float:
        """One optimizer step's update: x alpha when the step's sparsity was below target, else / alpha."""
        was = self.value
        lam = self.lam * self.alpha if below_target else self.lam / self.alpha
        self._set(lam.clamp(min=LAMBDA_FLOOR))  # also lifts a stuck lambda resumed from an older checkpoint
        self.steps += 1
        if self.value <= LAMBDA_FLOOR < was:  # arrived at the floor: once per arrival, not every step there
            log.warning("lambda reached its floor %.3g at controller step %d: the sparsity has stayed above "
                        "its target %.4g for hundreds of steps, typically while a collapsed layer holds the "
                        "mean up (watch per-layer sparsity; model.lambda_per_layer=true gives each layer its "
                        "own lambda)", LAMBDA_FLOOR, self.steps, self.target)
        return self.value

    def state_dict(self) -> dict:
        # plain Python floats: loads under torch.load(weights_only=True)
        return {"lam": self.value, "alpha": float(self.alpha), "target": self.target, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self._set(torch.tensor(state["lam"], dtype=torch.float32))
        self.alpha = torch.tensor(state["alpha"], dtype=torch.float32)
        self.target = float(state["target"])
        self.steps = int(state["steps"])
