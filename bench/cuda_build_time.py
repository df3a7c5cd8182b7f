"""How long the cuda variant's build takes, without building it all: configure ggml-cuda as
`lalo engine build --variant cuda` does, compile a sample of its CUDA objects one at a time
(wall and CPU seconds), and extrapolate per kind of object (docs/gpu.md has the figures).

    PYTHONPATH=. python bench/cuda_build_time.py --build-dir /tmp/cuda-sample [--cuda-arch 90]

Needs nvcc and the pinned llama.cpp source in lalo's cache (`lalo engine build` fetched it);
cuBLAS comes from the toolkit or NVIDIA's wheel as in the real build.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import resource
import shutil
import subprocess
import time
from pathlib import Path

from launcher import paths
from launcher.engines import source as sources
from launcher.engines.cmake import cmake_flags, configure_argv
from launcher.engines.cuda_deps import cuda_dependency_flags
from launcher.engines.toolchain import check_cuda_libraries, find_nvcc, nvcc_version

KINDS = ("fattn-mma-f16", "fattn-tile", "fattn-vec", "mmf", "mmq")
REGULAR_SAMPLE = ("norm.o", "rope.o", "softmax.o", "cpy.o", "getrows.o", "mmvq.o", "convert.o",
                  "binbcast.o", "fattn.o", "ggml-cuda.o", "mmq.o")


def kind(obj: str) -> str:
    match = re.match(r"template-instances/(" + "|".join(KINDS) + r")-instance", obj)
    return match.group(1) if match else "regular"


def compile_one(cuda_dir: Path, obj: str) -> dict[str, object]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    code = subprocess.run(["make", obj], cwd=cuda_dir, capture_output=True, check=False).returncode
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {"object": obj, "rc": code, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", type=Path, required=True)
    parser.add_argument("--cuda-arch", action="append", default=None)
    parser.add_argument("--sample", type=int, default=0,
                        help="compile only the first N of the sample (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows and totals as JSON")
    args = parser.parse_args()
    nvcc = find_nvcc()
    tree = sources.pinned_source(cache=paths.cache_dir() / "sources", progress=print)
    flags = (*cmake_flags("cuda", args.cuda_arch),
             *cuda_dependency_flags(nvcc, check=check_cuda_libraries, cache_root=paths.cache_dir(),
                                    version=nvcc_version, note=print))
    cmake = shutil.which("cmake") or "cmake"
    args.build_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    subprocess.run(configure_argv(cmake, tree.tree.resolve(), args.build_dir, flags, nvcc),
                   cwd=args.build_dir, check=True, capture_output=True)
    print(f"configure + generate: {time.monotonic() - started:.1f} s")
    cuda_dir = args.build_dir / "ggml" / "src" / "ggml-cuda"
    listing = subprocess.run(["make", "help"], cwd=cuda_dir, capture_output=True, text=True,
                             check=True).stdout
    objects = [line.removeprefix("... ").strip() for line in listing.splitlines()
               if line.strip().endswith(".o")]
    counts = collections.Counter(kind(obj) for obj in objects)
    sample = [o for o in REGULAR_SAMPLE if o in objects]
    sample += [next(o for o in objects if kind(o) == k) for k in KINDS if counts[k]]
    sample = sample[:args.sample] if args.sample else sample
    rows = []
    for obj in sample:
        rows.append(compile_one(cuda_dir, obj))
        print(json.dumps(rows[-1]), flush=True)
    cpu: dict[str, list[float]] = collections.defaultdict(list)
    for row in rows:
        cpu[kind(str(row["object"]))].append(float(row["cpu_s"]))  # type: ignore[arg-type]
    total = 0.0
    for name, count in sorted(counts.items()):
        if not cpu[name]:
            print(f"{name:14} {count:3} objects, not sampled")
            continue
        mean = sum(cpu[name]) / len(cpu[name])
        total += count * mean
        print(f"{name:14} {count:3} objects, mean {mean:6.1f} CPU s -> {count * mean:7.0f} CPU s")
    print(f"ggml-cuda: {len(objects)} objects, {total / 3600:.2f} CPU hours; "
          f"{total / 2 / 60:.0f} min on 2 idle cores, {total / 16 / 60:.0f} min on 16")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "counts": counts, "cpu_s": round(total)},
                                       indent=2))


if __name__ == "__main__":
    main()
