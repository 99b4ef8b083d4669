"""Base-diff scan throughput against a raw read of the same files, and peak memory against the largest
tensor, on the demo model and a ROME-edited copy of it.

    python bench/scan_speed.py [--model demo:smollm2-135m]

Each measurement runs in a fresh process so its peak resident memory is its own. "raw read" reads both
checkpoints' weight files start to end in 16 MB chunks (the I/O floor); "scan" is `diff_checkpoints`
(header validation, tensor-by-tensor comparison, spectra of the changed tensor).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from editguard import arch as arch_table
    from editguard.checkpoint import Checkpoint
    from editguard.audit.diff import diff_checkpoints
    mode, a, b = sys.argv[1:4]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "raw":
        total = 0
        for folder in (a, b):
            ck = Checkpoint(folder)
            for f in ck.files:
                with open(ck.folder / f, "rb") as handle:
                    while chunk := handle.read(16 << 20):
                        total += len(chunk)
        result = {"bytes": total}
    else:
        ck, base = Checkpoint(a), Checkpoint(b)
        arch = arch_table.for_config(ck.config)
        diff = diff_checkpoints(ck, base, arch, arch.num_layers(ck.config))
        result = {"classification": diff.classification, "layers": diff.layers, "compared": diff.compared,
                  "bytes": ck.weight_files_size() + base.weight_files_size()}
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps(result))
""")


def child(mode: str, a: str, b: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, a, b], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo:smollm2-135m")
    args = parser.parse_args()
    import torch

    from editguard.checkpoint import Checkpoint
    from editguard.resolve import resolve

    ref = resolve(args.model)
    ck = Checkpoint(ref.path)
    largest = max(ck.info(n).nbytes for n in ck.names())
    with tempfile.TemporaryDirectory() as tmp:
        name = "model.layers.6.mlp.down_proj.weight"
        w = ck.read(name)
        gen = torch.Generator().manual_seed(0)
        edited = w + torch.outer(torch.randn(w.shape[0], generator=gen), torch.randn(w.shape[1], generator=gen)) * 0.01
        ck.write_copy(f"{tmp}/edited", {name: edited})
        child("raw", f"{tmp}/edited", str(ref.path))  # warm the page cache for both
        raw = child("raw", f"{tmp}/edited", str(ref.path))
        scan = child("scan", f"{tmp}/edited", str(ref.path))
    mb = raw["bytes"] / 1e6
    print(f"{args.model}: two checkpoints, {mb:.0f} MB; largest tensor {largest / 1e6:.1f} MB")
    print(f"{'pass':<10} {'seconds':>8} {'MB/s':>8} {'peak RSS MB':>12}")
    print(f"{'raw read':<10} {raw['seconds']:>8.2f} {mb / raw['seconds']:>8.0f} {raw['peak_rss_mb']:>12.0f}")
    print(f"{'scan':<10} {scan['seconds']:>8.2f} {mb / scan['seconds']:>8.0f} {scan['peak_rss_mb']:>12.0f}")
    print(f"scan/raw time {scan['seconds'] / raw['seconds']:.2f}x; scan peak memory {scan['peak_rss_mb'] * 1e6 / largest:.1f}x "
          f"the largest tensor; classified {scan['classification']} at layers {scan['layers']}")


if __name__ == "__main__":
    main()
