"""The WebUI Forge host adapter (the Forge2 backend, `backend/`, as Forge 2.0.1 at dfdcbab6 has it).

Forge composes guidance in `backend/sampling/sampling_function.py`; MagicFusion hooks there with
a post-CFG function, a conditioning modifier and a model-function wrapper on a clone of the main
UnetPatcher (sampling.py). Experts are Forge diffusion engines built by Forge's own loader
(expert.py). Everything here imports Forge's `backend`, so the entry points are imported lazily."""


def __getattr__(name):
    if name in ("Generation", "cache", "install", "on_main_changed", "memory_bytes"):
        from . import expert, generation, sampling
        return {"Generation": generation.ForgeGeneration, "cache": expert.cache, "install": sampling.install,
                "on_main_changed": expert.on_main_changed, "memory_bytes": expert.memory_bytes}[name]
    raise AttributeError(name)
