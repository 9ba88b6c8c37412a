"""Line statistics and inspection health: what the line did, and whether the inspection can be trusted.

- `store`: per camera/class/minute presence histograms and counts of every frame (SQLite WAL).
- `shifts`, `report`: statistics per shift and hour with p-chart control limits (`iseg stats`).
- `whatif`: what a different threshold would have done, from the histograms and the verdicts.
- `overrides`: live threshold changes in the state dir, audited and revertable (`iseg thresholds`).
- `health`, `selftest`: camera health (frozen, defocus, exposure, presence drift) and the golden-sample
  self-test through the real worker path, published on `health.<camera>`.
- `tap`: the publisher's hook that feeds all of the above off its hot path.
- `api`: JSON-able handlers the console mounts under /api/.
"""
