"""Shared helpers for the benchmarks: machine description, statistics, results, the SD1.5 UNet."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# diffusers' UNet2DConditionModel with Stable Diffusion 1.5's config (859.52 M parameters).
SD15_UNET_CONFIG = dict(  # noqa: C408
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)


class Proc:
    """A process's memory and CPU time from /proc (Linux); pid "self" is this process."""

    def __init__(self, pid: int | str = "self"):
        self.pid = pid

    def status(self, key: str) -> int:
        """A /proc/PID/status size field (VmRSS, VmHWM...) in bytes; 0 if absent."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all threads): less sensitive than wall time
        to other jobs on a shared machine."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(torch=None) -> dict:
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def summary(xs) -> dict:
    xs = list(xs)
    return {"median": median(xs), "min": min(xs) if xs else None, "max": max(xs) if xs else None, "n": len(xs),
            "values": [round(x, 6) for x in xs]}


def write_result(name: str, data: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    data = {"benchmark": name, "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **data}
    path = os.path.join(RESULTS, name + ".json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def make_sd15_unet(torch, seed: int, device="cpu", dtype=None, calibrate=True):
    """A random-weight SD1.5 UNet (diffusers), output scaled to unit std like a trained eps model."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    unet = unet.eval().requires_grad_(False)
    if calibrate:
        with torch.no_grad():
            g = torch.Generator(device=device).manual_seed(seed)
            x = torch.randn((1, 4, 16, 16), generator=g, device=device)
            ctx = torch.randn((1, 77, 768), generator=g, device=device)
            out = unet(x, torch.tensor([500], device=device), encoder_hidden_states=ctx).sample
            factor = 1.0 / float(out.std())
            unet.conv_out.weight.mul_(factor)
            unet.conv_out.bias.mul_(factor)
    if dtype is not None:
        unet = unet.to(dtype)
    return unet


def weight_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class Timer:
    def __init__(self, sync=None):
        self.sync = sync

    def __enter__(self):
        if self.sync:
            self.sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.sync:
            self.sync()
        self.s = time.perf_counter() - self.t0
