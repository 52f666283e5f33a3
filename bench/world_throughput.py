"""Benchmark: how fast the embedded world generates and exports. Writes outputs/bench/world.json."""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from prism.atomic_io import atomic_write_text
from prism.data.export import export_world
from prism.data.world import WorldConfig, iter_split
from prism.runtime import host_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=3000, help="samples per split timed for generation")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/world.json"))
    args = parser.parse_args()

    cfg = WorldConfig()
    result: dict = {"config": "embedded default", "host": host_info()}
    for split in ("sft", "bench"):
        started = time.perf_counter()
        n = 0
        for sample in iter_split(cfg, split, stop=args.samples):
            sample.image_png()  # encoding is part of every export
            n += 1
        seconds = time.perf_counter() - started
        result[f"generate_{split}"] = {"samples": n, "seconds": round(seconds, 3), "samples_per_s": round(n / seconds, 1)}

    # A whole export of a scaled-down world: every format, the tokenizer and the manifest.
    small = WorldConfig(base_size=2000, sft_size=2000, teacher_size=500, rl_size=1000, bench_size=100)
    folder = Path(tempfile.mkdtemp(prefix="prism-bench-world-"))
    try:
        started = time.perf_counter()
        manifest = export_world(small, folder / "world")
        seconds = time.perf_counter() - started
        total = sum(manifest["counts"].values())
        size = sum(p.stat().st_size for p in (folder / "world").rglob("*") if p.is_file())
        result["export_small_world"] = {
            "samples": total, "seconds": round(seconds, 2), "samples_per_s": round(total / seconds, 1),
            "megabytes": round(size / 2**20, 1),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
