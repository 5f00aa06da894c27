"""Items 1-3: plain vs fused generation in the real WebUI, peak memory, expert loading.

Starts the A1111 test bed (tests/webui/server.py) with this repo linked as an extension and
with checkpoints of the full SD1.5 UNet architecture (bench/make_sd15_fixtures.py, built
once with the WebUI's Python and cached), then, on the CPU:

1. speed, in phases (--phase SIZE:STEPS:ROUNDS:CONFIGS): interleaved rounds  plain,
   fused(expert, w=1), plain, fused(expert = main, w=1), plain ...; every
   fused run is divided by the mean of the plain runs just before and after it; medians.
   outside_window = general; the expert = main case uses two prompts and one negative
   prompt (the extension batches the expert's cond rows into the main call); a config
   `stable@W` is the expert case with the stable method;
2. memory: the WebUI process's peak resident set (VmHWM, reset through /proc/PID/clear_refs
   before each measured generation) for plain, expert = main, the first fused generation
   (which loads the expert), a cached fused generation and an expert switch, against the
   expert's UNet weight bytes (GET /magicfusion/v1/status);
3. loading: the first fused generation vs the second (expert_loads must not change), and
   a switch to another expert; with --profile, py-spy samples the WebUI process during a
   cached fused generation and a cold expert load and splits the time by where it goes.

    .venv/bin/python bench/webui_bench.py --profile             # 256px/4 steps x5 rounds, 512px/2 steps x2
    .venv/bin/python bench/webui_bench.py --profile --phase 128:2:5:expert@1,main@1 --phase 128:4:3:expert@0.5,expert@0.25

    .venv/bin/python bench/webui_bench.py --phase 256:4:5:expert@1,stable@1 --out webui_cpu_stable

Writes bench/results/webui_cpu.json, or --out's name (and webui_profile_*.txt with --profile).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

sys.path.insert(0, os.path.join(C.REPO, "tests", "webui"))
import server as S

MAIN, EXPERT, EXPERT2 = "bench-sd15-a", "bench-sd15-b", "bench-sd15-c"
PROMPT, EXPERT_PROMPT, NEGATIVE = "a photo of a cat on a sofa", "a watercolor painting of a red fox", "blurry, low quality"
FIXTURE_VERSION = 1


# --------------------------------------------------------------------------- fixtures

def bench_fixtures(webui_dir: str, python: str) -> str:
    out = os.path.join(os.path.dirname(S._cache_root()), "bench-fixtures", f"v{FIXTURE_VERSION}")
    if os.path.isfile(os.path.join(out, "manifest.json")):
        return out
    print(f"[bench] building SD1.5-size fixtures in {out} (about 3-4 min, 5.5 GB) ...", flush=True)
    env = dict(os.environ, MAGICFUSION_WEBUI_DIR=webui_dir, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    subprocess.run([python, os.path.join(C.HERE, "make_sd15_fixtures.py"), "--out", out, "--webui-dir", webui_dir],
                   cwd=webui_dir, env=env, check=True)
    return out


# --------------------------------------------------------------------------- generation

class Bench:
    def __init__(self, client: S.WebUIClient, proc: C.Proc, steps: int):
        self.c, self.proc, self.steps = client, proc, steps
        self.log = []

    def payload(self, size: int, mode: str, w: float = 1.0) -> dict:
        body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": size, "height": size, "steps": self.steps,
                "cfg_scale": 7.0, "seed": 1234, "sampler_name": "Euler", "batch_size": 1, "n_iter": 1,
                "save_images": False, "send_images": False,
                "override_settings": {"sd_model_checkpoint": MAIN}, "override_settings_restore_afterwards": False}
        if mode != "plain":
            expert = {"expert": EXPERT, "stable": EXPERT, "expert2": EXPERT2, "main": MAIN}[mode]
            method = "stable" if mode == "stable" else "official"
            body["alwayson_scripts"] = {"MagicFusion": {"args": [{
                "enabled": True, "expert_checkpoint": expert, "expert_prompt": EXPERT_PROMPT, "method": method,
                "fusion_start": 0.0, "fusion_end": w, "outside_window": "general"}]}}
        return body

    def gen(self, size: int, mode: str, w: float = 1.0, peak: bool = False) -> dict:
        if peak:
            rss0 = self.proc.status("VmRSS")
            ok = self.proc.reset_peak()
        c0 = self.proc.cpu_seconds()
        t0 = time.perf_counter()
        r = self.c.post("/sdapi/v1/txt2img", self.payload(size, mode, w))
        dt = time.perf_counter() - t0
        cpu = self.proc.cpu_seconds() - c0
        if r.status_code != 200:
            raise RuntimeError(f"{mode}@{w} {size}px -> {r.status_code}: {r.text[:1500]}\n{self.c.server.log_tail(30)}")
        info = json.loads(r.json()["info"])
        params = info.get("infotexts", [""])[0]
        if (mode != "plain") != ("MagicFusion" in params):
            raise RuntimeError(f"{mode}@{w}: unexpected infotext {params!r}")
        out = {"size": size, "mode": mode, "w": w, "s": dt, "cpu_s": cpu}
        if peak:
            out.update(rss_before=rss0, peak=self.proc.status("VmHWM") if ok else None, rss_after=self.proc.status("VmRSS"))
        self.log.append(out)
        return out

    def status(self) -> dict:
        return self.c.get("/magicfusion/v1/status").json()


def interleaved(b: Bench, size: int, configs, rounds: int) -> dict:
    """plain, F1, plain, F2, ..., plain (rounds times); each F over the mean of its neighbouring plains."""
    seq = []
    for _ in range(rounds):
        for mode, w in configs:
            seq.append(("plain", 1.0))
            seq.append((mode, w))
    seq.append(("plain", 1.0))
    times, cpus = [], []
    for i, (mode, w) in enumerate(seq):
        g = b.gen(size, mode, w)
        t = g["s"]
        times.append(t)
        cpus.append(g["cpu_s"])
        print(f"[bench] {size}px {mode}@{w}: {t:.2f} s, {g['cpu_s']:.1f} CPU s ({i + 1}/{len(seq)})", flush=True)
    res = {}
    plain = [t for (m, _), t in zip(seq, times) if m == "plain"]
    for mode, w in configs:
        key = f"{mode}@{w}"
        ratios, fused, cpu_ratios = [], [], []
        for i, (m, ww) in enumerate(seq):
            if (m, ww) == (mode, w):
                fused.append(times[i])
                ratios.append(times[i] / ((times[i - 1] + times[i + 1]) / 2))
                cpu_ratios.append(cpus[i] / ((cpus[i - 1] + cpus[i + 1]) / 2))
        goal = 1.55 if mode == "main" else (2.03 if w == 1.0 else 1 + w + 0.03)
        res[key] = {"fused_s": C.summary(fused), "ratio": C.summary(ratios), "cpu_time_ratio": C.summary(cpu_ratios), "goal": goal,
                    "floor": 1.5 if mode == "main" else 1 + w, "goal_met": C.median(ratios) <= goal}
    res["plain"] = {"plain_s": C.summary(plain)}
    return res


# --------------------------------------------------------------------------- profiling

def pyspy_bin() -> str | None:
    cand = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return cand if os.path.isfile(cand) else None


def profiled(b: Bench, name: str, fn, rate: int = 25) -> dict:
    """Run fn() under `py-spy record` (raw/collapsed stacks); split the generation thread's samples."""
    exe = pyspy_bin()
    if exe is None:
        return fn(), {"error": "py-spy not found next to this Python (pip install py-spy)"}
    raw = os.path.join(C.RESULTS, f"webui_profile_{name}.txt")
    os.makedirs(C.RESULTS, exist_ok=True)
    p = subprocess.Popen([exe, "record", "--pid", str(b.proc.pid), "--rate", str(rate), "--format", "raw",
                          "--output", raw, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.5)  # attach
    t0 = time.perf_counter()
    value = fn()
    dt = time.perf_counter() - t0
    p.send_signal(signal.SIGINT)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
    out = split_profile(raw)
    out["wall_s"] = dt
    if os.path.isfile(raw):  # keep the raw stacks, compressed
        import gzip
        import shutil
        with open(raw, "rb") as src, gzip.open(raw + ".gz", "wb", compresslevel=9) as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)
        out["raw"] += ".gz"
    return value, out


CATEGORIES = [  # (category, predicate on a frame string); the first category found from the leaf up wins
    ("model management (expert.py)", lambda f: f.endswith(("lib_magicfusion/webui/a1111/expert.py", "lib_magicfusion/webui/cache.py"))),
    ("checkpoint load (A1111 sd_models)", lambda f: "sd_models.py" in f and ("load_model" in f or "reload_model_weights" in f)),
    ("UNet", lambda f: "openaimodel.py" in f),
    ("fusion math (fusion.py/snb.py)", lambda f: "lib_magicfusion/fusion.py" in f or "lib_magicfusion/snb.py" in f),
    ("adapter (sampling.py, outside the UNet)", lambda f: "lib_magicfusion/webui/a1111/sampling.py" in f),
    ("text encoder", lambda f: "sd_hijack_clip.py" in f or "get_learned_conditioning" in f or "get_multicond_learned_conditioning" in f),
    ("VAE decode", lambda f: "decode_first_stage" in f or "samples_to_images" in f),
    ("extension process/before_sampling (extension.py)", lambda f: "lib_magicfusion/webui/extension.py" in f),
]


def split_profile(raw_path: str) -> dict:
    counts = collections.Counter()
    total = 0
    top_self = collections.Counter()
    try:
        with open(raw_path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        return {"error": f"no profile: {e}"}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        if not any("process_images" in fr for fr in frames):
            continue  # only the generation thread
        n = int(n)
        total += n
        cat = "other"
        # outermost-first order: pick by priority, walking from the outermost frame, except that
        # work inside the UNet counts as UNet even when called from the adapter or expert code
        if any("openaimodel.py" in fr for fr in frames):
            cat = "UNet"
        else:
            for name, pred in CATEGORIES:
                if any(pred(fr) for fr in frames):
                    cat = name
                    break
        counts[cat] += n
        top_self[frames[-1]] += n
    return {"samples": total, "raw": os.path.relpath(raw_path, C.REPO),
            "share_pct": {k: round(100 * v / total, 2) for k, v in counts.most_common()} if total else {},
            "top_leaf_frames": [(k, round(100 * v / total, 2)) for k, v in top_self.most_common(12)] if total else []}


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", action="append", default=None, metavar="SIZE:STEPS:ROUNDS:CONFIGS",
                    help="an interleaved phase, e.g. 128:2:5:expert@1,main@1 (repeatable); the first phase's size "
                         "and steps also serve the memory and loading measurements")
    ap.add_argument("--profile", action="store_true", help="py-spy the first (cold load) and second (cached) fused generations")
    ap.add_argument("--out", default="webui_cpu", help="result name in bench/results (default: webui_cpu)")
    args = ap.parse_args(argv)

    webui_dir, python = S.find_install()
    fixtures = bench_fixtures(webui_dir, python)
    with open(os.path.join(fixtures, "manifest.json")) as f:
        manifest = json.load(f)
    S.ensure_fixtures = lambda *a, **k: fixtures  # the runner serves our checkpoints instead of the tiny ones
    phases = []
    for spec in args.phase or ["256:4:5:expert@1,expert@0.5,expert@0.25,main@1", "512:2:2:expert@1,main@1"]:
        size_, steps_, rounds_, cfgs = spec.split(":")
        phases.append({"size": int(size_), "steps": int(steps_), "rounds": int(rounds_),
                       "configs": [(c.split("@")[0], float(c.split("@")[1])) for c in cfgs.split(",")]})
    small, steps = phases[0]["size"], phases[0]["steps"]
    info = C.machine()
    print(f"[bench] {info['cpu']} x{info['cpu_count']}, load {info.get('loadavg_at_start')}", flush=True)
    srv = S.WebUIServer(webui_dir, python)
    result = {"machine": info, "steps": steps, "size": small, "phases": phases, "sampler": "Euler", "fixtures": {
        "unet": manifest["unet"], "clip": manifest["clip"], "checkpoint_bytes": [m["bytes"] for m in manifest["models"]]}}
    try:
        srv.start()
        client = S.WebUIClient(srv, timeout=1800)
        proc = C.Proc(srv.proc.pid)
        b = Bench(client, proc, steps)
        result["startup_s"] = srv.startup_s
        t = b.gen(small, "plain")  # waits for the main model's load
        print(f"[bench] first plain {small}px: {t['s']:.1f} s; RSS {proc.status('VmRSS') / 2**30:.2f} GiB", flush=True)
        b.gen(small, "plain")

        # ---- memory + loading, in an order where each step's state is known
        mem = {}
        mem["plain"] = b.gen(small, "plain", peak=True)
        mem["main_as_expert"] = b.gen(small, "main", 1.0, peak=True)
        st_main = b.status()
        mem["main_as_expert"]["status"] = st_main
        prof = {}
        if args.profile:  # py-spy --nonblocking at 25 Hz: it never pauses the WebUI
            first, prof["first_fused_cold_load"] = profiled(b, "first_fused", lambda: b.gen(small, "expert", 1.0, peak=True))
        else:
            first = b.gen(small, "expert", 1.0, peak=True)
        st1 = b.status()
        if args.profile:
            second, prof["second_fused_cached"] = profiled(b, "second_fused", lambda: b.gen(small, "expert", 1.0, peak=True))
        else:
            second = b.gen(small, "expert", 1.0, peak=True)
        st2 = b.status()
        for k, v in prof.items():
            print(f"[bench] profile {k}: {json.dumps(v.get('share_pct', v))}", flush=True)
        result["profile"] = prof
        mem["first_fused_loads_expert"], mem["cached_fused"] = first, second
        print(f"[bench] fused {small}px: first {first['s']:.2f} s (loads {st1['expert_loads']}), second {second['s']:.2f} s "
              f"(loads {st2['expert_loads']}); expert_bytes {st1['expert_bytes'] / 2**30:.3f} GiB", flush=True)

        # ---- speed, interleaved, phase by phase
        speed = {}
        for ph in phases:
            b.steps = ph["steps"]
            if ph["size"] != small or ph["steps"] != steps:
                b.gen(ph["size"], "plain")  # warm-up at this size
            key = f"{ph['size']}px/{ph['steps']}steps"
            speed.setdefault(key, {"size": ph["size"], "steps": ph["steps"]}).update(
                interleaved(b, ph["size"], ph["configs"], ph["rounds"]))
            C.write_result(args.out, {**result, "speed": speed, "runs": b.log})
        b.steps = steps
        ref = next(v for v in speed.values() if "expert@1.0" in v and v["size"] == small and v["steps"] == steps)

        # ---- expert switch
        switch = b.gen(small, "expert2", 1.0, peak=True)
        st3 = b.status()
        after_switch = b.gen(small, "expert2", 1.0)
        mem["switch_expert"] = switch
        unl = client.post("/magicfusion/v1/unload", {}).json()
        time.sleep(1)
        mem["after_unload_rss"] = proc.status("VmRSS")
        expert_bytes = st1["expert_bytes"]
        plain_peak = mem["plain"]["peak"]
        loading = {
            "first_fused_s": first["s"], "second_fused_s": second["s"],
            "steady_fused_s_median": ref["expert@1.0"]["fused_s"]["median"],
            "loads_after_first": st1["expert_loads"], "loads_after_second": st2["expert_loads"],
            "second_loaded_nothing": st2["expert_loads"] == st1["expert_loads"],
            "first_minus_second_s": first["s"] - second["s"],
            "switch_s": switch["s"], "after_switch_s": after_switch["s"],
            "switch_minus_cached_s": switch["s"] - after_switch["s"], "loads_after_switch": st3["expert_loads"],
            "second_minus_steady_s": second["s"] - ref["expert@1.0"]["fused_s"]["median"],
        }
        memory = {
            "expert_unet_bytes_status": expert_bytes, "main_as_expert_status": st_main,
            "plain_peak": plain_peak, "main_as_expert_peak": mem["main_as_expert"]["peak"],
            "main_as_expert_extra": mem["main_as_expert"]["peak"] - plain_peak,
            "first_fused_peak": first["peak"], "first_fused_extra": first["peak"] - plain_peak,
            "first_fused_extra_over_expert_unet": (first["peak"] - plain_peak) / expert_bytes,
            "cached_fused_peak": second["peak"], "cached_fused_extra": second["peak"] - plain_peak,
            "cached_fused_extra_over_expert_unet": (second["peak"] - plain_peak) / expert_bytes,
            "rss_with_expert": second["rss_after"], "rss_plain": mem["plain"]["rss_after"],
            "resident_extra_over_expert_unet": (second["rss_after"] - mem["plain"]["rss_after"]) / expert_bytes,
            "switch_peak": switch["peak"], "switch_extra_over_expert_unet": (switch["peak"] - plain_peak) / expert_bytes,
            "after_unload_rss": mem["after_unload_rss"], "unload_response": unl,
            "goal_extra_peak_le_1_1x": (second["peak"] - plain_peak) <= 1.1 * expert_bytes,
            "goal_extra_peak_incl_load_le_1_1x": (first["peak"] - plain_peak) <= 1.1 * expert_bytes,
            "goal_main_as_expert_adds_no_weights": st_main["expert_bytes"] == 0 and st_main["expert_loads"] == 0,
        }
        result.update(speed=speed, memory=memory, loading=loading, runs=b.log)
        C.write_result(args.out, result)
    finally:
        srv.stop()

    report(result)
    return 0


def report(result: dict) -> None:
    g = 2**30
    print("\n| size (steps) | config | plain s (median) | fused s (median) | fused/plain wall (median of pairs) "
          "| CPU-time ratio | floor | goal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for sp in result["speed"].values():
        size = sp["size"]
        for key, r in sp.items():
            if key in ("plain", "steps", "size"):
                continue
            cpu = f"{r['cpu_time_ratio']['median']:.3f}" if "cpu_time_ratio" in r else "n/a"
            print(f"| {size} ({sp['steps']}) | {key} | {sp['plain']['plain_s']['median']:.2f} | {r['fused_s']['median']:.2f} | "
                  f"{r['ratio']['median']:.3f} (n={r['ratio']['n']}, {r['ratio']['min']:.3f}-{r['ratio']['max']:.3f}) | {cpu} | "
                  f"{r['floor']:.2f} | <= {r['goal']:.2f}: {'met' if r['goal_met'] else 'MISSED'} |")
    m, load = result["memory"], result["loading"]
    print(f"\nexpert UNet weights (status expert_bytes): {m['expert_unet_bytes_status'] / g:.3f} GiB")
    print(f"peak RSS: plain {m['plain_peak'] / g:.2f} GiB; expert=main {m['main_as_expert_peak'] / g:.2f} GiB "
          f"(+{m['main_as_expert_extra'] / 2**20:.0f} MiB, status {m['main_as_expert_status']}); "
          f"first fused (loads) {m['first_fused_peak'] / g:.2f} GiB = +{m['first_fused_extra_over_expert_unet']:.2f}x; "
          f"cached fused {m['cached_fused_peak'] / g:.2f} GiB = +{m['cached_fused_extra_over_expert_unet']:.2f}x; "
          f"switch {m['switch_peak'] / g:.2f} GiB = +{m['switch_extra_over_expert_unet']:.2f}x; "
          f"after unload RSS {m['after_unload_rss'] / g:.2f} GiB")
    print(f"loading: first fused {load['first_fused_s']:.2f} s, second {load['second_fused_s']:.2f} s, "
          f"steady (median of the interleaved runs) {load['steady_fused_s_median']:.2f} s "
          f"(loads {load['loads_after_first']} -> {load['loads_after_second']}); switch {load['switch_s']:.2f} s vs "
          f"{load['after_switch_s']:.2f} s cached (loads -> {load['loads_after_switch']})")


if __name__ == "__main__":
    sys.exit(main())
