"""selfmoa_ray.training.losses against TRL's own DPOTrainer code and hand computations."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from selfmoa_ray.training.losses import (
    dpo_loss,
    log1mexp,
    modpo_loss,
    nontie_mask,
    pt_align_loss,
    scalarised_dpo_loss,
    sequence_logps,
    sft_loss,
    token_logps,
    unlikelihood_loss,
)


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# TRL 1.16: DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py) is the only place its DPO
# losses live; it needs a model, so it runs on a real tiny Llama patched with TRL's own
# add_fused_lm_head (trl/trainer/utils.py), on a trainer built with object.__new__ and only the
# attributes that method reads. Reference log-probs go in precomputed (precompute_ref_logps).
# ---------------------------------------------------------------------------------------------

PROMPT_LEN = 3


class _SingleProcessAccelerator:
    """The three members of accelerate.Accelerator that _compute_loss uses, for one process."""

    device = torch.device("cpu")

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather_for_metrics(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


@pytest.fixture(scope="module")
def trl_setup():
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))

    # 3 pairs, rows [chosen_0..2, rejected_0..2], shared prompt, right padding with id 0.
    lengths = torch.tensor([10, 8, 6, 9, 10, 7])
    positions = torch.arange(10)
    attention_mask = (positions < lengths[:, None]).long()
    completion_mask = attention_mask * (positions >= PROMPT_LEN).long()
    input_ids = torch.randint(1, 32, (6, 10)) * attention_mask
    input_ids[3:, :PROMPT_LEN] = input_ids[:3, :PROMPT_LEN]
    ref_chosen = torch.tensor([-20.0, -25.0, -9.0])
    ref_rejected = torch.tensor([-24.0, -19.0, -13.0])

    # Our side: plain forward, caller-side shift, token_logps -> sequence_logps.
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    labels = input_ids.masked_fill(completion_mask == 0, -100)[:, 1:]
    per_token = token_logps(logits[:, :-1], labels)
    mask = completion_mask[:, 1:].bool()
    return {
        "model": model,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen": ref_chosen,
        "ref_rejected": ref_rejected,
        "per_token": per_token,
        "mask": mask,
    }


def _trl_loss(setup, loss_type: str, *, beta: float, label_smoothing: float = 0.0, pair=None):
    """TRL's DPOTrainer._compute_loss on all pairs (pair=None) or on pair i alone."""
    from trl.trainer.dpo_trainer import DPOTrainer

    rows = slice(None) if pair is None else [pair, pair + 3]
    refs = slice(None) if pair is None else [pair]
    trainer = object.__new__(DPOTrainer)
    trainer.model = setup["model"]
    trainer.accelerator = _SingleProcessAccelerator()
    trainer.aux_loss_enabled = False
    trainer.ld_alpha = None
    trainer.precompute_ref_logps = True
    trainer.f_divergence_type = "reverse_kl"
    trainer.loss_types = [loss_type]
    trainer.loss_weights = [1.0]
    trainer.beta = beta
    trainer.label_smoothing = label_smoothing
    trainer.use_weighting = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    inputs = {
        "input_ids": setup["input_ids"][rows],
        "attention_mask": setup["attention_mask"][rows],
        "completion_mask": setup["completion_mask"][rows],
        "ref_chosen_logps": setup["ref_chosen"][refs],
        "ref_rejected_logps": setup["ref_rejected"][refs],
    }
    with torch.no_grad():
        loss = trainer._compute_loss(setup["model"], inputs, return_outputs=False)
    return loss.item(), trainer._metrics["eval"]


def _ours(setup, *, average: bool = False):
    seq = sequence_logps(setup["per_token"], setup["mask"], average=average)
    policy_chosen, policy_rejected = seq[:3], seq[3:]
    ref_chosen, ref_rejected = setup["ref_chosen"], setup["ref_rejected"]
    if average:  # TRL divides the summed log-ratio by the completion length of each side
        counts = setup["mask"].sum(-1)
        ref_chosen, ref_rejected = ref_chosen / counts[:3], ref_rejected / counts[3:]
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_matches_trl(trl_setup, beta):
    losses, chosen_rewards, rejected_rewards = dpo_loss(*_ours(trl_setup), beta=beta)
    trl_mean, metrics = _trl_loss(trl_setup, "sigmoid", beta=beta)
    assert losses.mean().item() == pytest.approx(trl_mean, abs=1e-5)
    assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=1e-5)
    assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=1e-5)
    for i in range(3):
        assert losses[i].item() == pytest.approx(
            _trl_loss(trl_setup, "sigmoid", beta=beta, pair=i)[0], abs=1e-5
        )
    assert len(set(losses.tolist())) == 3  # the pairs really differ


def test_dpo_ipo_matches_trl_length_normalised(trl_setup):
    # TRL 1.16's ipo divides each side's log-ratio by its completion length; that is our IPO on
    # sequence_logps(average=True) with the reference averaged over the same tokens.
    losses, _, _ = dpo_loss(*_ours(trl_setup, average=True), beta=0.1, loss_type="ipo")
    assert losses.mean().item() == pytest.approx(_trl_loss(trl_setup, "ipo", beta=0.1)[0], rel=1e-5)
    for i in range(3):
        trl_pair = _trl_loss(trl_setup, "ipo", beta=0.1, pair=i)[0]
        assert losses[i].item() == pytest.approx(trl_pair, rel=1e-5)


def test_dpo_label_smoothing_matches_trl_conservative_form(trl_setup):
    # TRL 1.16's "sigmoid" no longer reads label_smoothing; its conservative-DPO expression
    # -(1-eps) logsigmoid(beta d) - eps logsigmoid(-beta d) survives in "aot", which first sorts
    # the log-ratios over the batch. On a single pair the sort is the identity, so "aot" on
    # pair i is exactly cDPO on pair i.
    losses, _, _ = dpo_loss(*_ours(trl_setup), beta=0.5, label_smoothing=0.2)
    plain, _, _ = dpo_loss(*_ours(trl_setup), beta=0.5)
    for i in range(3):
        trl_pair = _trl_loss(trl_setup, "aot", beta=0.5, label_smoothing=0.2, pair=i)[0]
        assert losses[i].item() == pytest.approx(trl_pair, abs=1e-5)
    assert not torch.allclose(losses, plain)


def test_sft_loss_matches_trl_sft_loss_type(trl_setup):
    ours = sft_loss(trl_setup["per_token"][:3], trl_setup["mask"][:3])
    assert ours.item() == pytest.approx(_trl_loss(trl_setup, "sft", beta=0.1)[0], abs=1e-5)


# --------------------------------------------- DPO by hand ---------------------------------------


def test_dpo_sigmoid_and_ipo_by_hand():
    pc, pr, rc, rr = _t(-10.0, -4.0), _t(-12.0, -3.0), _t(-11.0, -4.5), _t(-11.5, -2.0)
    beta, eps = 0.3, 0.1
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        pc, pr, rc, rr, beta=beta, label_smoothing=eps
    )
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    pc, pr, rc, rr = pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()
    for i in range(2):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        expected = -(1 - eps) * _logsigmoid(beta * h) - eps * _logsigmoid(-beta * h)
        assert losses[i].item() == pytest.approx(expected, rel=1e-12)
        assert ipo[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
        assert chosen_rewards[i].item() == pytest.approx(beta * (pc[i] - rc[i]), rel=1e-12)
        assert rejected_rewards[i].item() == pytest.approx(beta * (pr[i] - rr[i]), rel=1e-12)


def test_dpo_gradient_raises_chosen_and_lowers_rejected_and_rewards_are_detached():
    pc = _t(-10.0, -4.0).requires_grad_()
    pr = _t(-12.0, -3.0).requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, _t(-11.0, -4.5), _t(-11.5, -2.0))
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


# --------------------------------------------- MODPO ---------------------------------------------

PAIRS = (_t(-10.0, -4.0, -7.5), _t(-12.0, -3.0, -7.0), _t(-11.0, -4.5, -6.0), _t(-11.5, -2.0, -8.0))


def test_modpo_without_safety_is_dpo_with_beta_over_w_h():
    ds = _t(0.9, -0.4, 0.3)
    modpo, chosen_rewards, rejected_rewards = modpo_loss(*PAIRS, ds, beta=0.1, w_s=0.0, w_h=1.0)
    dpo, dpo_chosen_rewards, dpo_rejected_rewards = dpo_loss(*PAIRS, beta=0.1)
    torch.testing.assert_close(modpo, dpo, rtol=1e-12, atol=0)
    torch.testing.assert_close(chosen_rewards, dpo_chosen_rewards)
    torch.testing.assert_close(rejected_rewards, dpo_rejected_rewards)
    half, _, _ = modpo_loss(*PAIRS, ds, beta=0.1, w_s=0.0, w_h=0.5)
    torch.testing.assert_close(half, dpo_loss(*PAIRS, beta=0.2)[0], rtol=1e-12, atol=0)


def test_modpo_positive_safety_delta_raises_the_loss():
    # The logit is (beta h - w_s ds) / w_h: ds > 0 (chosen already safer) lowers it, so the loss
    # -log sigmoid(logit) goes up; ds < 0 lowers the loss.
    zero, _, _ = modpo_loss(*PAIRS, _t(0.0, 0.0, 0.0), w_s=0.5, w_h=0.5)
    positive, _, _ = modpo_loss(*PAIRS, _t(1.0, 1.0, 1.0), w_s=0.5, w_h=0.5)
    negative, _, _ = modpo_loss(*PAIRS, _t(-1.0, -1.0, -1.0), w_s=0.5, w_h=0.5)
    assert (positive > zero).all() and (negative < zero).all()


def test_modpo_by_hand():
    ds = [0.8, -0.5, 0.0]
    beta, w_s, w_h = 0.2, 0.4, 0.6
    losses, _, _ = modpo_loss(*PAIRS, _t(*ds), beta=beta, w_s=w_s, w_h=w_h)
    pc, pr, rc, rr = (p.tolist() for p in PAIRS)
    for i in range(3):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        expected = -_logsigmoid((beta * h - w_s * ds[i]) / w_h)
        assert losses[i].item() == pytest.approx(expected, rel=1e-12)


# --------------------------------------------- scalarised DPO ------------------------------------


def test_scalarised_ordered_pairs_are_dpo():
    chosen_scores = _t(1.0, 0.5, 0.9, 0.2, 0.0, 1.0).view(3, 2)
    rejected_scores = _t(0.0, 0.5, 0.1, 0.2, 0.0, 0.0).view(3, 2)
    losses, chosen_rewards, rejected_rewards = scalarised_dpo_loss(
        *PAIRS, chosen_scores, rejected_scores, [0.5, 0.5], beta=0.2, label_smoothing=0.1
    )
    dpo = dpo_loss(*PAIRS, beta=0.2, label_smoothing=0.1)
    for ours, expected in zip((losses, chosen_rewards, rejected_rewards), dpo, strict=True):
        torch.testing.assert_close(ours, expected)


def test_scalarised_misordered_pair_equals_the_swapped_pair():
    pc, pr, rc, rr = _t(-10.0), _t(-12.0), _t(-11.0), _t(-11.5)
    better, worse = _t(0.2, 0.9).view(1, 2), _t(0.8, 0.1).view(1, 2)
    weights = torch.tensor([0.3, 0.7])  # better: 0.69, worse: 0.31
    stored_backwards = scalarised_dpo_loss(pc, pr, rc, rr, worse, better, weights)
    swapped = scalarised_dpo_loss(pr, pc, rr, rc, better, worse, weights)
    for a, b in zip(stored_backwards, swapped, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(stored_backwards[0], dpo_loss(pr, pc, rr, rc)[0])
    # Same pair, other weights: the stored order is right and the loss differs.
    forward, _, _ = scalarised_dpo_loss(pc, pr, rc, rr, worse, better, [0.7, 0.3])
    torch.testing.assert_close(forward, dpo_loss(pc, pr, rc, rr)[0])
    assert not torch.allclose(forward, stored_backwards[0])


def test_scalarised_weights_pick_the_orientation_and_ties_are_zero():
    # One pair: chosen is safer, rejected more helpful. [safety, helpfulness] weights decide.
    pc = _t(-10.0, -10.0, -10.0).requires_grad_()
    pr, rc, rr = _t(-12.0, -12.0, -12.0), _t(-11.0, -11.0, -11.0), _t(-11.5, -11.5, -11.5)
    chosen_scores = _t(1.0, 0.0).expand(3, 2)
    rejected_scores = torch.stack([_t(0.0, 0.5), _t(0.0, 2.0), _t(0.0, 1.0)])
    weights = [0.5, 0.5]  # scalars: chosen 0.5 vs rejected 0.25, 1.0, 0.5 (a tie)
    losses, _, _ = scalarised_dpo_loss(pc, pr, rc, rr, chosen_scores, rejected_scores, weights)
    dpo_forward, _, _ = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1])
    dpo_backward, _, _ = dpo_loss(pr[:1], pc[:1], rr[:1], rc[:1])
    torch.testing.assert_close(losses[0:1], dpo_forward)
    torch.testing.assert_close(losses[1:2], dpo_backward)
    assert losses[2].item() == 0.0

    valid = nontie_mask(chosen_scores, rejected_scores, weights)
    assert valid.tolist() == [True, True, False]
    batch_loss = losses.sum() / valid.sum().clamp(min=1)
    torch.testing.assert_close(batch_loss, losses[:2].mean())
    batch_loss.backward()
    assert pc.grad[2].item() == 0.0 and pc.grad[0].item() < 0 < pc.grad[1].item()


def test_scalarised_all_ties_average_to_zero_and_weights_may_be_a_tensor():
    scores = _t(0.3, 0.6).expand(3, 2)
    losses, _, _ = scalarised_dpo_loss(*PAIRS, scores, scores.clone(), torch.tensor([1.0, 2.0]))
    assert torch.equal(losses, torch.zeros(3, dtype=torch.float64))
    valid = nontie_mask(scores, scores.clone(), torch.tensor([1.0, 2.0]))
    assert (losses.sum() / valid.sum().clamp(min=1)).item() == 0.0


# --------------------------------------------- unlikelihood / PT-ALIGN ---------------------------


def test_unlikelihood_by_hand_and_only_marked_tokens_matter():
    probs = torch.tensor([[0.3, 0.9, 0.5, 0.05]], dtype=torch.float64)
    marked = torch.tensor([[True, False, True, False]])
    logps = probs.log().requires_grad_()
    loss = unlikelihood_loss(logps, marked)
    assert loss.item() == pytest.approx(-(math.log(0.7) + math.log(0.5)) / 2, rel=1e-12)

    changed = logps.detach().clone()
    changed[~marked] = torch.tensor([-0.001, -7.0], dtype=torch.float64)
    assert unlikelihood_loss(changed, marked).item() == loss.item()

    loss.backward()
    assert torch.equal(logps.grad[~marked], torch.zeros(2, dtype=torch.float64))
    assert (logps.grad[marked] > 0).all()  # d/dlogp of -log(1-p) = p/(1-p)


def test_unlikelihood_gradient_step_lowers_marked_token_probabilities():
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (1, 6))
    labels[0, 5] = -100
    marked = torch.tensor([[True, False, True, True, False, False]])
    optimizer = torch.optim.SGD([logits], lr=1.0)

    before = token_logps(logits, labels).exp().detach()
    unlikelihood_loss(token_logps(logits, labels), marked).backward()
    assert torch.equal(logits.grad[~marked], torch.zeros(3, 11))
    optimizer.step()
    after = token_logps(logits, labels).exp().detach()
    assert (after[marked] < before[marked]).all()
    torch.testing.assert_close(after[~marked], before[~marked], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unlikelihood_clamp_near_probability_one(dtype):
    logps = torch.tensor([[0.0, -1e-9, -1e-12]], dtype=dtype, requires_grad=True)
    loss = unlikelihood_loss(logps, torch.ones(1, 3, dtype=torch.bool))
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(-math.log(1e-6), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logps.grad).all()
    tighter = unlikelihood_loss(
        logps.detach(), torch.ones(1, 3, dtype=torch.bool), min_complement=1e-3
    )
    assert tighter.item() == pytest.approx(-math.log(1e-3), rel=1e-6)


def test_unlikelihood_without_marked_tokens_is_zero_and_backpropagates():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    logps = token_logps(logits, torch.randint(0, 7, (2, 4)))
    loss = unlikelihood_loss(logps, torch.zeros(2, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def _pt_align_batch():
    positive = torch.tensor([[0.5, 0.25, 1.0]], dtype=torch.float64).log().requires_grad_()
    positive_mask = torch.tensor([[True, True, False]])
    toxic = torch.tensor([[0.9, 0.2, 0.6]], dtype=torch.float64).log().requires_grad_()
    harmful_mask = torch.tensor([[1, 0, 1]])  # integer masks are accepted too
    return positive, positive_mask, toxic, harmful_mask


def test_pt_align_is_mle_plus_alpha_unlikelihood_by_hand():
    positive, positive_mask, toxic, harmful_mask = _pt_align_batch()
    total, parts = pt_align_loss(positive, positive_mask, toxic, harmful_mask, alpha=0.7)
    mle = -(math.log(0.5) + math.log(0.25)) / 2
    unlikelihood = -(math.log(0.1) + math.log(0.4)) / 2
    assert set(parts) == {"mle", "unlikelihood", "harmful_prob_mass"}
    assert parts["mle"].item() == pytest.approx(mle, rel=1e-12)
    assert parts["unlikelihood"].item() == pytest.approx(unlikelihood, rel=1e-12)
    assert parts["harmful_prob_mass"].item() == pytest.approx((0.9 + 0.6) / 2, rel=1e-12)
    assert total.item() == pytest.approx(mle + 0.7 * unlikelihood, rel=1e-12)
    assert not any(part.requires_grad for part in parts.values())
    total.backward()
    assert toxic.grad[0, 1].item() == 0.0 and positive.grad[0, 2].item() == 0.0


def test_pt_align_alpha_zero_is_pure_mle():
    positive, positive_mask, toxic, harmful_mask = _pt_align_batch()
    total, _ = pt_align_loss(positive, positive_mask, toxic, harmful_mask, alpha=0.0)
    torch.testing.assert_close(total, sft_loss(positive, positive_mask), rtol=0, atol=0)
    total.backward()
    assert torch.equal(toxic.grad, torch.zeros_like(toxic))


def test_pt_align_without_marked_tokens_has_nan_free_parts():
    positive, positive_mask, toxic, _ = _pt_align_batch()
    total, parts = pt_align_loss(
        positive, positive_mask, toxic, torch.zeros(1, 3, dtype=torch.bool)
    )
    assert parts["unlikelihood"].item() == 0.0 and parts["harmful_prob_mass"].item() == 0.0
    torch.testing.assert_close(total, sft_loss(positive, positive_mask))
    total.backward()


# --------------------------------------------- token / sequence log-probs ------------------------


def test_token_logps_matches_log_softmax_gather_and_zeroes_ignored_labels():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 13) * 4
    labels = torch.randint(0, 13, (2, 5))
    labels[0, 0] = labels[1, 3] = labels[1, 4] = -100
    ours = token_logps(logits, labels)
    kept = labels != -100
    reference = torch.log_softmax(logits.double(), dim=-1)
    expected = reference[kept.nonzero(as_tuple=True)].gather(-1, labels[kept].unsqueeze(-1))
    torch.testing.assert_close(ours[kept], expected.squeeze(-1).float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[~kept], torch.zeros(3))


def test_token_logps_half_precision_row_by_row_and_gradients():
    torch.manual_seed(3)
    logits = (torch.randn(3, 4, 50) * 3).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 50, (3, 4))
    labels[2, 1] = -100
    ours = token_logps(logits, labels)
    assert ours.dtype == torch.float32
    expected = token_logps(logits.detach().float(), labels)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    ours.sum().backward()
    assert torch.equal(logits.grad[2, 1], torch.zeros(50, dtype=torch.bfloat16))
    assert torch.isfinite(logits.grad.float()).all()


def test_sequence_logps_sum_and_mean_over_the_mask():
    logps = torch.tensor([[-1.0, -2.0, -float("inf")], [-0.5, -0.25, -4.0], [-3.0, -3.0, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    torch.testing.assert_close(sequence_logps(logps, mask), torch.tensor([-3.0, -4.75, 0.0]))
    torch.testing.assert_close(
        sequence_logps(logps, mask, average=True), torch.tensor([-1.5, -4.75 / 3, 0.0])
    )


def test_sft_loss_is_token_mean_over_the_whole_batch():
    logps = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert sft_loss(logps, mask).item() == pytest.approx(2.0)
    assert sft_loss(logps, torch.zeros_like(mask)).item() == 0.0


# --------------------------------------------- validation ----------------------------------------

_P3, _P2 = torch.zeros(3), torch.zeros(2)
_S = torch.zeros(3, 2)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: token_logps(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long)), "labels"),
        (lambda: sequence_logps(torch.zeros(2, 4), torch.ones(2, 3)), "mask"),
        (lambda: dpo_loss(_P3, _P3, _P3, _P2), "ref_rejected_logps"),
        (lambda: dpo_loss(_P3, _P2, _P3, _P3), "policy_rejected_logps"),
        (lambda: dpo_loss(_P3, _P3, _P3, _P3, beta=0.0), "beta"),
        (lambda: dpo_loss(_P3, _P3, _P3, _P3, label_smoothing=0.5), "label_smoothing"),
        (
            lambda: dpo_loss(_P3, _P3, _P3, _P3, label_smoothing=0.1, loss_type="ipo"),
            "label_smoothing",
        ),
        (lambda: dpo_loss(_P3, _P3, _P3, _P3, loss_type="hinge"), "loss_type"),
        (lambda: modpo_loss(_P3, _P3, _P3, _P3, _P2), "safety_delta"),
        (lambda: modpo_loss(_P3, _P3, _P3, _P3, _P3, w_h=0.0), "w_h"),
        (lambda: modpo_loss(_P3, _P3, _P3, _P3, _P3, beta=-0.1), "beta"),
        (lambda: scalarised_dpo_loss(_P3, _P3, _P3, _P3, _S, _S, [1.0, 0.0, 0.0]), "weights"),
        (
            lambda: scalarised_dpo_loss(_P3, _P3, _P3, _P3, _S, torch.zeros(3, 3), [1.0, 0.0]),
            "rejected_scores",
        ),
        (lambda: scalarised_dpo_loss(_P2, _P2, _P2, _P2, _S, _S, [1.0, 0.0]), "chosen_scores"),
        (lambda: scalarised_dpo_loss(_P3, _P3, _P3, _P3, _P3, _P3, [1.0]), "chosen_scores"),
        (lambda: nontie_mask(_S, _S, torch.ones(3)), "weights"),
        (lambda: sft_loss(torch.zeros(2, 4), torch.ones(2, 3)), "mask"),
        (lambda: unlikelihood_loss(torch.zeros(2, 4), torch.ones(4, 2)), "harmful_mask"),
        (
            lambda: unlikelihood_loss(torch.zeros(2, 4), torch.ones(2, 4), min_complement=0),
            "min_complement",
        ),
        (
            lambda: pt_align_loss(
                torch.zeros(1, 3), torch.ones(1, 2), torch.zeros(1, 3), torch.ones(1, 3)
            ),
            "positive_mask",
        ),
        (
            lambda: pt_align_loss(
                torch.zeros(1, 3), torch.ones(1, 3), torch.zeros(1, 3), torch.ones(1, 2)
            ),
            "harmful_mask",
        ),
        (
            lambda: pt_align_loss(
                torch.zeros(1, 3), torch.ones(1, 3), torch.zeros(1, 3), torch.ones(1, 3), alpha=-1.0
            ),
            "alpha",
        ),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


def test_log1mexp_keeps_its_digits_at_both_ends_in_float32():
    logp = -torch.logspace(-6, 1.5, 200, dtype=torch.float64)  # p from ~1 - 1e-6 down to ~1e-14
    exact = torch.log1p(-torch.exp(logp))
    got = log1mexp(logp.float()).double()
    naive = torch.log(-torch.expm1(logp.float())).double()
    assert torch.allclose(got, exact, rtol=1e-5, atol=0)
    assert not torch.allclose(naive, exact, rtol=1e-5, atol=0)  # what the naive form loses
