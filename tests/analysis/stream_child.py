"""Child process of tests/analysis/test_streaming.py: analyse the Tower checkpoint under a data-segment limit.

argv: mode ("stream" | "memory"), checkpoint, inputs, out.json, budget MiB (0 = no limit). Prints one
JSON line: {"status": "ok" | "oom", "maxrss_mib", "vmdata_base_mib", "vmsize_base_mib", "seconds"}.

The budget is counted from a warmed-up process: a 2-block Tower is analysed first, so one-time
costs (lazy imports, codebook search tables: ~68 MiB of VmData measured) are in the baseline and
the budget measures what grows with the model. Run with MALLOC_MMAP_THRESHOLD_ set (the test does):
glibc otherwise raises its mmap threshold after large frees and serves later blocks from the brk
heap, whose extent RLIMIT_DATA keeps counting after malloc_trim has returned the pages (VmData grew
3.5 MiB per block while RSS stayed flat); with a fixed threshold VmData follows live allocations.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from fp8probe.analysis.loading import LoadError
from fp8probe.analysis.pipeline import analyze
from fp8probe.analysis.streaming import load_streamed
from fp8probe.analysis.weights_only import open_checkpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stream_factory import Tower, build  # noqa: E402

FACTORY = f"{HERE / 'stream_factory.py'}:build"


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    mode, ckpt, inputs, out, budget_mib = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
    torch.set_num_threads(1)  # no extra threads: each would add a malloc arena to the data segment
    batches = torch.load(inputs, weights_only=True)
    analyze(Tower(32, 2), [torch.randn(1, 4, 32)], "global,int8", grad=False)  # warm-up (docstring)
    base, vmsize = _status_mib("VmData"), _status_mib("VmSize")
    if budget_mib:
        # RLIMIT_DATA (private writable memory: heap, anonymous maps, written file maps) over what the
        # imports already hold. RLIMIT_AS would count torch's address-space reservations (VmSize, GiBs
        # of mapped libraries and PROT_NONE regions), not what the analysis allocates.
        limit = int((base + budget_mib) * 2**20)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    start = time.perf_counter()
    try:
        if mode == "stream":
            results = analyze(load_streamed(ckpt, factory=FACTORY), batches, "global")
        else:
            model = build()
            c = open_checkpoint(ckpt)
            state = {}
            for e in c.entries:
                with c.tensor(e) as t:
                    state[e.key] = t.clone()
            model.load_state_dict(state)
            del state
            results = analyze(model, batches, "global", grad=False)
    except (MemoryError, RuntimeError, LoadError) as exc:  # LoadError: "the model failed on the inputs: MemoryError"
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        status = "oom"
    else:
        status = "ok"
        Path(out).write_text(json.dumps(results.to_json()["tables"]))
    print(json.dumps({"status": status, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "vmdata_base_mib": base, "vmsize_base_mib": vmsize,
                      "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
