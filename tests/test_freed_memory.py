"""llmcli.device.reuse_freed_memory: with it, a decoding loop that makes and frees the same large
tensors each step (beam search's logits: 128 rows x 32,000 = 16 MB) all but stops faulting memory
in from the kernel after its first run; without it glibc hands such blocks back and faults them
in again, 0 to 24,000 page faults a run of the loop below. Run in a fresh process: the setting
is process-wide."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

LOOP = """
import resource, torch
from llmcli import decoding, fast
from llmcli.config import preset
from llmcli.device import reuse_freed_memory
from llmcli.model import Transformer

torch.set_num_threads(1)
print(reuse_freed_memory())
torch.manual_seed(0)
model = fast.prepare(Transformer(preset("tiny", vocab_size=32000)).eval())
src = torch.randint(5, 32000, (32, 20))
mask = torch.ones(32, 20, dtype=torch.bool)
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.inference_mode():
        cache = model.new_cache(32, model.encode(src, mask), mask)
        start = torch.full((32, 1), model.cfg.start_id)
        decoding.beam_search(model.step, cache, start, beam_size=4, eos_id=model.cfg.eos_id, max_new_tokens=12, min_new_tokens=12)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_decoding_loop_stops_faulting_after_its_first_run():
    out = subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, timeout=120, check=True).stdout.split("\n")
    assert out[0] == "True"
    first, *later = map(int, out[1].split())
    assert first > 1000  # the first run takes its memory from the kernel, as any would
    # Runs 2-8 together, measured with it: 3-5,400 faults (a run or two after the first may still
    # grow the heap to its high-water mark); without: 14,000-92,000 (Xeon), 37,000-88,000 (EPYC).
    assert sum(later) < 10000, f"page faults after the first run: {later}"


def test_elsewhere_it_says_it_did_nothing(monkeypatch):
    from llmcli import device

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert device.reuse_freed_memory() is False
