#!/usr/bin/env python3
"""Compare two `trainer debug-step` reports (JSON), e.g. CPU vs CUDA on the same weights and batch.

Every numeric leaf present in both files is compared with
    |a - b| <= atol + rtol * max(|a|, |b|)
(defaults sized for bf16 matmuls against an f32 reference: rtol 2e-2, atol 1e-3); `--key-rtol
PREFIX=RTOL` gives the keys that start with PREFIX their own rtol. Lists of numbers
are compared element-wise. Keys that describe the run rather than the math (device, timings,
paths) are skipped. Exit status: 0 all within tolerance, 1 a value differs, 2 the reports do not
have the same numeric keys or cannot be read.

  python3 bench/compare_debug_step.py cpu.json cuda.json [--rtol 2e-2] [--atol 1e-3]
      [--key-rtol teacher_entropy=5e-2] [--json]
"""

import argparse
import json
import math
import sys

SKIP = ("device", "time", "timings", "precision", "kernels", "seconds", "elapsed", "ms", "path", "host", "version", "dtype")


def skipped(key):
    k = key.lower()
    return any(k == s or k.endswith("_" + s) or k.startswith(s + "_") for s in SKIP)


def leaves(obj, prefix=""):
    """Flatten to {dotted.key: float} for numbers (bools excluded)."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if skipped(str(k)):
                continue
            out.update(leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(leaves(v, f"{prefix}[{i}]"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference")
    ap.add_argument("candidate")
    ap.add_argument("--rtol", type=float, default=2e-2)
    ap.add_argument("--atol", type=float, default=1e-3)
    ap.add_argument("--key-rtol", action="append", default=[], metavar="PREFIX=RTOL",
                    help="rtol for the keys that start with PREFIX (repeatable)")
    ap.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")
    args = ap.parse_args()
    key_rtol = []
    for spec in args.key_rtol:
        prefix, _, value = spec.partition("=")
        try:
            key_rtol.append((prefix, float(value)))
        except ValueError:
            print(f"compare: --key-rtol {spec!r} is not PREFIX=RTOL", file=sys.stderr)
            return 2
    try:
        with open(args.reference) as f:
            ref = leaves(json.load(f))
        with open(args.candidate) as f:
            cand = leaves(json.load(f))
    except (OSError, ValueError) as e:
        print(f"compare: cannot read reports: {e}", file=sys.stderr)
        return 2
    only_ref = sorted(set(ref) - set(cand))
    only_cand = sorted(set(cand) - set(ref))
    rows, bad = [], []
    for key in sorted(set(ref) & set(cand)):
        a, b = ref[key], cand[key]
        if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b):
            ok = a == b
            rel = 0.0 if ok else math.inf
        else:
            diff = abs(a - b)
            rtol = next((r for p, r in key_rtol if key.startswith(p)), args.rtol)
            ok = diff <= args.atol + rtol * max(abs(a), abs(b))
            rel = diff / max(abs(a), abs(b), 1e-30)
        rows.append((key, a, b, rel, ok))
        if not ok:
            bad.append(key)
    status = 2 if (only_ref or only_cand or not rows) else (1 if bad else 0)
    if args.json:
        print(json.dumps({
            "compared": len(rows), "failed": bad, "only_in_reference": only_ref,
            "only_in_candidate": only_cand, "max_rel_diff": max((r[3] for r in rows), default=None),
            "rtol": args.rtol, "atol": args.atol, "key_rtol": dict(key_rtol), "ok": status == 0,
        }))
    else:
        w = max((len(r[0]) for r in rows), default=10)
        print(f"{'value':<{w}}  {'reference':>14}  {'candidate':>14}  {'rel.diff':>9}")
        for key, a, b, rel, ok in rows:
            print(f"{key:<{w}}  {a:>14.6g}  {b:>14.6g}  {rel:>9.2e}{'' if ok else '  <-- OUT OF TOLERANCE'}")
        for k in only_ref:
            print(f"only in {args.reference}: {k}")
        for k in only_cand:
            print(f"only in {args.candidate}: {k}")
        verdict = {0: "PASS", 1: "FAIL", 2: "MISMATCHED REPORTS"}[status]
        own = "".join(f", {p}* rtol {r:g}" for p, r in key_rtol)
        print(f"{verdict}: {len(rows) - len(bad)} of {len(rows)} values within "
              f"rtol {args.rtol:g} + atol {args.atol:g}{own}")
    return status


if __name__ == "__main__":
    sys.exit(main())
