"""The AUTOMATIC1111 WebUI 1.10 host adapter.

`rows` is pure tensor code (the unit tests import it without a WebUI); everything else here
imports the WebUI's modules, so the adapter's entry points are imported lazily."""


def __getattr__(name):
    if name in ("Generation", "cache", "install", "on_main_changed", "memory_bytes"):
        from . import expert, generation, sampling
        return {"Generation": generation.A1111Generation, "cache": expert.cache, "install": sampling.install,
                "on_main_changed": expert.on_main_changed, "memory_bytes": expert.expert_memory_bytes}[name]
    raise AttributeError(name)
