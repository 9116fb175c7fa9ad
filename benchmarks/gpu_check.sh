#!/usr/bin/env bash
# The GPU check (<= 10 minutes on one GPU): the device-parametrised tests on CUDA (interventions, the vital-only fast
# path, fast == naive in fp32, CMAP, DCM), the 7B-shaped probe (one Llama-7B layer, random fp32 weights: each kernel
# the study uses, fp32 and TF32, and a Lightning loop round trip) and the bottom-up 7B plan from it, the embedded study
# at CPU sizes on CUDA (timed, fp32), and bf16 vs fp32 on the embedded tracker. Prints one summary line at the end.
# Nothing else in etk depends on a GPU.
#   bash benchmarks/gpu_check.sh            (from the repository root, after `make setup`)
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 2
t0=$(date +%s)
ETK_TEST_DEVICES=cuda timeout 180 python -m pytest -q -m device tests/ > /tmp/etk_gpu_tests.log 2>&1
tests_rc=$?
tests=$(tail -1 /tmp/etk_gpu_tests.log)
t1=$(date +%s)
timeout 240 python benchmarks/probe_7b.py --device cuda --out outputs/gpu_check/probe_7b.json > /tmp/etk_gpu_probe.log 2>&1
probe=$(tail -1 /tmp/etk_gpu_probe.log)
plan=$(timeout 60 python benchmarks/scale_plan.py --probe outputs/gpu_check/probe_7b.json 2>&1 | tail -1)
t1=$(date +%s)
timeout 420 python run_patching.py method=study pair=smol_enhance model=base trainer.accelerator=gpu \
    trainer.enable_progress_bar=false logger=none hydra.run.dir=outputs/gpu_check/study > /tmp/etk_gpu_study.log 2>&1
study_rc=$?
t2=$(date +%s)
timeout 120 python benchmarks/precision.py --device cuda --prompts 300 --pairs 20 > /tmp/etk_gpu_precision.log 2>&1
prec_rc=$?
precision=$(tail -1 /tmp/etk_gpu_precision.log)
t3=$(date +%s)
answer=$(grep -m1 -o "\*\*Answer.\*\*[^(]*" outputs/gpu_check/study/report.md 2>/dev/null | head -c 300)
echo "$probe"
echo "$plan"
echo "gpu_check: tests rc=$tests_rc [$tests]; study rc=$study_rc ($((t2 - t1)) s) $answer; precision rc=$prec_rc [$precision] ($((t3 - t2)) s); total $((t3 - t0)) s"
