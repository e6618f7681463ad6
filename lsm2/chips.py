"""Peak compute and memory per accelerator chip, keyed by `jax.Device.device_kind`.

Read by `lsm2.aot` (the roofline estimate and the HBM limit of a slice it compiles
for) and by training (`lsm2.train.throughput`: the MFU of the running job). It
lives on its own so that training need not import `lsm2.aot`, which imports it.
"""
import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """Per-chip figures: the vendor's published peaks, and the HBM that the compiler
  lets one program use where measured."""
  name: str
  peak_bf16_flops: float  # FLOP/s, dense (no structured sparsity).
  hbm_bytes: int  # Nominal.
  hbm_bytes_per_s: float
  usable_hbm_bytes: int | None  # The compiler's limit ("available HBM"); None: not measured.

  @property
  def capacity_bytes(self) -> int:
    return self.usable_hbm_bytes or self.hbm_bytes


# TPU sources (Cloud TPU documentation, "System architecture" of each version):
#   v4   https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s
#   v5e  https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, 16 GB HBM2, 819 GB/s
#   v5p  https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, 95 GB HBM2e, 2765 GB/s
#   v6e  https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, 32 GB HBM, 1640 GB/s
# The pages write "GB" for v5e, v5p and v6e where the chips hold GiB (JAX's own Pallas
# table, jax/_src/pallas/mosaic/tpu_info.py, lists 17.2e9, 103e9 and 34.4e9 bytes).
# Usable HBM is what libtpu 0.0.42's compiler reports as "available HBM" when a program
# does not fit (15.75G, 95.74G, 31.25G: measured on this repository's topologies); it,
# not the nominal size, decides whether a step fits.
# GPU rows: dense bf16 tensor-core peaks (NVIDIA publishes them "with sparsity", twice
# these) under the device_kind names CUDA reports; HBM not measured.
CHIPS = {
    "TPU v4": ChipSpec("v4", 275e12, 32 * GiB, 1200e9, None),
    "TPU v5 lite": ChipSpec("v5e", 197e12, 16 * GiB, 819e9, int(15.75 * GiB)),
    "TPU v5": ChipSpec("v5p", 459e12, 95 * GiB, 2765e9, int(95.74 * GiB)),
    "TPU v6 lite": ChipSpec("v6e", 918e12, 32 * GiB, 1640e9, int(31.25 * GiB)),
    # https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM: 1,979 TFLOP/s bf16 sparse)
    "NVIDIA H100 80GB HBM3": ChipSpec("h100-sxm", 989e12, 80 * 10**9, 3.35e12, None),
    # Same page, H100 PCIe: 1,513 TFLOP/s bf16 sparse, 2 TB/s.
    "NVIDIA H100 PCIe": ChipSpec("h100-pcie", 756e12, 80 * 10**9, 2.0e12, None),
    # https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM: 1,979 TFLOP/s bf16 sparse,
    # 141 GB HBM3e, 4.8 TB/s)
    "NVIDIA H200": ChipSpec("h200", 989e12, 141 * 10**9, 4.8e12, None),
    # https://www.nvidia.com/en-us/data-center/a100/ (312 TFLOP/s bf16 dense; 80 GB SXM
    # 2,039 GB/s, 40 GB 1,555 GB/s, 80 GB PCIe 1,935 GB/s)
    "NVIDIA A100-SXM4-80GB": ChipSpec("a100-80gb", 312e12, 80 * 10**9, 2039e9, None),
    "NVIDIA A100-SXM4-40GB": ChipSpec("a100-40gb", 312e12, 40 * 10**9, 1555e9, None),
    "NVIDIA A100 80GB PCIe": ChipSpec("a100-80gb-pcie", 312e12, 80 * 10**9, 1935e9, None),
    "NVIDIA A100-PCIE-40GB": ChipSpec("a100-40gb-pcie", 312e12, 40 * 10**9, 1555e9, None),
}
