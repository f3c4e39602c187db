"""Free memory on a device and on the host: what the merge plan and the evaluation batch size
are sized from (below both, so evaluation does not reach up into demix.merge for it)."""

from __future__ import annotations


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_memory(device) -> tuple[int | None, int | None]:
    """(free bytes on the device, available host bytes); on a CPU device both are the host's."""
    import torch

    host = host_available_bytes()
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]), host
    return host, host
