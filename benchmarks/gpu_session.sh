#!/usr/bin/env bash
# The GPU checks of the server step, in one call, writing every result under $OUT (default
# /tmp/gpu_session, 8 files). What it measures, in order:
#   1. the CUDA tests: the stacked server path (staging, checks, filtered top-k), evaluate on
#      CUDA, page-locked decoding, FederatedScope's wire format (tests.log);
#   2. bench_aggregation.py --device cuda: the 80-client server step against the transfer bound
#      and the dense GPU baseline (bench.md, gpu.json; docs/performance.md, "GPU server step");
#   3. profile_gpu.py: the timeline and kernel profile of the hosts' call from page-locked
#      factors, then its sweep of scheduling choices (workers, filter degree, MAGMA) (profile/, sweep.md);
#   4. bench_decode.py: the Flower host decoding a round's replies, pageable and page-locked (decode.md).
# Needs torch with CUDA and this repository as the working directory (PYTHONPATH=.: no install,
# no network). About 6 minutes on an H100; "confirm" runs 1 and 2 only (about 3 minutes), e.g.
# after a default changed on the sweep's word.
#   bash benchmarks/gpu_session.sh [all|confirm]
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
