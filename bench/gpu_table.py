#!/usr/bin/env python3
"""Summarise a scripts/gpu-check.sh results folder as one markdown table (+ summary.json).

Reads steps.tsv (step, rc, seconds), the *-compare.txt verdicts, and the last JSON object printed
in each trainer-b*.log / pytorch-*.log. The trainer's `bench --json` is expected to use the same
keys as bench/pytorch_udi.py (images_per_s, ms_per_step, peak_mem_gib); a few aliases are accepted.

  python3 bench/gpu_table.py gpu-results/

MFU uses 131 GFLOP per image (ViT-S/16, 2×224 + 10×96 crops, K = 65 536: forward + backward of the
student, forward of the teacher) and 989 TFLOP/s (H100/H200 SXM dense bf16). "× PyTorch" divides by
the official-style PyTorch run at the same batch in the same run, "× fast+compile" by the strongest
PyTorch variant (bench/pytorch_udi.py --mode fast --compile). The learning rows are the k-NN top-1
of the demo's labelled set at random init and after training on the GPU with each engine.
The largest batch that fits is estimated per trainer configuration with peaks at two or more
batch sizes: the peak (nvidia-smi's where sampled) fitted linear in the batch, against the card's
memory in env.txt.
"""

import json
import os
import re
import sys

ALIASES = {
    "images_per_s": ("images_per_s", "img_per_s", "images_per_sec", "imgs_per_s", "throughput"),
    "ms_per_step": ("ms_per_step", "step_ms", "ms_step", "mean_ms"),
    "peak_mem_gib": ("peak_mem_gib", "peak_memory_gib", "peak_gib", "peak_mem_gb"),
}


def last_json(path):
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def pick(obj, key):
    for k in ALIASES[key]:
        if isinstance(obj.get(k), (int, float)):
            return float(obj[k])
    if key == "ms_per_step" and isinstance(obj.get("step_s"), (int, float)):
        return 1000.0 * obj["step_s"]
    if key == "peak_mem_gib":
        for k, scale in (("peak_mem_bytes", 2**30), ("peak_mem_mib", 1024), ("peak_mem_mb", 1024)):
            if isinstance(obj.get(k), (int, float)):
                return float(obj[k]) / scale
    return None


def smi_peak_gib(path):
    """Peak of nvidia-smi's memory.used samples (MiB) during a step, in GiB."""
    try:
        with open(path) as f:
            vals = [float(v) for v in f.read().split() if v.replace(".", "", 1).isdigit()]
    except OSError:
        return None
    return max(vals) / 1024 if vals else None


GFLOP_PER_IMAGE = 131.0
PEAK_TFLOPS = 989.0


def card_gib(res):
    """The card's memory from env.txt (nvidia-smi's memory.total, in MiB), in GiB."""
    try:
        with open(os.path.join(res, "env.txt"), errors="replace") as f:
            m = re.search(r"(\d+)\s*MiB", f.read())
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def largest_batch(peaks, card):
    """The largest batch (a multiple of 8) whose peak fits on the card, from the peaks measured at
    two or more batch sizes: peak = a + b·batch fitted by least squares. An estimate, not a run."""
    if card is None or len(peaks) < 2:
        return None
    n = len(peaks)
    mx = sum(b for b, _ in peaks) / n
    my = sum(p for _, p in peaks) / n
    sxx = sum((b - mx) ** 2 for b, _ in peaks)
    if sxx == 0:
        return None
    slope = sum((b - mx) * (p - my) for b, p in peaks) / sxx
    if slope <= 0:
        return None
    return int((card - (my - slope * mx)) / slope) // 8 * 8


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def status(res, name, rc, secs):
    """A step's status: ok, skipped (with the reason gpu-check.sh wrote in its log), or failed."""
    if rc == "0":
        return "ok"
    if rc == "skipped":
        try:
            with open(os.path.join(res, name + ".log")) as f:
                why = f.readline().strip().removeprefix("skipped: ")
        except OSError:
            why = ""
        return f"skipped ({why})" if why else "skipped"
    return f"failed (rc {rc}, {secs}s)"


def main():
    res = sys.argv[1] if len(sys.argv) > 1 else "gpu-results"
    steps = {}
    try:
        with open(os.path.join(res, "steps.tsv")) as f:
            next(f)
            for line in f:
                name, rc, secs = line.rstrip("\n").split("\t")
                steps[name] = (rc, secs)
    except (OSError, StopIteration, ValueError):
        pass

    out, summary = [], {"bench": [], "debug_step": []}
    out.append("| run | batch | images/s | ms/step | MFU | × PyTorch | × fast+compile | peak GiB (own) | peak GiB (nvidia-smi) | status |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    names = sorted(
        (n for n in steps if n.startswith(("trainer-", "pytorch-"))),
        key=lambda n: (not n.startswith("trainer"), int(re.sub(r".*-b", "", n) or 0), n),
    )
    torch_ips, fast_ips = {}, {}
    for name in names:
        for prefix, table in (("pytorch-official-b", torch_ips), ("pytorch-fast-compile-b", fast_ips)):
            if name.startswith(prefix) and steps[name][0] == "0":
                o = last_json(os.path.join(res, name + ".log")) or {}
                table[int(name.rsplit("-b", 1)[1])] = pick(o, "images_per_s")
    for name in names:
        rc, secs = steps[name]
        obj = last_json(os.path.join(res, name + ".log")) or {}
        row = {
            "run": name.rsplit("-b", 1)[0],
            "batch": int(name.rsplit("-b", 1)[1]),
            **{k: pick(obj, k) for k in ALIASES},
            "smi_peak_gib": smi_peak_gib(os.path.join(res, name + ".smi")),
            "status": status(res, name, rc, secs),
        }
        ips = row["images_per_s"] if rc == "0" else None
        row["mfu"] = ips * GFLOP_PER_IMAGE / (PEAK_TFLOPS * 1e3) if ips else None
        base = torch_ips.get(row["batch"])
        row["vs_pytorch"] = ips / base if ips and base else None
        fast = fast_ips.get(row["batch"])
        row["vs_fast_compile"] = ips / fast if ips and fast else None
        summary["bench"].append({**row, "raw": obj})
        out.append(
            f"| {row['run']} | {row['batch']} | {fmt(row['images_per_s'], '.1f')} | "
            f"{fmt(row['ms_per_step'], '.1f')} | {fmt(row['mfu'], '.1%')} | "
            f"{fmt(row['vs_pytorch'], '.2f')} | {fmt(row['vs_fast_compile'], '.2f')} | "
            f"{fmt(row['peak_mem_gib'], '.2f')} | "
            f"{fmt(row['smi_peak_gib'], '.2f')} | {row['status']} |"
        )

    # Per configuration of our trainer, the largest batch that fits, from its measured peaks
    # (nvidia-smi's where sampled: it includes the CUDA context and the allocator's cache).
    card = card_gib(res)
    by_run = {}
    for row in summary["bench"]:
        peak = row["smi_peak_gib"] or row["peak_mem_gib"]
        if row["run"].startswith("trainer-") and row["status"] == "ok" and peak:
            by_run.setdefault(row["run"], []).append((row["batch"], peak))
    summary["largest_batch"] = {}
    for run, peaks in sorted(by_run.items()):
        est = largest_batch(peaks, card)
        if est is None:
            continue
        summary["largest_batch"][run] = est
        batches = "/".join(str(b) for b, _ in sorted(peaks))
        out.append("")
        out.append(f"* {run}: largest batch that fits on the {card:.0f} GiB card ≈ {est} "
                   f"(peak linear in the batch through the peaks at {batches}; an estimate, not run)")

    out.append("")
    out.append("| CPU f32 (composed) vs CUDA debug-step | verdict |")
    out.append("|---|---|")
    cmp_names = sorted(n[: -len("-compare.txt")] for n in os.listdir(res) if n.endswith("-compare.txt"))
    for cmp_name in cmp_names or ["debug-tiny", "debug-vits"]:
        path = os.path.join(res, cmp_name + "-compare.txt")
        verdict = None
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(("PASS", "FAIL", "MISMATCHED")):
                        verdict = line.strip()
            if verdict is None:
                with open(path) as f:
                    verdict = f.readline().strip()
        except OSError:
            failed = [n for n in steps if n.startswith(cmp_name) and steps[n][0] != "0"]
            verdict = "not compared" + (f": {', '.join(failed)} failed" if failed else "")
        summary["debug_step"].append({"config": cmp_name, "verdict": verdict})
        out.append(f"| {cmp_name} | {verdict} |")

    learn = {}
    for name in ("learn-knn-init", "learn-knn-explicit", "learn-knn-autograd"):
        o = last_json(os.path.join(res, name + ".log")) or {}
        top1 = o.get("top1", o.get("top1_pct"))
        learn[name] = top1
    summary["learning"] = learn
    if any(v is not None for v in learn.values()):
        out.append("")
        out.append("| learning (demo set, tiny config, on the GPU) | k-NN top-1 |")
        out.append("|---|---:|")
        for name, label in (("learn-knn-init", "random init"), ("learn-knn-explicit", "after training, explicit engine"),
                            ("learn-knn-autograd", "after training, autograd engine")):
            out.append(f"| {label} | {fmt(learn[name], '.1f')} |")

    kc = last_json(os.path.join(res, "kernel-check.log"))
    summary["kernel_check"] = kc
    out.append("")
    if kc:
        out.append(f"kernel-check on {kc.get('device')} ({kc.get('shapes', {}).get('name')} shapes): "
                   f"{'all match their CPU references' if kc.get('ok') else 'SOME KERNELS DIFFER'}")
        out.append("")
        out.append("| op | dtype | shape | fwd rel err | bwd rel err | tol | pass | composed ms | fused ms | speed-up |")
        out.append("|---|---|---|---:|---:|---:|---|---:|---:|---:|")
        for r in kc.get("results", []):
            # A row whose check errored has no numbers (NaN in Rust, null in the JSON).
            sp = r["composed_ms"] / r["fused_ms"] if r.get("fused_ms") and r.get("composed_ms") else None
            out.append(
                f"| {r['op']} | {r['dtype']} | {r['shape']} | {fmt(r.get('fwd_max_rel'), '.1e')} | "
                f"{fmt(r.get('bwd_max_rel'), '.1e')} | {r['tolerance']:.1e} | {'ok' if r['pass'] else 'FAIL'} | "
                f"{fmt(r.get('composed_ms'), '.3f')} | {fmt(r.get('fused_ms'), '.3f')} | {fmt(sp, '.2f')}× |"
            )
    else:
        out.append(f"kernel-check: no result (step status {steps.get('kernel-check', ('not run',))[0]})")

    # The whole system's one-line summaries (end-to-end run, prefetch on vs off, NCCL).
    lines = []
    for name in ("e2e-summary.txt", "e2e-prefetch.txt", "nccl-summary.txt"):
        try:
            with open(os.path.join(res, name)) as f:
                lines += [l.rstrip() for l in f if l.strip()]
        except OSError:
            pass
    if lines:
        out.append("")
        out += [f"* {l}" for l in lines]

    smoke = last_json(os.path.join(res, "device-smoke.log"))
    summary["device_smoke"] = smoke
    out.append("")
    if smoke:
        mm = smoke.get("matmul_4096_tflops") or {}
        out.append(
            f"device-smoke on {smoke.get('device')}: {'ok' if smoke.get('ok') else 'MISMATCH'} "
            f"(loss rel.diff {smoke.get('loss_rel_diff'):.2e}, grads {smoke.get('grad_rel_diff')}); "
            f"4096² matmul bf16 {fmt(mm.get('bf16'), '.0f')} / f32 {fmt(mm.get('f32'), '.0f')} TFLOP/s"
        )
    else:
        out.append(f"device-smoke: no result (step status {steps.get('device-smoke', ('not run',))[0]})")
    print("\n".join(out))
    with open(os.path.join(res, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
