"""Item 4: the per-step cost of the fusion math against one UNet evaluation (SD1.5 UNet).

The fusion math is `SNBFusion.combine` with two Predictions, exactly as the WebUI adapter
calls it for a k-diffusion sampler (x0 space, per-sample sigma): both models' CFG, their
guidance terms, the saliency (blur, resize, softmax), the mask and the blend; for the
`stable` method also the moving average of the saliency maps (timed at a step after the first,
so the average has a past to blend with). It is timed
against one evaluation of the main model's call, a diffusers UNet2DConditionModel with
SD1.5's config (random weights) on cond + uncond rows (2 * batch rows).

    .venv/bin/python bench/fusion_math_bench.py                 # CPU: 64/96/128 latents, batch 1 and 4
    .venv/bin/python bench/fusion_math_bench.py --device cuda   # fp16 on a GPU

Writes bench/results/fusion_math_<device>.json. Goal: combine < 1 % of a UNet evaluation.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C


def make_preds(torch, batch, size, device, dtype, gen):
    from lib_magicfusion.fusion import Prediction
    conds_list = [[(i, 1.0)] for i in range(batch)]
    preds = []
    for _ in range(2):
        out = torch.randn((2 * batch, 4, size, size), generator=gen, device=device).to(dtype)  # one call's x_out
        preds.append(Prediction(out[:batch], out[batch:], conds_list, 7.5))
    return preds


def time_fn(torch, fn, reps, sync, min_s=0.2):
    fn()  # warm-up
    sync()
    times = []
    t_end = time.perf_counter() + min_s
    for i in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if i >= 4 and time.perf_counter() > t_end and i + 1 >= reps // 4:
            break
    return times


def profile_combine(torch, combine, sync, device, name, n=20):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync()
    with profile(activities=acts) as prof:
        for _ in range(n):
            combine()
        sync()
    events = prof.key_averages()
    table = events.table(sort_by="cpu_time_total", row_limit=40)
    kernels = sum(e.count for e in prof.events() if getattr(e, "device_type", None) is not None
                  and str(e.device_type).endswith("CUDA")) / n
    aten = sum(e.count for e in events if e.key.startswith("aten::")) / n
    text = f"combine x{n}: {aten:.0f} aten ops (all levels) and {kernels:.0f} device events per call\n{table}"
    os.makedirs(C.RESULTS, exist_ok=True)
    with open(os.path.join(C.RESULTS, name + "_profile.txt"), "w") as f:
        f.write(text)
    print(f"[fusion-math] profile: {aten:.0f} aten ops and {kernels:.0f} device events per combine", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="64,96,128", help="latent sizes (512, 768, 1024 px)")
    ap.add_argument("--batches", default="1,4", help="images per batch; the UNet call has 2x rows")
    ap.add_argument("--unet-reps", type=int, default=1, help="timed UNet evaluations per case (after one warm-up)")
    ap.add_argument("--math-reps", type=int, default=50)
    ap.add_argument("--dtype", default=None, help="default: float16 on cuda, float32 on cpu")
    ap.add_argument("--out", default=None, help="result name (default fusion_math_<device>)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler of combine at the first case (ops, kernel launches)")
    args = ap.parse_args(argv)

    import torch

    from lib_magicfusion import snb
    from lib_magicfusion.fusion import SNBFusion, guided

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    info = C.machine(torch)
    print(f"[fusion-math] {info.get('gpu') or info['cpu']} x{info['cpu_count']}, torch {torch.__version__}, "
          f"{device} {dtype}", flush=True)

    t0 = time.perf_counter()
    unet = C.make_sd15_unet(torch, 1234, device=device, dtype=dtype)
    print(f"[fusion-math] SD1.5 UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, "
          f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    warmed = False
    with torch.no_grad():
        for size in sizes:
            for batch in batches:
                x = torch.randn((2 * batch, 4, size, size), generator=gen, device=device).to(dtype)
                ctx = torch.randn((2 * batch, 77, 768), generator=gen, device=device).to(dtype)
                t = torch.full((2 * batch,), 500, device=device)
                unet_call = lambda x=x, t=t, ctx=ctx: unet(x, t, encoder_hidden_states=ctx).sample
                if device.type == "cuda":
                    unet_call()  # first call: allocator and kernel selection
                elif not warmed:  # CPU: a small call is enough to load the kernels
                    unet(x[:1, :, :8, :8], t[:1], encoder_hidden_states=ctx[:1])
                    warmed = True
                unet_times = []
                for _ in range(args.unet_reps):
                    sync()
                    s = time.perf_counter()
                    unet_call()
                    sync()
                    unet_times.append(time.perf_counter() - s)

                preds = make_preds(torch, batch, size, device, dtype, gen)
                sigma = torch.full((batch,), 3.0, device=device, dtype=dtype)
                fusion = SNBFusion(ks=(1.0, 1.0), blur=4)
                plan = fusion.plan(0, 20)
                assert plan.fuse
                combine = lambda fusion=fusion, plan=plan, preds=preds, sigma=sigma: fusion.combine(plan, preds, "x0", sigma, step=0)
                stable = SNBFusion(ks=(1.0, 1.0), blur=4, method="stable")
                stable.combine(plan, preds, "x0", sigma, step=0)  # the average's past
                combine_stable = lambda fusion=stable, plan=plan, preds=preds, sigma=sigma: fusion.combine(plan, preds, "x0", sigma,
                                                                                                           step=1)
                deltas = [(p.cond - p.uncond).float() for p in preds]
                outs = [guided(p) for p in preds]
                mask_blend = lambda outs=outs, deltas=deltas: snb.blend(outs, snb.fusion_mask(deltas, (1.0, 1.0), 4))
                cfg_one = lambda preds=preds: guided(preds[0])
                t_combine = time_fn(torch, combine, args.math_reps, sync)
                t_stable = time_fn(torch, combine_stable, args.math_reps, sync)
                t_mask = time_fn(torch, mask_blend, args.math_reps, sync)
                t_cfg = time_fn(torch, cfg_one, args.math_reps, sync)
                u = C.median(unet_times)
                if args.profile and not rows:
                    profile_combine(torch, combine, sync, device, args.out or f"fusion_math_{device.type}")
                row = {"latent": size, "pixels": size * 8, "batch": batch, "unet_rows": 2 * batch,
                       "unet_s": C.summary(unet_times), "combine_s": C.summary(t_combine),
                       "mask_blend_s": C.summary(t_mask), "plain_cfg_s": C.summary(t_cfg),
                       "combine_pct_of_unet": 100 * C.median(t_combine) / u,
                       "combine_stable_s": C.summary(t_stable), "combine_stable_pct_of_unet": 100 * C.median(t_stable) / u,
                       "mask_blend_pct_of_unet": 100 * C.median(t_mask) / u}
                rows.append(row)
                print(f"[fusion-math] latent {size}x{size} batch {batch}: UNet ({2 * batch} rows) {u * 1e3:9.1f} ms | "
                      f"combine {C.median(t_combine) * 1e3:7.3f} ms = {row['combine_pct_of_unet']:.3f} % | "
                      f"stable {C.median(t_stable) * 1e3:7.3f} ms = {row['combine_stable_pct_of_unet']:.3f} % | "
                      f"mask+blend {C.median(t_mask) * 1e3:7.3f} ms = {row['mask_blend_pct_of_unet']:.3f} % | "
                      f"plain CFG {C.median(t_cfg) * 1e3:.3f} ms", flush=True)
    worst = max(max(r["combine_pct_of_unet"], r["combine_stable_pct_of_unet"]) for r in rows)
    result = {"machine": info, "device": str(device), "dtype": str(dtype), "unet_params": sum(p.numel() for p in unet.parameters()),
              "rows": rows, "goal": "combine < 1 % of one UNet evaluation (either method)", "worst_combine_pct": worst,
              "goal_met": worst < 1.0}
    path = C.write_result(args.out or f"fusion_math_{device.type}", result)
    verdict = "MET" if worst < 1 else "MISSED"
    print(f"[fusion-math] worst: combine (official or stable) = {worst:.3f} % of a UNet evaluation -> goal {verdict}; {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
