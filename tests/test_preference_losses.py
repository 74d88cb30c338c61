"""The preference losses against TRL's own loss code, on the same log-probs: SimPO (TRL's
CPOTrainer), ORPO (ORPOTrainer), KTO (KTOTrainer) and the reward model's Bradley-Terry loss
(RewardTrainer). TRL's methods run on stand-ins for their trainer and model that hand them
the log-probs (or rewards) below; the loss and its gradient with respect to every log-prob
must agree to 1e-5 relative."""

from __future__ import annotations

import os
from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from mtrain.losses import dpo_loss, kto_loss
from mtrain.reward import reward_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")

M = 6


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def logps(seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs [M, 2] (leaf, with grad) and response token counts [M, 2]."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 12, (M, 2), generator=g).double()
    values = -(tokens * (0.2 + torch.rand(M, 2, generator=g, dtype=torch.float64))) * scale
    return values.requires_grad_(), tokens


def grad_of(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


def trainer(**attrs) -> SimpleNamespace:
    return SimpleNamespace(accelerator=SimpleNamespace(device="cpu"), **attrs)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_simpo_equals_trl_cpo_trainer(smoothing):
    from trl.experimental.cpo import CPOTrainer

    beta, gamma = 2.0, 0.7
    x, tokens = logps(0)
    ours, _ = dpo_loss(x, None, tokens, "simpo", beta, smoothing, gamma=gamma)
    fake = trainer(
        alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=smoothing
    )
    mean = x / tokens  # TRL's SimPO takes the length-averaged log-probs
    theirs, chosen, rejected = CPOTrainer.cpo_loss(fake, mean[:, 0], mean[:, 1])
    assert close(ours.mean(), theirs.mean())
    assert close(grad_of(ours.mean(), x), grad_of(theirs.mean(), x))


@pytest.mark.parametrize("scale", [1.0, 0.01])  # 0.01: probabilities near 1, log(1 - p) ~ log(0)
def test_orpo_equals_trl_orpo_trainer(scale):
    """TRL's ORPO loss is its NLL minus the mean odds-ratio term; its NLL is the mean token NLL
    of the micro-batch's chosen responses, ours the mean of each pair's, so the chosen
    responses here are of one length, where the two agree."""
    from trl.experimental.orpo import ORPOTrainer

    beta = 0.3
    x, tokens = logps(1, scale)
    tokens[:, 0] = 7.0
    ours, values = dpo_loss(x, None, tokens, "orpo", beta)
    mean = x / tokens
    ratio, chosen, rejected, _, _ = ORPOTrainer.odds_ratio_loss(
        trainer(beta=beta), mean[:, 0], mean[:, 1]
    )
    nll = -x[:, 0].sum() / tokens[:, 0].sum()
    theirs = nll - ratio.mean()
    assert close(ours.mean(), theirs)
    assert close(grad_of(ours.mean(), x), grad_of(theirs, x))
    assert close(values["rewards/chosen"], chosen) and close(values["rewards/rejected"], rejected)


def _trl_kto(policy, reference, desirable, beta, w_d, w_u) -> torch.Tensor:
    """KTOTrainer's loss on sequence log-probs: its model stand-in returns, for inputs of two
    positions, one per-token log-prob per sequence (the matched or the mismatched one)."""
    from trl import KTOTrainer

    m = len(desirable)
    inputs, kl_inputs = torch.zeros(m, 2, dtype=torch.long), torch.ones(m, 2, dtype=torch.long)

    def model(input_ids, **_):
        values = policy[:, 0] if input_ids is inputs else policy[:, 1]
        zeros = torch.zeros(m, 1, dtype=values.dtype)
        return SimpleNamespace(log_probs=values[:, None], entropy=zeros, mean_logits=zeros)

    fake = trainer(
        model=SimpleNamespace(training=False),
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=w_d,
        undesirable_weight=w_u,
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    fake.accelerator.gather_for_metrics = lambda t: t
    fake._compute_kl_logps = partial(KTOTrainer._compute_kl_logps, fake)
    batch = {
        "input_ids": inputs,
        "attention_mask": torch.ones(m, 2, dtype=torch.long),
        "completion_mask": torch.ones(m, 2, dtype=torch.long),
        "KL_input_ids": kl_inputs,
        "KL_attention_mask": torch.ones(m, 2, dtype=torch.long),
        "KL_completion_mask": torch.ones(m, 2, dtype=torch.long),
        "label": desirable,
        "ref_logps": reference[:, 0],
        "ref_KL_logps": reference[:, 1],
    }
    return KTOTrainer._compute_loss(fake, model, batch, return_outputs=False)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.6)])
@pytest.mark.parametrize("kl_sign", [1.0, -1.0])  # -1: the estimate clamps at 0
def test_kto_equals_trl_kto_trainer(weights, kl_sign):
    beta = 0.4
    x, _ = logps(2)
    ref = x.detach() - kl_sign * torch.linspace(-0.5, 3.0, 2 * M, dtype=x.dtype).view(M, 2)
    desirable = torch.tensor([True, False, True, True, False, False])
    ours, _, kl = kto_loss(x, ref, desirable, beta, *weights)
    theirs = _trl_kto(x, ref, desirable, beta, *weights)
    assert kl_sign > 0 or kl.item() == 0.0
    assert close(ours.mean(), theirs)
    assert close(grad_of(ours.mean(), x), grad_of(theirs, x))


@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_equals_trl_reward_trainer(margin, center):
    from trl import RewardTrainer

    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(M, 2, generator=g, dtype=torch.float64).requires_grad_()
    margins = torch.rand(M, generator=g, dtype=torch.float64) if margin else None
    ours, values = reward_loss(rewards, margins, center or 0.0)
    fake = trainer(
        model=SimpleNamespace(training=False),
        args=SimpleNamespace(center_rewards_coefficient=center),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    fake.accelerator.gather = fake.accelerator.gather_for_metrics = lambda t: t
    flat = torch.cat([rewards[:, 0], rewards[:, 1]])[:, None]  # TRL: chosen rows, then rejected
    inputs = {"margin": margins} if margin else {}
    theirs = RewardTrainer.compute_loss(fake, lambda **_: SimpleNamespace(logits=flat), inputs)
    assert close(ours.mean(), theirs)
    assert close(grad_of(ours.mean(), rewards), grad_of(theirs, rewards))
    assert values["rewards/accuracy"].mean().item() == pytest.approx(
        fake._metrics["eval"]["accuracy"][0]
    )
    assert values["rewards/margin"].mean().item() == pytest.approx(
        fake._metrics["eval"]["margin"][0]
    )
