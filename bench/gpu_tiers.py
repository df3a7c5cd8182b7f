"""The GPU plan of each tier of the original plan (docs/gpu.md): pure arithmetic, no GPU needed.

    PYTHONPATH=. python bench/gpu_tiers.py [--ctx 8192] [--ram 64GiB]

Models: the catalog's at their default context, and 7B / 14B / 70B shapes (Qwen2.5-7B,
Qwen2.5-14B, Llama-3.3-70B) at Q4_K_M, weights = parameters x 4.85 bits (llama.cpp's Q4_K_M
average; the real files are within 3 %).
"""

from __future__ import annotations

import argparse

from launcher.models.catalog import default_catalog
from launcher.models.shape import QUANT_BITS, ModelFacts, approximate_matmul_bytes
from launcher.placement.gpu_plan import Gpu, GpuModel, plan_gpus
from launcher.units import format_size, parse_size

GIB = 1024**3
# (name, parameters, layers, n_embd, n_ff, heads, kv heads, head dim, vocab)
LARGE = (
    ("7b-q4_k_m (Qwen2.5-7B)", 7_615_616_512, 28, 3584, 18944, 28, 4, 128, 152064),
    ("14b-q4_k_m (Qwen2.5-14B)", 14_770_033_664, 48, 5120, 13824, 40, 8, 128, 152064),
    ("70b-q4_k_m (Llama-3.3-70B)", 70_553_706_496, 80, 8192, 28672, 64, 8, 128, 128256),
)
TIERS = (
    ("RTX 4060 Ti 16 GB", [16 * GIB]),
    ("RTX 4090 24 GB", [24 * GIB]),
    ("2x A100 80 GB", [80 * GIB] * 2),
    ("4x A100 80 GB", [80 * GIB] * 4),
)


def large_facts(row: tuple[str, int, int, int, int, int, int, int, int]) -> ModelFacts:
    _, params, layers, embd, ff, heads, kv, head_dim, vocab = row
    weights = int(params * QUANT_BITS["Q4_K_M"] / 8)
    return ModelFacts(architecture="llama", parameters=params, weight_bytes=weights, n_layer=layers,
                      n_embd=embd, n_ff=ff, n_head=heads, n_vocab=vocab, kv_heads=(kv,) * layers,
                      key_length=head_dim, value_length=head_dim, n_ctx_train=131072,
                      file_type="Q4_K_M", matmul_bytes_by_type=approximate_matmul_bytes("Q4_K_M", weights))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ctx", type=int, default=8192, help="context of the large models")
    parser.add_argument("--ram", default="64GiB", help="RAM budget of the box")
    args = parser.parse_args()
    ram = parse_size(args.ram)
    catalog = [GpuModel(e.id, e.facts(), e.default_ctx) for e in default_catalog()]
    for tier, sizes in TIERS:
        gpus = [Gpu(tier, size) for size in sizes]
        print(f"\n### {tier} ({len(sizes)} x {format_size(sizes[0])}), RAM budget {format_size(ram)}\n")
        print("| model | ctx | -ngl | VRAM | RAM | placement |")
        print("|---|---|---|---|---|---|")
        # each large model alone on the box; then the whole catalog together
        for row in LARGE:
            plan = plan_gpus([GpuModel(row[0], large_facts(row), args.ctx)], gpus, ram)
            _print(plan.placements[0], args.ctx)
        plan = plan_gpus(catalog, gpus, ram)
        for placement, model in zip(plan.placements, catalog, strict=True):
            _print(placement, model.ctx_size, note=" (catalog, all together)")
        left = ", ".join(format_size(max(0, v)) for v in plan.vram_left())
        print(f"\nVRAM left with the whole catalog loaded: {left}")


def _print(placement: object, ctx: int, note: str = "") -> None:
    from launcher.placement.gpu_plan import Placement

    assert isinstance(placement, Placement)
    split = placement.split
    print(f"| {placement.name}{note} | {ctx} | {placement.gpu_layers} | {format_size(split.vram)} | "
          f"{format_size(split.ram.total)} | {placement.reason} |")


if __name__ == "__main__":
    main()
