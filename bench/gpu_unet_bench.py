"""Two UNets vs one: sampling speed and peak memory of plain vs fused generation (SD1.5 UNet).

A k-diffusion Euler sampler (x0 space, SD's scaled-linear schedule) drives two random-weight
diffusers UNet2DConditionModels with SD1.5's config, the way the WebUI adapter
(lib_magicfusion/webui/sampling.py) drives them at every denoiser call:

* plain:   the main model's call on cond + uncond rows, then CFG (fusion.guided);
* fused:   the main model's call (cond + uncond), the expert's call (its cond + its uncond),
           then SNBFusion.combine in x0 space; outside the window (outside = general) only
           the main model's call and CFG, as SNBFusion.plan says;
* floor:   both calls where fused makes them, but the main model's CFG alone (no saliency,
           no blend): what two UNets cost with nothing else, so fused/floor is the price of
           everything MagicFusion adds beyond the expert's UNet;
* batched: the expert is the main checkpoint (two prompts, one negative prompt): one call
           with cond + expert cond + uncond rows, the uncond shared, then combine.

Configurations are interleaved (plain, fused w=1, fused w=0.5, ...) rep by rep; ratios are
per rep against that rep's plain run, and medians are reported. Peak memory: CUDA
max_memory_allocated (GPU) or the process's VmHWM (CPU), plain with one UNet resident vs
fused with both, against the expert UNet's weight bytes.

    python bench/gpu_unet_bench.py                     # CUDA: fp16, 512x512 (64x64 latent), 20 steps
    python bench/gpu_unet_bench.py --device cpu        # CPU fallback: fp32, 256x256, 4 steps, 2 reps

Writes bench/results/unet_steps_<device>.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

SELF = C.Proc()


class Bench:
    def __init__(self, torch, device, dtype, size, steps, batch, cfg_scale=7.5):
        self.torch, self.device, self.dtype = torch, device, dtype
        self.latent = size // 8
        self.steps, self.batch, self.cfg = steps, batch, cfg_scale
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0)
        self.all_sigmas = ((1 - ac) / ac).sqrt()
        ts = torch.linspace(999, 0, steps, dtype=torch.float64)
        sig = [float(self._sigma_at(t)) for t in ts] + [0.0]
        self.sigmas, self.timesteps = sig, [float(t) for t in ts]
        g = torch.Generator(device="cpu").manual_seed(42)
        mk = lambda *s: torch.randn(s, generator=g).to(device, dtype)
        b = batch
        self.cond, self.uncond, self.e_cond = mk(b, 77, 768), mk(b, 77, 768), mk(b, 77, 768)
        self.noise = torch.randn((b, 4, self.latent, self.latent), generator=g).to(device, dtype)
        self.conds_list = [[(i, 1.0)] for i in range(b)]
        self.main = self.expert = None
        self.breakdown = None

    def _sigma_at(self, t):
        lo, hi = math.floor(t), math.ceil(t)
        w = t - lo
        return math.exp((1 - w) * math.log(self.all_sigmas[lo]) + w * math.log(self.all_sigmas[hi]))

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _x0(self, unet, x, sigma, t, ctx):
        """CompVisDenoiser: x0 = x - sigma * eps(x / sqrt(sigma^2 + 1), t)."""
        torch = self.torch
        c_in = 1.0 / math.sqrt(sigma * sigma + 1)
        tt = torch.full((x.shape[0],), t, device=self.device)
        eps = unet(x * c_in, tt, encoder_hidden_states=ctx).sample
        return x - sigma * eps

    def generate(self, mode: str, w: float = 1.0, breakdown: bool = False):
        """mode: plain | fused | floor | batched. Returns the final latent."""
        torch = self.torch
        from lib_magicfusion.fusion import Prediction, SNBFusion, guided
        b = self.batch
        fusion = SNBFusion(ks=(1.0, 1.0), blur=4, start=0.0, end=w, outside=0) if mode != "plain" else None
        parts = {"main_call": 0.0, "expert_call": 0.0, "fusion_math": 0.0, "cfg": 0.0}
        clock = time.perf_counter

        def mark():
            if breakdown:
                self.sync()
            return clock()

        x = self.noise * self.sigmas[0]
        main_ctx = torch.cat([self.cond, self.uncond])
        batched_ctx = torch.cat([self.cond, self.e_cond, self.uncond])
        expert_ctx = torch.cat([self.e_cond, self.uncond])
        for i in range(self.steps):
            s, t = self.sigmas[i], self.timesteps[i]
            plan = fusion.plan(i, self.steps) if fusion is not None else None
            fuse = plan is not None and plan.fuse
            t0 = mark()
            if fuse and mode == "batched":
                out = self._x0(self.main, torch.cat([x, x, x]), s, t, batched_ctx)
                main = Prediction(out[:b], out[2 * b:], self.conds_list, self.cfg)
                expert = Prediction(out[b:2 * b], out[2 * b:], self.conds_list, self.cfg)
                t1 = t2 = mark()
            else:
                out = self._x0(self.main, torch.cat([x, x]), s, t, main_ctx)
                main = Prediction(out[:b], out[b:], self.conds_list, self.cfg)
                t1 = mark()
                if fuse:
                    e_out = self._x0(self.expert, torch.cat([x, x]), s, t, expert_ctx)
                    expert = Prediction(e_out[:b], e_out[b:], self.conds_list, self.cfg)
                t2 = mark()
            if fuse and mode != "floor":
                sigma_b = torch.full((b,), s, device=self.device, dtype=self.dtype)
                denoised = fusion.combine(plan, [main, expert], "x0", sigma_b, step=i).denoised
            else:
                denoised = guided(main)
            t3 = mark()
            d = (x - denoised) / s
            x = x + d * (self.sigmas[i + 1] - s)
            parts["main_call"] += t1 - t0
            parts["expert_call"] += t2 - t1
            parts["fusion_math" if fuse else "cfg"] += t3 - t2
        if breakdown:
            self.breakdown = parts
        return x

    def timed(self, mode, w=1.0):
        self.sync()
        t0 = time.perf_counter()
        x = self.generate(mode, w)
        self.sync()
        dt = time.perf_counter() - t0
        ok = bool(self.torch.isfinite(x).all())
        return dt, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 512 on cuda, 256 on cpu)")
    ap.add_argument("--steps", type=int, default=None, help="default 20 on cuda, 4 on cpu")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 7 on cuda, 2 on cpu)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--windows", default="1,0.5,0.25")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    size = args.size or (512 if cuda else 256)
    steps = args.steps or (20 if cuda else 4)
    reps = args.reps or (7 if cuda else 2)
    windows = [float(w) for w in args.windows.split(",")]
    info = C.machine(torch)
    where = info.get("gpu") if cuda else f"{info['cpu']} x{info['cpu_count']}"
    print(f"[unet-steps] {where}; torch {torch.__version__}; {dtype}; {size}x{size} (latent {size // 8}), "
          f"{steps} steps, batch {args.batch}, {reps} reps", flush=True)

    bench = Bench(torch, device, dtype, size, steps, args.batch)
    mem = {}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        SELF.reset_peak()
    t0 = time.perf_counter()
    bench.main = C.make_sd15_unet(torch, 1, device=device, dtype=dtype)
    unet_bytes = C.weight_bytes(bench.main)
    print(f"[unet-steps] main UNet {unet_bytes / 2**30:.3f} GiB of weights, built in {time.perf_counter() - t0:.1f} s", flush=True)

    def peak_of(fn):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            return {"resident_before": base, "peak": torch.cuda.max_memory_allocated(device)}
        base = SELF.status("VmRSS")
        reset = SELF.reset_peak()
        fn()
        return {"resident_before": base, "peak": SELF.status("VmHWM") if reset else None}

    with torch.no_grad():
        bench.generate("plain")  # warm-up (kernels, allocator)
        mem["plain_one_unet"] = peak_of(lambda: bench.generate("plain"))
        bench.generate("batched")
        mem["batched_same_model"] = peak_of(lambda: bench.generate("batched"))
        t0 = time.perf_counter()
        bench.expert = C.make_sd15_unet(torch, 2, device=device, dtype=dtype)
        print(f"[unet-steps] expert UNet built in {time.perf_counter() - t0:.1f} s", flush=True)
        bench.generate("fused")
        mem["fused_two_unets"] = peak_of(lambda: bench.generate("fused"))
        mem["plain_two_unets_resident"] = peak_of(lambda: bench.generate("plain"))

        configs = [("plain", 1.0)] + [(m, w) for w in windows for m in ("fused", "floor")] + [("batched", 1.0)]
        times = {f"{m}@{w}": [] for m, w in configs}
        ratios = {f"{m}@{w}": [] for m, w in configs if m != "plain"}
        finite = True
        for r in range(reps):
            plain_t = None
            for m, w in configs:
                dt, ok = bench.timed(m, w)
                finite &= ok
                key = f"{m}@{w}"
                times[key].append(dt)
                if m == "plain":
                    plain_t = dt
                else:
                    ratios[key].append(dt / plain_t)
            print(f"[unet-steps] rep {r + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
        bench.generate("fused", 1.0, breakdown=True)
        breakdown = {k: v / steps for k, v in bench.breakdown.items()}
        bench.generate("plain", 1.0, breakdown=True)
        breakdown_plain = {k: v / steps for k, v in bench.breakdown.items()}

    table = []
    for m, w in configs:
        key = f"{m}@{w}"
        med = C.median(times[key])
        row = {"config": key, "mode": m, "window": w, "time_s": C.summary(times[key]), "it_per_s": steps / med}
        if m != "plain":
            row["ratio"] = C.summary(ratios[key])
            row["ratio_of_min_times"] = min(times[key]) / min(times["plain@1.0"])  # host jitter only adds time
            row["floor"] = 1.5 if m.startswith("batched") else 1 + w
        if m in ("fused", "batched"):
            goal = 1.55 if m.startswith("batched") else (2.03 if w == 1.0 else 1 + w + 0.03)
            row["goal"] = goal
            row["goal_met"] = C.median(ratios[key]) <= goal
        if m == "fused":  # what fusion adds beyond the expert's UNet calls, rep by rep
            row["over_two_unets"] = C.summary([f / b for f, b in zip(times[key], times[f"floor@{w}"])])
        table.append(row)
    extra = mem["fused_two_unets"]["peak"] - mem["plain_one_unet"]["peak"] if mem["plain_one_unet"]["peak"] else None
    extra_b = mem["batched_same_model"]["peak"] - mem["plain_one_unet"]["peak"] if mem["plain_one_unet"]["peak"] else None
    memory = {**mem, "expert_unet_bytes": unet_bytes, "extra_peak_fused_bytes": extra,
              "extra_peak_over_expert_weights": extra / unet_bytes if extra is not None else None,
              "extra_peak_batched_bytes": extra_b,
              "goal": "extra peak <= 1.1x expert UNet weights",
              "goal_met": extra is not None and extra <= 1.1 * unet_bytes}
    result = {"machine": info, "device": str(device), "dtype": str(dtype), "size": size, "latent": size // 8,
              "steps": steps, "batch": args.batch, "reps": reps, "all_finite": finite, "table": table,
              "per_step_breakdown_fused_w1_s": breakdown, "per_step_breakdown_plain_s": breakdown_plain,
              "memory": memory}
    path = C.write_result(args.out or f"unet_steps_{device.type}", result)

    print("\n| config | time/gen (median) | it/s | x plain (median of per-rep ratios) | ratio of min times | x two UNets alone | goal |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in table:
        ratio = f"{row['ratio']['median']:.3f} (floor {row['floor']:.2f})" if "ratio" in row else "1"
        goal = f"<= {row['goal']:.2f}: {'met' if row['goal_met'] else 'MISSED'}" if "goal" in row else ""
        rmin = f"{row['ratio_of_min_times']:.3f}" if "ratio" in row else "1"
        over = f"{row['over_two_unets']['median']:.3f}" if "over_two_unets" in row else ""
        print(f"| {row['config']} | {row['time_s']['median']:.3f} s | {row['it_per_s']:.2f} | {ratio} | {rmin} | {over} | {goal} |")
    print("\nper step, fused w=1 (s): " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in breakdown.items()))
    print("per step, plain (s): " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in breakdown_plain.items()))
    g = 2**30
    if extra is not None:
        print(f"peak memory: plain {mem['plain_one_unet']['peak'] / g:.3f} GiB, fused {mem['fused_two_unets']['peak'] / g:.3f} GiB, "
              f"batched same-model {mem['batched_same_model']['peak'] / g:.3f} GiB; extra (fused) {extra / g:.3f} GiB = "
              f"{extra / unet_bytes:.3f}x the expert UNet's {unet_bytes / g:.3f} GiB; extra (batched) {extra_b / g:.3f} GiB")
    print(f"all outputs finite: {finite}; {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
