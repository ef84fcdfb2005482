"""optim.ema: an exponential moving average of each student's weights, evaluated and saved beside its own.

After every optimizer step, average <- decay * average + (1 - decay) * weights, for every floating tensor of the
models the engine trains (parameters and BatchNorm statistics, as timm's ModelEmaV2 averages them; counters are
copied). The update is element-wise, so it runs on whatever layout the engine holds (one model, N models, or N
stacked into one fused model) and gives each member exactly the average it would have alone. The average starts
from the weights at the start of training (or those a resumed run saved with its state).
"""

from __future__ import annotations

import contextlib

import torch


class WeightAverage:
    def __init__(self, engine, decay: float, runs: list, saved: list[dict | None]):
        """`runs` the members as the engine holds them (each with `.model` and `.optimizer`); `saved` each member's
        averaged weights from its resume state, or None to start from its current weights."""
        self.decay = decay
        self.live = [t for m in engine.trained_modules() for t in m.state_dict().values()]
        for j, (run, state) in enumerate(zip(runs, saved)):  # the saved averages into the engine's layout ...
            if state is not None:
                own = {k: v.clone() for k, v in run.model.state_dict().items()}
                _put(engine, j, run, state)
                saved[j] = own
        self.shadow = [t.detach().clone() for t in self.live]
        for j, (run, own) in enumerate(zip(runs, saved)):  # ... and the members' own weights back
            if own is not None:
                _put(engine, j, run, own)
        self.floating = [i for i, t in enumerate(self.live) if t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        live = [self.live[i] for i in self.floating]
        torch._foreach_lerp_([self.shadow[i] for i in self.floating], live, 1.0 - self.decay)
        for i, t in enumerate(self.live):
            if not t.is_floating_point():
                self.shadow[i].copy_(t)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped(self):
        """The engine computes with the averaged weights inside (evaluation, export), its own again after."""
        own = [t.clone() for t in self.live]
        torch._foreach_copy_(self.live, self.shadow)
        try:
            yield
        finally:
            torch._foreach_copy_(self.live, own)


def _put(engine, j: int, run, state: dict) -> None:
    """Member j's weights set to `state`, in the engine's layout (for a group of one, the model is the run's own)."""
    run.model.load_state_dict(state)
    engine.restore(j, run.model, run.optimizer)
