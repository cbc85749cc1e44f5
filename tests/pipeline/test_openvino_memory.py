"""OpenVINO's cache of compiled shapes is bounded: a worker's memory stops growing.

The CPU plugin keeps compiled primitives for each input shape it has run
(batch x tokens), and a worker meets hundreds: every call size, every token
width. Past the bound (`RUNTIME_CACHE_SHAPES`) old shapes are evicted, so
running as many new shapes again leaves the resident memory where it was;
unbounded (the plugin's default of 5,000 shapes) the same shapes added
about 490 MB (54 MB bounded).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.model.loading import load_embedder
from pipeline.model.openvino_backend import RUNTIME_CACHE_SHAPES
from pipeline.settings import Settings


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_new_input_shapes_past_the_bound_add_no_memory(export_dir: Path) -> None:
    embedder = load_embedder(Settings(backend="openvino-f32", device="cpu",
                                      export_dir=export_dir))
    # (texts, words): each a shape of its own, `words + 2` tokens wide.
    shapes = [(n, words) for words in range(1, 121) for n in range(1, 6)]
    assert len(shapes) // 2 > RUNTIME_CACHE_SHAPES

    def run(part: list[tuple[int, int]]) -> None:
        for n, words in part:
            embedder.embed([" ".join(["word"] * words)] * n)

    half = len(shapes) // 2
    run(shapes[:half])  # fills the cache, and the allocator's arenas
    filled = resident_mb()
    run(shapes[half:])  # as many shapes again, all new
    assert resident_mb() - filled < 100
