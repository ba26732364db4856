"""E2E-QP (EfficientQAT): end-to-end training of the quantization step sizes only.

Every QuantLinear is frozen on its integer grid (`QuantLinear.freeze()`): the
integer weights and zero points become buffers and stay bitwise unchanged; the
step sizes (`scale`, fp32) are the only trainable parameters. Everything else
in the model (embeddings, norms, lm_head) is frozen too. The loss is the
causal-LM cross-entropy on the training data, optionally mixed with a
distillation term `kd_weight * T^2 * KL(teacher || student)` on logits from the
full-precision teacher (`ctx.teacher_dir`); the `kd` e2e step
makes distillation the main objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quant.config import Config, ConfigError
from quant.config.scheme import integer_weights_only
from quant.e2e.losses import causal_lm_loss, kd_loss, next_token_nll
from quant.e2e.trainer import Batch, E2EContext, Objective, check_lr
from quant.methods import register
from quant.modules.linear import quant_linears


@dataclass(frozen=True)
class E2EQPOptions(Config):
    lr: float = 2e-5  # step-size learning rate (paper: 2e-5 for w2, 1e-5 for w3/w4)
    kd_weight: float = 0.0  # 0 = pure causal-LM loss; in (0, 1] mixes in KD from the teacher
    kd_temperature: float = 1.0

    def __post_init__(self) -> None:
        check_lr(self.lr, "lr")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ConfigError(f"kd_weight={self.kd_weight} must be in [0, 1]")
        if self.kd_temperature <= 0:
            raise ConfigError(f"kd_temperature={self.kd_temperature} must be > 0")


def freeze_for_e2e_qp(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every QuantLinear on its grid; return the step sizes (the only trainable params)."""
    model.requires_grad_(False)
    scales = []
    for _, m in quant_linears(model):
        m.freeze()
        m.scale.requires_grad_(True)
        scales.append(m.scale)
    if not scales:
        raise ValueError("e2e-qp needs a model with QuantLinear layers (run calibrate / block_ap first)")
    return scales


@register("e2e-qp", kind="e2e", options=E2EQPOptions, check=integer_weights_only)
def setup(model: nn.Module, options: E2EQPOptions, ctx: E2EContext) -> Objective:
    """E2E-QP (EfficientQAT): only the step sizes train, end to end, on the causal-LM loss."""
    scales = freeze_for_e2e_qp(model)
    groups = [{"params": scales, "lr": options.lr, "weight_decay": 0.0, "name": "scale"}]
    if options.kd_weight == 0.0:
        def loss(student: nn.Module, batch: Batch):
            ce = causal_lm_loss(student, batch)
            return ce, {"ce": ce.detach()}

        return Objective(groups, loss)

    teacher = ctx.load_teacher("e2e-qp with kd_weight > 0")
    w, temp = options.kd_weight, options.kd_temperature

    def loss_kd(student: nn.Module, batch: Batch):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        s_logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
        ce = next_token_nll(s_logits, ids, mask)
        _, kd = kd_loss(s_logits, t_logits, temp, mask, normalize="token")  # per token, like ce
        return (1 - w) * ce + w * kd, {"ce": ce.detach(), "kd": kd.detach()}

    return Objective(groups, loss_kd, {"teacher": teacher})
