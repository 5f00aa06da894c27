"""Loaded experts, least recently used first, for either host: the host gives the loader."""

from __future__ import annotations

import gc
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

LOCK = threading.RLock()  # guards the cache; generations run one at a time under the WebUI's queue lock


class ExpertCache:
    """Experts by key (a checkpoint file, or a file and a network set), least recently used first.

    `trim` bounds how many stay resident between generations, `arm_idle_timer` frees them all
    after a while without fusion, and `drop_if` frees those a new main model cannot use."""

    def __init__(self, free: Callable[[], None] = gc.collect):
        self.experts: OrderedDict[Hashable, Any] = OrderedDict()
        self.loads = 0
        self.last_used = time.monotonic()
        self._free = free
        self._timer: threading.Timer | None = None

    def get(self, key: Hashable, load: Callable[[], Any]):
        with LOCK:
            self.touch()
            expert = self.experts.get(key)
            if expert is None:
                expert = load()
                self.experts[key] = expert
                self.loads += 1
            self.experts.move_to_end(key)
            return expert

    def touch(self) -> None:
        self.last_used = time.monotonic()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def unload(self, key: Hashable | None = None) -> bool:
        """Free one expert (by key) or all; whether any was loaded. Generations drop their own
        references when they end, so the memory returns here."""
        with LOCK:
            keys = [key] if key is not None else list(self.experts)
            freed = [self.experts.pop(k) for k in keys if k in self.experts]
            if not freed:
                return False
            for expert in freed:
                release = getattr(expert, "release", None)
                if release is not None:
                    release()
            del freed, expert
            self._free()
            return True

    def drop_if(self, condition: Callable[[Any], bool]) -> None:
        with LOCK:
            for key, expert in list(self.experts.items()):
                if condition(expert):
                    self.unload(key)

    def loaded(self) -> list:
        with LOCK:
            return list(self.experts.values())

    def trim(self, keep: int) -> None:
        """Keep at most `keep` experts resident (0 = none), the most recently used ones."""
        with LOCK:
            while len(self.experts) > max(0, keep):
                self.unload(next(iter(self.experts)))

    def arm_idle_timer(self, idle_minutes: float, lock: Callable[[], Any]) -> None:
        """Free every expert after `idle_minutes` without fusion (0 = never). The timer takes
        `lock()` (the WebUI's queue lock), so it never frees an expert under a generation."""
        with LOCK:
            self.touch()
            if idle_minutes <= 0 or not self.experts:
                return
            stamp = self.last_used

            def fire():
                with lock():
                    if self.last_used == stamp:
                        self.unload()

            self._timer = threading.Timer(idle_minutes * 60, fire)
            self._timer.daemon = True
            self._timer.start()
