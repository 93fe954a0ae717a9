#!/usr/bin/env bash
# The runs behind docs/results.md (CIFAR-10-C protocol, severity 5, all 15 corruptions).
#   bash benchmarks/shift_results.sh PHASE [OUT]
# PHASE: bn-iid | alpha-tune | alpha-best (WEIGHT=...) | correlated | bs1 | gn-ln | cema | continual |
#        unmix-tune | unmix-best (BS64_CONFIG=... BS1_CONFIG=...) | unmix-init | unmix-method-seed | auto-subset | auto-15 | auto-full |
#        seeds | cost (NOTE=...) | report
# Every run writes JSON + Markdown into OUT (default benchmarks/results/shift); `report` rebuilds
# docs/results.md and its plots from all of them. Tuning runs use seed 1 (and a 2,000-image subset);
# every reported run uses seed 0, so nothing is tuned on the reported stream.
set -euo pipefail
cd "$(dirname "$0")/.."
PHASE=${1:?phase}
OUT=${2:-benchmarks/results/shift}
TTA=.venv/bin/tta-server
THREADS=${THREADS:-1}
run() { $TTA eval --threads "$THREADS" --severity 5 --out "$OUT" "$@"; }

case "$PHASE" in
  bn-iid)
    for m in source bn unmix_tns alpha_bn; do run --model resnet20 --method "$m" --setting iid --batch-size 64; done ;;
  alpha-tune)
    for w in 0.5 0.6 0.7 0.8 0.9; do
      run --model resnet20 --method alpha_bn --config "{\"source_weight\": $w}" --setting iid --batch-size 64 \
          --seed 1 --limit 2000 --out "$OUT-tuning"
    done ;;
  alpha-best)
    # WEIGHT: the source_weight with the lowest mean error among the alpha-tune runs (seed 1)
    run --model resnet20 --method alpha_bn --config "{\"source_weight\": ${WEIGHT:?set WEIGHT}}" --setting iid --batch-size 64 ;;
  correlated)
    for m in source bn unmix_tns; do run --model resnet20 --method "$m" --setting correlated --batch-size 64; done ;;
  bs1)
    for m in source bn alpha_bn unmix_tns; do run --model resnet20 --method "$m" --setting iid --batch-size 1 --limit 1000; done ;;
  gn-ln)
    for model in resnet20-gn resnet20-ln; do
      for m in source auto tent sar; do
        run --model "$model" --method "$m" --setting correlated --batch-size 64
        run --model "$model" --method "$m" --setting iid --batch-size 1 --limit 1000
      done
    done ;;
  cema)
    # the edge's `source` baseline is the bn-iid phase's run
    run --model resnet20 --method cema --config '{"teacher": "resnet56", "d_margin": 0.4}' --setting iid --batch-size 64 ;;
  continual)
    for m in source bn adab2n; do run --model resnet20 --method "$m" --setting continual --batch-size 16; done ;;
  unmix-tune)
    # UnMix-TNS momentum (batch_size_max) and assignment temperature, on seed 1 only
    for bmax in 64 16 4 1; do
      for tau in 0.07 1.0; do
        cfg="{\"batch_size_max\": $bmax, \"temperature\": $tau}"
        run --model resnet20 --method unmix_tns --config "$cfg" --setting iid --batch-size 64 --seed 1 --limit 2000 \
            --out "$OUT-tuning"
      done
    done
    for bmax in 64 8 1; do
      cfg="{\"batch_size_max\": $bmax}"
      run --model resnet20 --method unmix_tns --config "$cfg" --setting iid --batch-size 1 --seed 1 --limit 1000 \
          --out "$OUT-tuning"
    done ;;
  unmix-best)
    # BS64_CONFIG / BS1_CONFIG: the unmix-tune configs with the lowest mean error (seed 1) at each batch size
    run --model resnet20 --method unmix_tns --config "${BS64_CONFIG:?set BS64_CONFIG}" --setting iid --batch-size 64
    run --model resnet20 --method unmix_tns --config "${BS1_CONFIG:?set BS1_CONFIG}" --setting iid --batch-size 1 \
        --limit 1000 ;;
  unmix-init)
    # UnMix-TNS component initialization: seed 1 picks among the inits, seeds 0,2,3,4,5 measure the spread
    # (5 corruptions, 2,000-image streams); the `source` model on the same streams is the data-noise floor
    C=gaussian_noise,defocus_blur,frost,contrast,jpeg_compression
    for init in random source_spread source; do
      run --model resnet20 --method unmix_tns --config "{\"init\": \"$init\"}" --setting iid --batch-size 64 \
          --corruptions $C --limit 2000 --seed 1 --out "$OUT-tuning/unmix-init-$init"
    done
    for init in random source source_spread; do   # the same choice under label correlation, seed 1
      run --model resnet20 --method unmix_tns --config "{\"init\": \"$init\"}" --setting correlated --batch-size 64 \
          --corruptions $C --limit 2000 --seed 1 --out "$OUT-tuning/unmix-init-correlated-$init"
    done
    for init in random source source_spread; do for seed in 0 2 3 4 5; do
      run --model resnet20 --method unmix_tns --config "{\"init\": \"$init\"}" --setting iid --batch-size 64 \
          --corruptions $C --limit 2000 --seed "$seed" --out benchmarks/results/unmix-init/$init
    done; done
    for seed in 0 2 3 4 5; do
      run --model resnet20 --method source --setting iid --batch-size 64 --corruptions $C --limit 2000 --seed "$seed" \
          --out benchmarks/results/unmix-init/source-model
    done ;;
  unmix-method-seed)
    # the same 5 corruptions and 2,000-image streams as unmix-init, with the data fixed (--stream-seed 0) and
    # only the method's seed varying: what the initialization alone changes
    C=gaussian_noise,defocus_blur,frost,contrast,jpeg_compression
    for init in random source source_spread; do for seed in 1 2 3 4 5; do
      run --model resnet20 --method unmix_tns --config "{\"init\": \"$init\"}" --setting iid --batch-size 64 \
          --corruptions $C --limit 2000 --seed "$seed" --stream-seed 0 --out benchmarks/results/unmix-method-seed/$init
    done; done ;;
  auto-subset)
    # `auto` against source and the best single method per setting, on a 3-corruption subset, seed 0
    C=gaussian_noise,frost,jpeg_compression
    O=benchmarks/results/auto-subset
    sub() { run --model resnet20 --seed 0 --out "$O" --corruptions "$C" "$@"; }
    for m in auto source; do sub --method $m --setting iid --batch-size 64 --limit 2000; done
    sub --method alpha_bn --config '{"source_weight": 0.6}' --setting iid --batch-size 64 --limit 2000
    for m in auto source unmix_tns; do sub --method $m --setting correlated --batch-size 64 --limit 2000; done
    for m in auto source; do run --model resnet20 --method $m --setting iid --batch-size 64 --corruptions none \
        --limit 2000 --out "$O"; done
    run --model resnet20 --method alpha_bn --config '{"source_weight": 0.6}' --setting iid --batch-size 64 \
        --corruptions none --limit 2000 --out "$O"
    for m in auto source; do sub --method $m --setting iid --batch-size 1 --limit 300; done
    sub --method unmix_tns --config '{"batch_size_max": 1}' --setting iid --batch-size 1 --limit 300
    for m in auto source bn adab2n; do sub --method $m --setting continual --batch-size 16 --limit 2000; done
    for m in auto source bn; do sub --method $m --setting mixed --batch-size 64 --limit 2000; done
    sub --method alpha_bn --config '{"source_weight": 0.6}' --setting mixed --batch-size 64 --limit 2000
    for m in auto source unmix_tns alpha_bn; do sub --method $m --setting shifting --batch-size 64 --limit 1000; done ;;
  auto-15)
    # `auto` on all 15 corruptions, 2,000-image streams, seed 0, against source and the best single method
    O=benchmarks/results/auto-15
    run --model resnet20 --method source --setting iid --batch-size 64 --limit 2000 --out "$O"
    run --model resnet20 --method auto --setting iid --batch-size 64 --limit 2000 --out "$O"
    run --model resnet20 --method alpha_bn --config '{"source_weight": 0.6}' --setting iid --batch-size 64 --limit 2000 \
        --out "$O"
    for m in auto unmix_tns; do run --model resnet20 --method $m --setting correlated --batch-size 64 --limit 2000 \
        --out "$O"; done ;;
  auto-full)
    # `auto` beside the methods in every setting of the full benchmark (all 15 corruptions, seed 0), on
    # ResNet-20 (BN): the settings' rows that bn-iid, correlated, bs1 and continual did not measure,
    # the clean test set, the mixed setting and the missing tent/SAR rows
    A='{"source_weight": 0.6}'
    run --model resnet20 --method auto --setting iid --batch-size 64
    run --model resnet20 --method auto --setting correlated --batch-size 64
    run --model resnet20 --method auto --setting iid --batch-size 1 --limit 1000
    run --model resnet20 --method auto --setting continual --batch-size 16
    for m in source bn unmix_tns auto; do run --model resnet20 --method $m --setting iid --batch-size 64 --corruptions none; done
    run --model resnet20 --method alpha_bn --config "$A" --setting iid --batch-size 64 --corruptions none
    for m in source bn unmix_tns auto; do run --model resnet20 --method $m --setting mixed --batch-size 64; done
    run --model resnet20 --method alpha_bn --config "$A" --setting mixed --batch-size 64
    run --model resnet20 --method alpha_bn --config "$A" --setting correlated --batch-size 64
    for m in tent sar; do for s in iid correlated; do run --model resnet20 --method $m --setting $s --batch-size 64; done; done ;;
  seeds)
    # methods with randomness: CEMA (its replay and upload draws) on one fixed 1,000-image stream
    # (--stream-seed 0), seeds 0, 1, 2, beside the source model on the same stream. `auto` and UnMix-TNS
    # (init=source_spread) have none: their components start from fixed directions
    # UnMix-TNS with its deterministic default init beside the official random draw's seed-0 rows
    run --model resnet20 --method unmix_tns --setting iid --batch-size 64
    run --model resnet20 --method unmix_tns --setting iid --batch-size 1 --limit 1000
    O=benchmarks/results/seeds-1000
    for seed in 0 1 2; do
      run --model resnet20 --method cema --config '{"teacher": "resnet56", "d_margin": 0.4}' --setting iid \
          --batch-size 64 --limit 1000 --seed $seed --stream-seed 0 --out $O
    done
    run --model resnet20 --method source --setting iid --batch-size 64 --limit 1000 --seed 0 --stream-seed 0 --out $O ;;
  cost)
    .venv/bin/python -m benchmarks.method_cost --threads "$THREADS" --out benchmarks/results/method_cost.json \
        --markdown docs/cost.md --note "${NOTE:-}" ;;
  report)
    $TTA report "$OUT" --out docs/results.md --plots docs/plots ;;
  *) echo "unknown phase $PHASE" >&2; exit 2 ;;
esac
