#!/usr/bin/env python3
"""PyTorch baseline: one UDI pre-training step of ViT-S/16, timed on synthetic inputs.

Written from the UDI paper and the official ISL-CV/udi code (at 133c2cb), self-contained
(torch only, no timm): a timm-style ViT-S/16 with two class tokens ([cls], [cls+]), the SRS
layer, ONE shared DINO head (K = 65 536, weight-normalised last layer), the three losses with
their three centres, AdamW with the official parameter groups, per-parameter gradient clipping,
and the EMA teacher.

Two implementations of the same step:
  --mode official (default): what the official code does: explicit attention (q @ k^T, softmax),
      fp16 autocast + GradScaler, torch.optim.AdamW defaults, a Python loop for clipping and EMA,
      the teacher backbone run twice on the globals (once for the global rows, once for the local
      rows) and the student SRS also run on the local crops (its output is discarded).
  --mode fast: the usual speed-ups: SDPA attention, bf16 autocast without a scaler, fused AdamW,
      teacher run once, foreach clipping/EMA (and --compile for torch.compile of the backbones).
Both compute the same losses (up to rounding). Inputs are random tensors already on the device,
so this measures the training step only. Timing: --warmup steps, then --steps timed steps.

Examples:
  python3 bench/pytorch_udi.py --batch 128                       # the official-style baseline
  python3 bench/pytorch_udi.py --batch 128 --mode fast --json
  python3 bench/pytorch_udi.py --batch 128 --dino-only           # DINO: one cls token, L_cls only
  python3 bench/pytorch_udi.py --tiny --device cpu --steps 2     # proves it runs, anywhere
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def trunc_normal_(t, std=0.02):
    # Truncation at +-2 absolute: effectively untruncated for std 0.02 (spec 2.1).
    nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


# ----------------------------------------------------------------------------------- model


class DropPath(nn.Module):
    """Per-sample stochastic depth; survivors scaled by 1/keep (spec 2.1)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim, heads, sdpa):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.sdpa = sdpa
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.sdpa:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, drop_path, sdpa):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, sdpa)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """ViT with `n_cls` class tokens prepended at the input ([cls], [cls+]), own pos rows each."""

    def __init__(self, cfg, n_cls, drop_path_rate, sdpa):
        super().__init__()
        dim, p = cfg.dim, cfg.patch
        self.patch, self.n_cls = p, n_cls
        self.grid = cfg.global_size // p
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=p, stride=p)  # PyTorch default init
        self.cls_token = nn.Parameter(torch.zeros(1, n_cls, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_cls + self.grid**2, dim))
        rates = torch.linspace(0, drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            [Block(dim, cfg.heads, cfg.mlp_ratio, r, sdpa) for r in rates]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        trunc_normal_(self.cls_token)
        trunc_normal_(self.pos_embed)

    def pos_for(self, h, w):
        """DINO's bicubic resampling with the +0.1 trick (spec 2.2), every forward."""
        g = self.grid
        gh, gw = h // self.patch, w // self.patch
        if gh == g and gw == g:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, : self.n_cls], self.pos_embed[:, self.n_cls :]
        dim = patch_pos.shape[-1]
        patch_pos = F.interpolate(
            patch_pos.reshape(1, g, g, dim).permute(0, 3, 1, 2),
            scale_factor=((gh + 0.1) / g, (gw + 0.1) / g),
            mode="bicubic",
        )
        assert patch_pos.shape[-2:] == (gh, gw)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def forward(self, img):
        """Last-block tokens (B, n_cls + N, dim), before the final LayerNorm."""
        b, _, h, w = img.shape
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1) + self.pos_for(h, w)
        for blk in self.blocks:
            x = blk(x)
        return x


class SRS(nn.Module):
    """Masked attention over one view's patch tokens, queries = rows @ Q (spec 2.3)."""

    def __init__(self, dim, heads, skip=True):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.skip = skip
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)  # pre-norm (the wrapper's)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # post-norm

    def forward(self, patches, rows):
        """patches (B, N, C) last-block patch tokens; rows (B, n, N) one-hot or bilinear."""
        b, n_tok, c = patches.shape
        h, d = self.heads, c // self.heads
        xh = self.norm1(patches)
        qkv = self.qkv(xh).reshape(b, n_tok, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, N, d)
        rows = rows.to(q.dtype)
        q = torch.einsum("bnm,bhmd->bhnd", rows, q)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, n, N)
        valid = (rows.float().sum(-1) > 0)[:, None, :, None]
        logits = logits.masked_fill(~valid, 1e-9)  # invalid rows: uniform attention
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, c)
        out = self.proj(out)
        if self.skip:
            out = out + rows @ xh
        return self.norm(out)


class Head(nn.Module):
    """DINO head: 3-layer MLP -> L2 norm -> weight-normalised Linear(bottleneck, K), g trainable."""

    def __init__(self, cfg):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.hidden), nn.GELU(),
            nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(),
            nn.Linear(cfg.hidden, cfg.bottleneck),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight)
                nn.init.zeros_(m.bias)
        self.weight_g = nn.Parameter(torch.ones(cfg.out_dim, 1))
        self.weight_v = nn.Parameter(torch.empty(cfg.out_dim, cfg.bottleneck))
        nn.init.uniform_(self.weight_v, -1 / math.sqrt(cfg.bottleneck), 1 / math.sqrt(cfg.bottleneck))

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12)
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, w)


class Net(nn.Module):
    def __init__(self, cfg, dino_only, drop_path_rate, sdpa):
        super().__init__()
        self.backbone = ViT(cfg, 1 if dino_only else 2, drop_path_rate, sdpa)
        for name, m in self.backbone.named_modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight)
                nn.init.zeros_(m.bias)
        self.srs = None
        if not dino_only:
            self.srs = SRS(cfg.dim, cfg.heads)
            for m in (self.srs.qkv, self.srs.proj):
                trunc_normal_(m.weight)
                nn.init.zeros_(m.bias)
        self.head = Head(cfg)


# ----------------------------------------------------------------------------------- data


def bilinear_rows(gen, shape, n_valid, grid):
    """Rows over a grid x grid target: bilinear weights at random continuous positions."""
    *lead, n = shape
    u = torch.rand(*lead, n, generator=gen) * (grid - 1)
    v = torch.rand(*lead, n, generator=gen) * (grid - 1)
    fu, fv = u.floor(), v.floor()
    cu, cv = (fu + 1).clamp(max=grid - 1), (fv + 1).clamp(max=grid - 1)
    rows = torch.zeros(*lead, n, grid * grid)
    for ru, rv, wgt in (
        (fu, fv, (fu + 1 - u) * (fv + 1 - v)),
        (fu, cv, (fu + 1 - u) * (v - fv)),
        (cu, fv, (u - fu) * (fv + 1 - v)),
        (cu, cv, (u - fu) * (v - fv)),
    ):
        rows.scatter_add_(-1, (ru * grid + rv).long().unsqueeze(-1), wgt.unsqueeze(-1))
    return rows * valid_mask(n_valid, n).unsqueeze(-1)


def onehot_rows(gen, shape, n_valid, n_src):
    *lead, n = shape
    idx = torch.rand(*lead, n_src, generator=gen).argsort(-1)[..., :n]
    rows = F.one_hot(idx, n_src).float()
    return rows * valid_mask(n_valid, n).unsqueeze(-1)


def valid_mask(n_valid, n):
    """Valid rows first (spec 1.5): row r is valid iff r < n_valid."""
    return (torch.arange(n) < n_valid.unsqueeze(-1)).float()


def synthetic_batch(cfg, batch, device, seed=0):
    """Normalised-looking random crops and SRS rows with ~73 % valid rows (spec 1.5 figures)."""
    gen = torch.Generator().manual_seed(seed)
    gg, gl = cfg.global_size // cfg.patch, cfg.local_size // cfg.patch
    ng, nl = cfg.n_global_rows, cfg.n_local_rows
    L = cfg.n_local
    d = {
        "g": torch.randn(2 * batch, 3, cfg.global_size, cfg.global_size, generator=gen),
        "l": torch.randn(L * batch, 3, cfg.local_size, cfg.local_size, generator=gen),
    }
    # Global pairs p = 0 (g0->g1), 1 (g1->g0): shared valid counts for S and T of a pair.
    vg = torch.binomial(torch.full((2, batch), float(ng)), torch.full((2, batch), 0.73), generator=gen)
    vg = vg.clamp(min=1)
    d["s_g"] = onehot_rows(gen, (2, batch, ng), vg, gg * gg)
    d["t_g"] = bilinear_rows(gen, (2, batch, ng), vg, gg)
    # Local pairs (k, t): l_k -> g_t; about 3 % have no valid row at all (spec 1.5).
    vl = torch.binomial(torch.full((L, 2, batch), float(nl)), torch.full((L, 2, batch), 0.73), generator=gen)
    d["t_l"] = bilinear_rows(gen, (L, 2, batch, nl), vl, gg)
    d["s_l"] = onehot_rows(gen, (L, 2, batch, nl), vl, gl * gl)
    return {k: v.to(device) for k, v in d.items()}


# ----------------------------------------------------------------------------------- step


def softmax_ce(target_probs, student_logits, tau_s):
    """H(P, s) = -sum_K P log_softmax(s / tau_s), over the last axis."""
    return -(target_probs * F.log_softmax(student_logits.float() / tau_s, dim=-1)).sum(-1)


class UDIStep:
    def __init__(self, cfg, args, device):
        self.cfg, self.args, self.device = cfg, args, device
        sdpa = args.mode == "fast"
        self.student = Net(cfg, args.dino_only, 0.1, sdpa).to(device)
        self.teacher = Net(cfg, args.dino_only, 0.0, sdpa).to(device)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.s_backbone, self.t_backbone = self.student.backbone, self.teacher.backbone
        if args.compile:
            self.s_backbone = torch.compile(self.s_backbone)
            self.t_backbone = torch.compile(self.t_backbone)
        self.centres = torch.zeros(3, cfg.out_dim, device=device)
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
        lr = 5e-4 * args.batch / 256
        groups = [{"params": decay, "weight_decay": 0.04}, {"params": no_decay, "weight_decay": 0.0}]
        fused = args.mode == "fast" and device.type == "cuda"
        self.opt = torch.optim.AdamW(groups, lr=lr, fused=fused or None)
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}[args.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.s_params = [p for p in self.student.parameters()]
        self.t_params = [p for p in self.teacher.parameters()]
        self.tau_t, self.tau_s, self.alpha, self.momentum = 0.04, 0.1, 0.5, 0.996

    # --- forward passes

    def teacher_forward(self, d):
        cfg, off = self.cfg, self.args.mode == "official"
        B, L = self.args.batch, cfg.n_local
        with torch.no_grad():
            tok = self.t_backbone(d["g"])  # (2B, n_cls+N, C): [g0 rows; g1 rows]
            cls_in = self.teacher.backbone.norm(tok[:, 0])
            if self.args.dino_only:
                return {"cls": self.teacher.head(cls_in).float().view(2, B, -1)}
            patches = tok[:, 2:]
            # Rows per teacher view t: global pair p = 1 - t (g_{1-t} -> g_t), then l_k -> g_t.
            t_glob = d["t_g"].flip(0).reshape(2 * B, cfg.n_global_rows, -1)
            t_loc = d["t_l"].permute(1, 2, 0, 3, 4).reshape(2 * B, L * cfg.n_local_rows, -1)
            if off:  # the official wrapper runs the teacher ViT again for the local rows
                patches2 = self.t_backbone(d["g"])[:, 2:]
                z = torch.cat((self.teacher.srs(patches, t_glob), self.teacher.srs(patches2, t_loc)), 1)
            else:
                z = self.teacher.srs(patches, torch.cat((t_glob, t_loc), 1))
            n_rows = z.shape[1]
            out = self.teacher.head(torch.cat((cls_in, z.reshape(2 * B * n_rows, -1)), 0)).float()
            t_cls = out[: 2 * B].view(2, B, -1)
            pat = out[2 * B :].view(2, B, n_rows, -1)
            return {
                "cls": t_cls,
                "pat_g": pat[:, :, : cfg.n_global_rows],  # [t] = teacher view t at pair 1-t rows
                "pat_l": pat[:, :, cfg.n_global_rows :].reshape(2, B, L, cfg.n_local_rows, -1),
            }

    def student_forward(self, d):
        cfg = self.cfg
        B, L = self.args.batch, cfg.n_local
        tok_g = self.s_backbone(d["g"])
        tok_l = self.s_backbone(d["l"])
        norm = self.student.backbone.norm
        n_cls = 1 if self.args.dino_only else 2
        cls = torch.cat((norm(tok_g[:, :n_cls]), norm(tok_l[:, :n_cls])), 0)  # (12B, n_cls, C)
        if self.args.dino_only:
            return {"cls": self.student.head(cls[:, 0]).view(2 + L, B, -1)}
        s_rows = d["s_g"].reshape(2 * B, cfg.n_global_rows, -1)  # view v uses pair p = v
        z = self.student.srs(tok_g[:, 2:], s_rows)
        if self.args.mode == "official":  # computed and thrown away by the official code
            s_loc = d["s_l"].permute(0, 2, 1, 3, 4).reshape(L * B, 2 * cfg.n_local_rows, -1)
            self.student.srs(tok_l[:, 2:], s_loc)
        n = cls.shape[0]
        x = torch.cat((cls[:, 0], cls[:, 1], z.reshape(-1, z.shape[-1])), 0)
        out = self.student.head(x)
        return {
            "cls": out[:n].view(2 + L, B, -1),
            "cls_plus": out[n : 2 * n].view(2 + L, B, -1),
            "pat": out[2 * n :].view(2, B, cfg.n_global_rows, -1),
        }

    # --- losses (spec 3), in fp32

    def losses(self, s, t, d):
        c0, c1, c2 = self.centres
        tau_t, tau_s, a = self.tau_t, self.tau_s, self.alpha
        n_pairs = 2 + 2 * self.cfg.n_local
        p0 = F.softmax((t["cls"] - c0) / tau_t, dim=-1)  # (2, B, K) per teacher view
        l_cls = (
            softmax_ce(p0.flip(0), s["cls"][:2], tau_s).mean(-1).sum()
            + softmax_ce(p0.sum(0, keepdim=True), s["cls"][2:], tau_s).mean(-1).sum()
        ) / n_pairs
        new_c = [t["cls"].mean((0, 1))]
        if self.args.dino_only:
            return l_cls, {"cls": l_cls}, new_c
        # Multimodal targets on raw logits (spec 3.2), masks from the T-rows' sums. The masked
        # sums are einsums (batched matmuls) so no (rows x K) temporaries are made.
        valid_g = (d["t_g"].sum(-1) > 0).float()  # (2, B, ng), pair v: rows of g_v -> g_1-v
        tp_g = t["pat_g"].flip(0)  # [v] = teacher view 1-v at the rows of pair v
        sum_g = torch.einsum("vbn,vbnc->vbc", valid_g, tp_g)
        mm_g = a * sum_g / (valid_g.sum(-1)[..., None] + 1e-5) + (1 - a) * t["cls"].flip(0)
        valid_l = (d["t_l"].sum(-1) > 0).float().permute(1, 2, 0, 3)  # (2, B, L, nl): l_k -> g_t
        sum_l = torch.einsum("tbkn,tbknc->tbkc", valid_l, t["pat_l"])  # (2, B, L, K)
        avg_l = sum_l / (valid_l.sum(-1)[..., None] + 1e-5)
        mm_l = (a * avg_l + (1 - a) * t["cls"][:, :, None]).permute(2, 0, 1, 3)  # (L, 2, B, K)
        ce_g = softmax_ce(F.softmax((mm_g - c1) / tau_t, -1), s["cls_plus"][:2], tau_s)
        ce_l = softmax_ce(F.softmax((mm_l - c1) / tau_t, -1), s["cls_plus"][2:, None], tau_s)
        l_udi = (ce_g.mean(-1).sum() + ce_l.mean(-1).sum()) / n_pairs
        ce_p = softmax_ce(F.softmax((tp_g - c2) / tau_t, -1), s["pat"], tau_s)
        l_patch = (ce_p * valid_g).sum() / valid_g.sum()
        total = (l_cls + l_udi + l_patch) / 3
        # Centre statistics (spec 3.4): the local-projected teacher patches count toward c2;
        # the count is the sum of the bilinear row sums.
        n_rows = d["t_g"].sum() + d["t_l"].sum()
        new_c += [
            torch.cat((mm_g.reshape(-1, mm_g.shape[-1]), mm_l.reshape(-1, mm_l.shape[-1]))).mean(0),
            (sum_g.sum((0, 1)) + sum_l.sum((0, 1, 2))) / n_rows,
        ]
        return total, {"cls": l_cls, "udi": l_udi, "patch": l_patch}, new_c

    # --- one iteration (spec 4, order of operations)

    def step(self, d):
        enabled = self.amp_dtype is not None
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=enabled):
            t = self.teacher_forward(d)
            s = self.student_forward(d)
        total, parts, new_c = self.losses(s, t, d)
        with torch.no_grad():
            for j, c in enumerate(new_c):
                self.centres[j].mul_(0.9).add_(c.detach(), alpha=0.1)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.opt)
        self.clip(3.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.ema()
        return total, parts

    def clip(self, max_norm):
        grads = [p.grad for p in self.s_params if p.grad is not None]
        if self.args.mode == "official":
            for g in grads:  # utils.clip_gradients: per-parameter
                coef = max_norm / (g.norm(2) + 1e-6)
                if coef < 1:
                    g.mul_(coef)
        else:
            norms = torch._foreach_norm(grads)
            coefs = [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms]
            torch._foreach_mul_(grads, coefs)

    @torch.no_grad()
    def ema(self):
        m = self.momentum
        if self.args.mode == "official":
            for ps, pt in zip(self.s_params, self.t_params):
                pt.mul_(m).add_((1 - m) * ps.detach())
        else:
            torch._foreach_lerp_(self.t_params, self.s_params, 1 - m)


# ----------------------------------------------------------------------------------- main


class Cfg:
    def __init__(self, tiny, n_local):
        if tiny:  # sized like configs/tiny.toml: 64/32 px crops, patch 8, small model and head
            self.global_size, self.local_size, self.patch = 64, 32, 8
            self.dim, self.depth, self.heads, self.mlp_ratio = 48, 2, 2, 4.0
            self.hidden, self.bottleneck, self.out_dim = 64, 32, 256
            self.n_local = 4 if n_local is None else n_local
            g_win, l_win = 2, 2
        else:  # ViT-S/16, the UDI recipe
            self.global_size, self.local_size, self.patch = 224, 96, 16
            self.dim, self.depth, self.heads, self.mlp_ratio = 384, 12, 6, 4.0
            self.hidden, self.bottleneck, self.out_dim = 2048, 256, 65536
            self.n_local = 10 if n_local is None else n_local
            g_win, l_win = 3, 2
        self.n_global_rows = ((self.global_size // self.patch) // g_win) ** 2
        self.n_local_rows = ((self.local_size // self.patch) // l_win) ** 2


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128, help="images per step (default 128)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--mode", choices=["official", "fast"], default="official")
    ap.add_argument("--dino-only", action="store_true", help="DINO: one class token, L_cls only")
    ap.add_argument("--amp", choices=["fp16", "bf16", "none"], default=None,
                    help="default: fp16 (official) / bf16 (fast) on cuda, none on cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbones")
    ap.add_argument("--n-local", type=int, default=None, help="local crops (default 10, tiny 4)")
    ap.add_argument("--tiny", action="store_true", help="tiny model and crops (CPU smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.amp is None:
        args.amp = "none" if device.type == "cpu" else ("fp16" if args.mode == "official" else "bf16")
    if device.type == "cuda" and args.mode == "fast":
        torch.backends.cuda.matmul.allow_tf32 = True  # the official code leaves PyTorch's defaults
    torch.manual_seed(args.seed)
    cfg = Cfg(args.tiny, args.n_local)
    udi = UDIStep(cfg, args, device)
    data = synthetic_batch(cfg, args.batch, device, args.seed)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        udi.step(data)
    sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        total, parts = udi.step(data)
        sync()
        times.append(time.perf_counter() - t0)
    loss = float(total.detach())
    if not math.isfinite(loss):
        print(f"non-finite loss {loss}", file=sys.stderr)
        sys.exit(1)
    times.sort()
    ms_mean = 1000 * sum(times) / len(times)
    result = {
        "impl": "pytorch",
        "mode": args.mode + ("+compile" if args.compile else ""),
        "objective": "dino" if args.dino_only else "udi",
        "model": "tiny" if args.tiny else "vit_s16",
        "batch": args.batch,
        "n_local": cfg.n_local,
        "out_dim": cfg.out_dim,
        "amp": args.amp,
        "steps": args.steps,
        "ms_per_step": round(ms_mean, 3),
        "ms_per_step_median": round(1000 * times[len(times) // 2], 3),
        "images_per_s": round(args.batch * 1000 / ms_mean, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None,
        "loss": loss,
        "loss_parts": {k: float(v.detach()) for k, v in parts.items()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"pytorch {result['mode']} {result['objective']} {result['model']} batch {args.batch} "
            f"on {result['device']} ({args.amp}): {result['images_per_s']:.1f} images/s, "
            f"{ms_mean:.1f} ms/step (median {result['ms_per_step_median']:.1f}), "
            f"peak {result['peak_mem_gib']} GiB, loss {loss:.4f} {result['loss_parts']}"
        )


if __name__ == "__main__":
    main()
