#!/usr/bin/env bash
# One call on a lent GPU machine (torch there, no venv, no network): the CUDA tests, then the GPU
# server-step benchmark, profile_gpu.py and its sweep, and bench_decode.py. Run from the repository root;
# results under $OUT (default /tmp/gpu_session; 8 files, the most a device call brings back).
#   bash benchmarks/gpu_session.sh            # ~6 min on an H100 (tests ~25 s, benchmark ~150 s, profile ~35 s, sweep ~75 s, decode ~60 s)
#   bash benchmarks/gpu_session.sh confirm    # the tests and the benchmark only (~3 min): after a default changed on the sweep's word
set -uo pipefail
PART=${1:-all}
case "$PART" in all|confirm) ;; *) echo "usage: $0 [all|confirm]" >&2; exit 2 ;; esac
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
# every test marked gpu, and the core tests whose stacked path runs on CUDA when it is there
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/core/test_topk.py tests/core/test_server_speed.py \
  tests/core/test_aggregation.py tests/core/test_trust_boundary.py tests/core/test_baselines.py \
  tests/core/test_federation.py tests/test_evaluate.py tests/test_npy.py tests/federatedscope/test_wire.py 2>&1 | tail -5 | tee "$OUT/tests.log"
timeout 300 python3 benchmarks/bench_aggregation.py --device cuda --threads 16 --json "$OUT/gpu.json" \
  > "$OUT/bench.md" 2> "$OUT/bench.err"
tail -14 "$OUT/bench.md"
[ "$PART" = confirm ] && exit 0
# the hosts' call from pinned factors in one process: its timeline and a kernel profile
timeout 240 python3 benchmarks/profile_gpu.py --out "$OUT/profile" > /tmp/profile.log 2>&1
[ -f "$OUT/profile/profile.md" ] || { mkdir -p "$OUT/profile"; tail -40 /tmp/profile.log > "$OUT/profile/profile.md"; }
grep -v '^| `' /tmp/profile.log | tail -40
# scheduling choices on the same pinned inputs: worker count, filter degree, MAGMA (sweep.md alone comes back)
timeout 240 python3 benchmarks/profile_gpu.py --sweep --out /tmp/sweep > /tmp/sweep.log 2>&1
cp /tmp/sweep/sweep.md "$OUT/sweep.md" 2>/dev/null || tail -20 /tmp/sweep.log > "$OUT/sweep.md"
cat "$OUT/sweep.md"
# the Flower strategy's decoding of a round's replies, pageable and page-locked (no flwr needed)
timeout 180 python3 benchmarks/bench_decode.py --threads 16 > "$OUT/decode.md" 2>&1
tail -8 "$OUT/decode.md"
