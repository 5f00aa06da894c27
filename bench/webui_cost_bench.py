"""What LoRA experts, expert units and the Forge host cost, in the real WebUI (issues #13, #14, #15).

Each case is measured interleaved against its own reference: ref, case, ref, case, ..., ref;
every case run is divided by the mean of the reference runs just before and after it, and the
median of those ratios is compared with the goal.

    .venv/bin/python bench/webui_cost_bench.py --suite lora,units      # A1111, full SD1.5 UNets (bench fixtures)
    .venv/bin/python bench/webui_cost_bench.py --host forge --suite windows
    .venv/bin/python bench/webui_cost_bench.py --host forge --suite windows --cases "main checkpoint"
                     # re-measure the cases whose name contains that text; the others stay as they were

Suites:
  lora     main checkpoint + a LoRA expert at w = 1 vs a plain generation with that LoRA in the
           main prompt (goal <= 1.15), a separate checkpoint with the LoRA vs plain (goal <= 2.05);
           a rank-16 LoRA on every attention projection and convolution of the UNet and the text
           encoder (tests/webui/loras.py); peak RSS of each against the plain one
  units    two separate experts (goal <= 1 + 2 + 0.05), one separate expert and a unit on the
           main checkpoint (goal <= 1 + 1 + 0.05), both at w = 1
  windows  one expert at w = 1, 0.5, 0.25 (goals 2.03, 1 + w + 0.03) and the main checkpoint
           with two prompts (goal <= 1.55), the A1111 benchmark's cases, for any host

Writes bench/results/webui_cost_<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

sys.path.insert(0, os.path.join(C.REPO, "tests", "webui"))
sys.path.insert(0, C.REPO)
import server as S

PROMPT, EXPERT_PROMPT, NEGATIVE = "a photo of a cat on a sofa", "a watercolor painting of a red fox", "blurry, low quality"
LORA = "bench-lora16"


def names(host: str) -> tuple[str, str, str]:
    return ("forge-sd15-a", "forge-sd15-b", "forge-sd15-b") if host == "forge" else ("bench-sd15-a", "bench-sd15-b", "bench-sd15-c")


def cases(suite: str, host: str) -> list[dict]:
    main, b, c = names(host)

    def unit(checkpoint, prompt=EXPERT_PROMPT):
        return {"checkpoint": checkpoint, "prompt": prompt}

    plain = {"prompt": PROMPT}
    plain_lora = {"prompt": f"{PROMPT} <lora:{LORA}:1>"}
    out = []
    if suite == "lora":
        out.append({"name": "main checkpoint + LoRA expert, w=1", "ref": plain_lora, "goal": 1.15,
                    "case": {**plain, "units": [unit(main, f"{EXPERT_PROMPT} <lora:{LORA}:1>")]}})
        out.append({"name": "separate checkpoint + LoRA expert, w=1", "ref": plain, "goal": 2.05,
                    "case": {**plain, "units": [unit(b, f"{EXPERT_PROMPT} <lora:{LORA}:1>")]}})
    elif suite == "units":
        out.append({"name": "two separate experts, w=1", "ref": plain, "goal": 3.05, "case": {**plain, "units": [unit(b), unit(c)]}})
        out.append({"name": "a separate expert + a main-checkpoint unit, w=1", "ref": plain, "goal": 2.05,
                    "case": {**plain, "units": [unit(b), unit(main)]}})
    elif suite == "windows":
        for w in (1.0, 0.5, 0.25):
            out.append({"name": f"expert, w={w}", "ref": plain, "goal": 2.03 if w == 1.0 else 1 + w + 0.03,
                        "case": {**plain, "units": [unit(b)], "fusion_end": w}})
        out.append({"name": "main checkpoint, two prompts, w=1", "ref": plain, "goal": 1.55, "case": {**plain, "units": [unit(main)]}})
    else:
        raise SystemExit(f"unknown suite {suite!r}")
    return out


class Runner:
    def __init__(self, client, proc, host: str, size: int, steps: int):
        self.c, self.proc, self.host, self.size, self.steps = client, proc, host, size, steps

    def body(self, spec: dict) -> dict:
        main = names(self.host)[0]
        body = {"prompt": spec["prompt"], "negative_prompt": NEGATIVE, "width": self.size, "height": self.size, "steps": self.steps,
                "cfg_scale": 7.0, "seed": 1234, "sampler_name": "Euler", "save_images": False, "send_images": False,
                "override_settings": {"sd_model_checkpoint": main}, "override_settings_restore_afterwards": False}
        fields = {k: v for k, v in spec.items() if k != "prompt"}
        if fields:
            body["alwayson_scripts"] = {"MagicFusion": {"args": [{"enabled": True, "outside_window": "general", **fields}]}}
        return body

    def gen(self, spec: dict, peak: bool = False) -> dict:
        ok = self.proc.reset_peak() if peak else False
        c0, t0 = self.proc.cpu_seconds(), time.perf_counter()
        r = self.c.post("/sdapi/v1/txt2img", self.body(spec))
        dt, cpu = time.perf_counter() - t0, self.proc.cpu_seconds() - c0
        if r.status_code != 200:
            raise RuntimeError(f"{spec} -> {r.status_code}: {r.text[:1500]}\n{self.c.server.log_tail(30)}")
        out = {"s": dt, "cpu_s": cpu}
        if peak:
            out["peak"] = self.proc.status("VmHWM") if ok else None
        return out


def measure(run: Runner, case: dict, rounds: int) -> dict:
    """Steady state: every measured run follows a run of the same request, so one-time work
    that only a change of request causes (the WebUI re-merging a LoRA into the main model when
    the main prompt's networks change, an expert load) stays out of both sides."""
    run.gen(case["case"])  # loads what the case needs
    seq = [case["ref"], case["case"]] * rounds + [case["ref"]]
    times, cpus = [], []
    for i, spec in enumerate(seq):
        run.gen(spec)  # the same request once before: the measured one is a repeat
        g = run.gen(spec)
        times.append(g["s"])
        cpus.append(g["cpu_s"])
        print(f"[cost] {case['name']}: {'case' if i % 2 else 'ref '} {g['s']:.2f} s ({i + 1}/{len(seq)})", flush=True)
    ratios = [times[i] / ((times[i - 1] + times[i + 1]) / 2) for i in range(1, len(seq), 2)]
    cpu_ratios = [cpus[i] / ((cpus[i - 1] + cpus[i + 1]) / 2) for i in range(1, len(seq), 2)]
    ref_peak, case_peak = run.gen(case["ref"], peak=True)["peak"], run.gen(case["case"], peak=True)["peak"]
    return {"name": case["name"], "goal": case["goal"], "ratio": C.summary(ratios), "cpu_time_ratio": C.summary(cpu_ratios),
            "ref_s": C.summary(times[0::2]), "case_s": C.summary(times[1::2]), "goal_met": C.median(ratios) <= case["goal"],
            "ref_peak_rss": ref_peak, "case_peak_rss": case_peak,
            "extra_peak_rss": None if None in (ref_peak, case_peak) else case_peak - ref_peak}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="a1111", choices=("a1111", "forge"))
    ap.add_argument("--suite", default="lora,units")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--cases", default="", help="only the cases whose name contains this text; the result file keeps the others")
    args = ap.parse_args(argv)

    webui_dir, python = S.find_install(args.host)
    if args.host == "forge":
        server = S.WebUIServer(webui_dir, python, host="forge", testbed=False)
    else:
        from webui_bench import bench_fixtures
        fixtures = bench_fixtures(webui_dir, python)
        S.ensure_fixtures = lambda *a, **k: fixtures  # the runner serves the SD1.5-size checkpoints
        server = S.WebUIServer(webui_dir, python, testbed=False)
    result = {"machine": C.machine(), "host": args.host, "size": args.size, "steps": args.steps, "rounds": args.rounds,
              "sampler": "Euler", "cases": []}
    kept = []
    if args.cases:
        with open(os.path.join(C.RESULTS, f"webui_cost_{args.host}.json")) as f:
            earlier = json.load(f)
        kept = [dict(c, measured=c.get("measured", earlier["when"])) for c in earlier["cases"] if args.cases not in c["name"]]
        result["cases"] = list(kept)
    try:
        server.start()
        client = S.WebUIClient(server, timeout=3600)
        if "lora" in args.suite:
            from tests.webui.loras import write_lora
            ckpt = os.path.join(server.ckpt_dir or os.path.join(server.fixtures_dir, "checkpoints"), names(args.host)[0] + ".safetensors")
            touched = write_lora(ckpt, os.path.join(server.data_dir, "models", "Lora", LORA + ".safetensors"), rank=16, seed=5)
            client.post("/sdapi/v1/refresh-loras", {})
            result["lora"] = {"rank": 16, "layers": touched}
        run = Runner(client, C.Proc(server.proc.pid), args.host, args.size, args.steps)
        run.gen({"prompt": PROMPT})  # the main model's load
        for suite in args.suite.split(","):
            for case in cases(suite, args.host):
                if args.cases and args.cases not in case["name"]:
                    continue
                result["cases"].append(measure(run, case, args.rounds))
                C.write_result(f"webui_cost_{args.host}", result)
    finally:
        server.stop()
    print("\n| case | fused / reference (median, range) | CPU-time ratio | goal | extra peak RSS |")
    print("| --- | --- | --- | --- | --- |")
    for r in result["cases"]:
        extra = "n/a" if r["extra_peak_rss"] is None else f"{r['extra_peak_rss'] / 2**20:+.0f} MiB"
        print(f"| {r['name']} | {r['ratio']['median']:.2f} ({r['ratio']['min']:.2f}–{r['ratio']['max']:.2f}) | "
              f"{r['cpu_time_ratio']['median']:.2f} | <= {r['goal']:.2f}: {'met' if r['goal_met'] else 'MISSED'} | {extra} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
