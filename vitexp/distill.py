"""Knowledge distillation: the frozen teacher beside the student, and DeiT's soft, hard and token losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Distiller(nn.Module):
    """Calls the student and, in training, a frozen teacher on the same (augmented, mixed) images.

    Returns `(student_output, teacher_logits)` in training and the student's output in eval mode. Images
    arrive normalised for the student; the teacher gets them re-normalised with its own statistics and
    resized to its own input size. The teacher stays in eval mode, without gradients.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        teacher_mean: Sequence[float],
        teacher_std: Sequence[float],
        teacher_img_size: int,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        # x_teacher = (x * s_std + s_mean - t_mean) / t_std = x * scale + shift, on the teacher's device
        device = next(teacher.parameters(), torch.empty(0)).device
        s_mean, s_std = torch.tensor(student_mean, device=device), torch.tensor(student_std, device=device)
        t_mean, t_std = torch.tensor(teacher_mean, device=device), torch.tensor(teacher_std, device=device)
        self.register_buffer("scale", (s_std / t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False)
        self.teacher_img_size = teacher_img_size

    def train(self, mode: bool = True) -> Distiller:
        """Switch the student; the teacher always stays in eval mode."""
        self.training = mode
        self.student.train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (float32) for student-normalised images, under the caller's autocast."""
        x = x * self.scale + self.shift
        if x.shape[-1] != self.teacher_img_size:
            x = F.interpolate(x, size=self.teacher_img_size, mode="bilinear", align_corners=False, antialias=True)
        return self.teacher(x).float()

    def forward(self, x: torch.Tensor):
        out = self.student(x)
        return (out, self.teacher_logits(x)) if self.training else out


class TeacherOnly(nn.Module):
    """The distiller's teacher as a classifier of student-normalised images (to score the teacher)."""

    def __init__(self, distiller: Distiller) -> None:
        super().__init__()
        self.distiller = distiller

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.distiller.teacher_logits(x)


class DistillationLoss(nn.Module):
    """(1 - alpha) * base loss on the class head + alpha * distillation loss, after DeiT.

    - `soft`: KL(teacher || student) at temperature `tau`, times tau^2, averaged over the batch
      (`batchmean`, the mathematically correct KL reduction; DeiT's code divides the summed KL by the
      number of logits instead, which is the same up to a factor of num_classes folded into alpha).
    - `hard`: cross-entropy against the teacher's argmax.
    - `token`: the student returns (class-head, distillation-head) logits; the class head learns from
      the labels, the distillation head from the teacher's argmax (DeiT's best variant).
    """

    def __init__(self, base_loss: nn.Module, distill_type: str, alpha: float, tau: float) -> None:
        super().__init__()
        if distill_type not in ("soft", "hard", "token"):
            raise ValueError(f"distill_type={distill_type!r} is not one of soft, hard, token")
        self.base_loss, self.distill_type, self.alpha, self.tau = base_loss, distill_type, alpha, tau

    def forward(self, outputs: tuple, targets: torch.Tensor) -> torch.Tensor:
        student, teacher = outputs
        if self.distill_type == "token":
            cls_logits, dist_logits = student
        else:
            cls_logits = dist_logits = student
        base = self.base_loss(cls_logits, targets)
        if self.distill_type == "soft":
            distill = F.kl_div(
                F.log_softmax(dist_logits / self.tau, dim=1),
                F.log_softmax(teacher / self.tau, dim=1),
                reduction="batchmean",
                log_target=True,
            ) * (self.tau**2)
        else:
            distill = F.cross_entropy(dist_logits, teacher.argmax(dim=1))
        return (1 - self.alpha) * base + self.alpha * distill


class TokenHead(nn.Module):
    """One head of a distillation-token ViT on its own (`cls` or `dist`), to report each head's accuracy."""

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)
        if self.head == "cls":
            return self.model.head(tokens[:, 0])
        return self.model.head_dist(tokens[:, 1])
