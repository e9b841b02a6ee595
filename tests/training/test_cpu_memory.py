"""retain_freed_memory: a freed large tensor's pages are reused, not faulted in again."""
import subprocess
import sys

PROBE = """
import resource, sys, torch
if sys.argv[1] == "retain":
    from vlmo_large.cpu_memory import retain_freed_memory
    assert retain_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16 << 20).sum()  # first touch of the heap
start = faults()
for _ in range(10):
    torch.ones(16 << 20).sum()  # 64 MB allocated and freed, like an activation each step
print(faults() - start)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    default, retained = _faults("default"), _faults("retain")
    assert default > 10 * 16000 // 2  # glibc's default: every 64 MB block faulted in again (4 KB pages)
    assert retained < default / 20
