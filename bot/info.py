"""`bot info`: what is loaded, from where, how fast, and what it costs in memory."""

from __future__ import annotations

import resource


def rss_mb() -> float:
    """Resident memory of this process in MB (Linux /proc; falls back to peak RSS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def backbone_info(args) -> str:
    from .backbone import Backbone
    from .registry import load_all

    before = rss_mb()
    bb = Backbone.load(args.backbone)
    after_backbone = rss_mb()
    tasks, failures = load_all(bb, args.adapters_dir)
    lines = [
        f"backbone     {bb.info.name}",
        f"loaded from  {bb.info.source}",
        f"load time    {bb.info.seconds:.2f} s" + ("  (first run: converted GGUF into the cache)" if bb.info.converted else ""),
        f"parameters   {bb.num_parameters / 1e6:.1f} M",
        f"fingerprint  {bb.fingerprint}",
        f"compute      {str(bb.compute_dtype).replace('torch.', '')} (autocast; weights float32)",
        f"memory       {rss_mb():.0f} MB resident (backbone added {after_backbone - before:.0f} MB)",
        f"adapters     {len(tasks)} loaded from {args.adapters_dir}",
    ]
    for name, task in tasks.items():
        lines.append(f"  - {name:12s} {task.kind:9s} {bb.adapter_nbytes(name) / 1e6:6.2f} MB  {task.spec.description}")
    for name, err in failures.items():
        lines.append(f"  ! {name:12s} not loaded: {err}")
    return "\n".join(lines)
